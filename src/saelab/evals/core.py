"""Core eval on held-out text (SAEBench core metrics): reconstruction (MSE, explained variance
and its legacy variant, cosine, L2 ratio, relative reconstruction bias), sparsity (L0, L1), dead
and dense latents, the feature-density histogram, the most similar decoder pairs, and CE/KL
with the SAE spliced into the model against zero- and mean-ablation.

Positions: only the positions the coder was trained on (its `Positions`: BOS, padding,
special and listed tokens dropped, as at harvest) are reconstructed, spliced or ablated;
elsewhere the model runs clean. CE and KL average over the predictions made at those
positions whose target is a real token (the prediction made at BOS is not counted). The
SAELens / SAEBench convention zero-ablates every position, BOS included; it is reported
beside ours as `ce_zero_all_positions` / `ce_loss_recovered_all_positions_zeroed`.

This module computes a result from an SAE, a model and text; it knows nothing of run
directories (saelab.experiments.evaluate reads and writes those).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from saelab.activations.rows import kept_rows
from saelab.config import Config
from saelab.data.corpus import iter_documents
from saelab.data.tokens import Batch, Positions, batches, contexts, keep_mask, shuffled
from saelab.device import check_fits, describe, peak_memory_bytes, reset_peak
from saelab.evals.metrics import (
    Moments,
    ce_chunk_rows,
    ce_loss_recovered,
    chunked_ce_kl,
    density_histogram,
    explained_variance_legacy,
    most_similar_decoder_pairs,
)
from saelab.hookpoints import HookPoint
from saelab.io import atomic_write, read_json, sha256_file, write_json
from saelab.models.hooks import (
    final_hidden,
    hidden_patched_from,
    position_only_hidden,
    prefix_point,
    record,
    unembed,
)
from saelab.models.load import LoadedModel
from saelab.runs.results import CoreResult
from saelab.saes.base import SparseCoder

DEFAULT_CTX_LEN = 128
log = logging.getLogger(__name__)


class CoreConfig(Config):
    """What the core eval reads: held-out text and token budgets."""

    text: str = Field("embedded", description="text source (as for harvest); its validation split by default")
    text_field: str = "text"
    split: Literal["train", "validation"] = "validation"
    tokens: int = Field(32_768, gt=0, description="validation tokens for reconstruction metrics")
    ce_tokens: int = Field(16_384, gt=0, description="validation tokens for CE / KL (one clean forward and four "
                           "patched ones from the hook's block up, each)")
    ctx_len: int | None = Field(None, ge=2, description="tokens per context; default: the coder's own (its "
                                "harvest's), else 128")
    batch_size: int = Field(16, gt=0, description="contexts per forward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model dtype")
    seed: int = 0
    dense_thresholds: list[float] = Field(default_factory=lambda: [0.1, 0.01],
                                          description="a latent firing on more than this fraction of tokens is dense")
    similar_pairs: int = Field(10, ge=0, description="most similar decoder pairs to report")


DEFINITIONS = {
    "explained_variance": "1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2, variance around the mean over all eval "
                          "tokens (Gao et al. 2024; SAEBench core)",
    "explained_variance_legacy": "LEGACY (older SAELens): mean over tokens of 1 - ||x - x_hat||^2 / ||x - "
                                 "mean_batch(x)||^2; a mean of ratios, not comparable to explained_variance",
    "l0": "mean number of nonzero latents per token", "l1": "mean sum |z| per token",
    "cosine_similarity": "mean over tokens of cos(x, x_hat)", "l2_ratio": "mean over tokens of ||x_hat|| / ||x||",
    "relative_reconstruction_bias": "E||x_hat||^2 / E[x . x_hat] (Wright & Sharkey 2024); 1 = unbiased",
    "ce_loss_recovered": "(CE_zero - CE_sae) / (CE_zero - CE_clean), CE_zero with the hook zeroed at the kept "
                         "positions (BOS clean)",
    "ce_loss_recovered_all_positions_zeroed": "the SAELens / SAEBench convention: (CE_zero_all - CE_sae) / "
                                              "(CE_zero_all - CE_clean), the hook zeroed at every position incl. BOS",
    "ce_loss_recovered_mean_ablation": "(CE_mean_ablation - CE_sae) / (CE_mean_ablation - CE_clean), mean = "
                                       "the hook's mean activation over the eval tokens",
    "kl_to_clean": "mean over tokens of KL(p_clean || p_sae), nats",
    "dead_fraction": "fraction of latents that never fired on the eval tokens (eval_tokens of them)",
    "dense_fraction": "fraction of latents firing on more than the threshold fraction of eval tokens",
    "positions": "reconstruction: the kept positions (BOS, padding, special and listed tokens excluded, as at "
                 "harvest); CE/KL: the predictions made at kept positions whose target is a real token",
}


def ce_bytes(cfg: CoreConfig, loaded: LoadedModel) -> int:
    """A rough upper estimate of the CE/KL eval's memory beyond the model: a few float32 logit
    chunks (chunked_ce_kl keeps at most ~4 live) and a few [batch, ctx, d] activations; no longer
    growing with batch x ctx x vocab."""
    c = loaded.model.config
    vocab = getattr(c, "vocab_size", 0) or 0
    d = getattr(c, "hidden_size", 0) or 0
    tokens = cfg.batch_size * (cfg.ctx_len or DEFAULT_CTX_LEN)
    return 4 * 4 * min(tokens, ce_chunk_rows(vocab)) * vocab + 8 * 4 * tokens * d


def validation_batches(cfg: CoreConfig, loaded: LoadedModel, positions: Positions):
    """Seeded contexts of the held-out split, batched (BOS first if the coder was trained so)."""
    docs = shuffled(iter_documents(cfg.text, cfg.split, cfg.text_field), cfg.seed)
    if not docs:
        raise ValueError(f"text source {cfg.text!r} has no documents in split {cfg.split!r}")
    ctx_len = cfg.ctx_len or DEFAULT_CTX_LEN
    return batches(contexts(docs, loaded.tokenizer, ctx_len, positions.prepend_bos), cfg.batch_size,
                   loaded.tokenizer.pad_token_id)


def core_eval(cfg: CoreConfig, sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, positions: Positions,
              model_name: str, progress: bool = True, baseline_dir: Path | None = None) -> CoreResult:
    """Every core metric for one SAE at one hook point of the model, on held-out text.
    baseline_dir: where the SAE-independent CE passes are cached (`CEBaseline`), or None."""
    device = loaded.device
    sae = sae.to(device).eval()
    check_fits(device, ce_bytes(cfg, loaded), f"the CE/KL eval at batch {cfg.batch_size} x "
               f"{cfg.ctx_len or DEFAULT_CTX_LEN} tokens",
               "lower batch_size (e.g. --set batch_size=4)")
    reset_peak(device)
    t0 = time.perf_counter()
    recon = reconstruction_metrics(sae, loaded, hp, validation_batches(cfg, loaded, positions), cfg.tokens,
                                   progress, cfg.dense_thresholds, positions=positions)
    mean_act = torch.tensor(recon.pop("mean_activation"), device=device)
    excluded = recon.pop("excluded")
    t1 = time.perf_counter()
    baseline, status = None, "uncached"
    if baseline_dir is not None and cfg.ce_tokens * sae.cfg.d_in * 8 <= BASELINE_MAX_BYTES:
        key = baseline_key(cfg, loaded, hp, positions, mean_act)
        baseline = CEBaseline.load(Path(baseline_dir) / f"{key}.safetensors", key)
    ce = ce_metrics(sae, loaded, hp, validation_batches(cfg, loaded, positions), cfg.ce_tokens, progress,
                    mean_act=mean_act, positions=positions, baseline=baseline)
    if baseline is not None:
        status = "computed" if baseline.changed else "reused"
        if baseline.changed:
            try:
                baseline.save(Path(baseline_dir) / f"{baseline.key}.safetensors")
            except OSError as e:  # a read-only cache costs speed, never the eval
                log.warning("could not cache the CE baseline in %s: %s", baseline_dir, e)
    t2 = time.perf_counter()
    pairs = most_similar_decoder_pairs(sae.W_dec.detach().cpu(), cfg.similar_pairs)
    t3 = time.perf_counter()
    return CoreResult(
        model=model_name, hook=str(hp), text=cfg.text, split=cfg.split, seed=cfg.seed, **recon, **ce,
        ce_baseline=status,
        positions={**positions.to_dict(), "excluded_in_reconstruction": excluded},
        similar_decoder_pairs=pairs, definitions=DEFINITIONS,
        wall_seconds={"reconstruction": round(t1 - t0, 2), "ce": round(t2 - t1, 2),
                      "decoder_pairs": round(t3 - t2, 2), "total": round(t3 - t0, 2)},
        device=describe(device), peak_memory_bytes=peak_memory_bytes(device))


@torch.no_grad()
def reconstruction_metrics(sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, stream, n_tokens: int,
                           progress: bool, dense_thresholds: tuple[float, ...] | list[float] = (0.1, 0.01),
                           units: dict[str, list] | None = None, positions: Positions = Positions()
                           ) -> dict[str, Any]:
    """Reconstruction and sparsity metrics over n_tokens kept tokens of the stream.

    units: if given, per-context sums are appended to it ("sse", "sumsq", "sum" [d], "n") so a
    caller can bootstrap explained variance over contexts (saelab.evals.stats)."""
    device = loaded.device
    moments = Moments(sae.cfg.d_in, device)
    fires = torch.zeros(sae.cfg.width, dtype=torch.float64, device=device)  # tokens each latent fired on
    sums = dict.fromkeys(("l0", "l1", "cos", "l2_ratio", "ev_legacy", "xhat_sq", "x_dot_xhat"), 0.0)
    excluded: dict[str, int] = {}
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="eval reconstruction", disable=not progress)
    for batch in stream:
        if moments.n >= n_tokens:
            break
        kept = kept_rows(loaded.model, [hp], batch, loaded.tokenizer, positions)
        for k, v in kept.counts.items():
            excluded[k] = excluded.get(k, 0) + v
        ctx = kept.ctx[: n_tokens - moments.n]  # [tokens] context of each kept token
        x = kept.rows(hp).float()[: n_tokens - moments.n]  # [tokens, d]
        z = sae.encode(x)  # [tokens, width]
        x_hat = sae.decode(z, x)
        moments.update(x, x_hat)
        active = z != 0
        fires += active.sum(0).double()
        x64, h64 = x.double(), x_hat.double()
        sums["l0"] += float(active.sum())
        sums["l1"] += float(z.abs().sum())
        sums["cos"] += float(torch.nn.functional.cosine_similarity(h64, x64, dim=-1).sum())
        sums["l2_ratio"] += float((h64.norm(dim=-1) / x64.norm(dim=-1).clamp_min(1e-12)).sum())
        sums["ev_legacy"] += float(explained_variance_legacy(x, x_hat).sum())
        sums["xhat_sq"] += float(h64.pow(2).sum())
        sums["x_dot_xhat"] += float((x64 * h64).sum())
        if units is not None:
            for c in ctx.unique():
                sel = ctx == c
                xs, hs = x64[sel], h64[sel]
                units["sse"].append(float((xs - hs).pow(2).sum()))
                units["sumsq"].append(float(xs.pow(2).sum()))
                units["sum"].append(xs.sum(0).cpu())
                units["n"].append(int(sel.sum()))
        bar.update(x.shape[0])
    bar.close()
    if moments.n == 0:
        raise ValueError("the validation text produced no tokens to evaluate")
    n = moments.n
    ev = moments.explained_variance()
    freq = (fires / n).cpu()
    return {
        "eval_tokens": n, "explained_variance": ev, "fvu": 1 - ev, "explained_variance_legacy": sums["ev_legacy"] / n,
        "mse": moments.mse(), "l0": sums["l0"] / n, "l1": sums["l1"] / n, "cosine_similarity": sums["cos"] / n,
        "l2_ratio": sums["l2_ratio"] / n, "relative_reconstruction_bias": sums["xhat_sq"] / sums["x_dot_xhat"],
        "dead_fraction": float((freq == 0).double().mean()), "dead_latents": int((freq == 0).sum()),
        "dense_fraction": {str(t): float((freq > t).double().mean()) for t in dense_thresholds},
        "dense_latents": {str(t): int((freq > t).sum()) for t in dense_thresholds},
        "feature_density_histogram": density_histogram(freq),
        "mean_activation": (moments.sum / n).float().tolist(), "excluded": excluded,
    }


def ev_units(sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, cfg: CoreConfig, positions: Positions,
             tokens: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Reconstruction metrics over `tokens` validation tokens, and per validation context its
    squared error [contexts] and its sum ||x - mean||^2 [contexts] (the mean over all the tokens):
    the units a paired bootstrap of explained variance resamples (saelab.evals.stats.compare with
    one_minus=True). Two coders evaluated with the same cfg see the same contexts."""
    units: dict[str, list] = {"sse": [], "sumsq": [], "sum": [], "n": []}
    m = reconstruction_metrics(sae, loaded, hp, validation_batches(cfg, loaded, positions), tokens, False,
                               units=units, positions=positions)
    mu = torch.stack(units["sum"]).sum(0) / sum(units["n"])  # [d] mean over all eval tokens
    n = np.array(units["n"], dtype=np.float64)
    s = torch.stack(units["sum"])  # [contexts, d]
    tv = np.array(units["sumsq"]) - 2 * (s @ mu).numpy() + n * float(mu @ mu)  # sum ||x - mu||^2 per context
    return m, np.array(units["sse"]), tv


def scored_positions(batch: Batch, keep: torch.Tensor) -> torch.Tensor:
    """[batch, seq - 1] bool: the predictions CE/KL count, those made at a kept position (the
    positions the SAE is spliced at) whose target, the next token, is real (not padding)."""
    return keep[:, :-1] & batch.attention_mask[:, 1:].to(keep.device).bool()


BASELINE_VERSION = 1  # bump when what the clean or ablated passes compute changes: older caches are then ignored
BASELINE_MAX_BYTES = 1 << 30  # larger baselines (ce_tokens x d x 8 bytes) are not cached


@dataclass
class CEBaseline:
    """The SAE-independent part of the CE/KL eval of one model at one hook on one text: per batch
    its token ids, the clean residual the patched passes start from, the clean final hidden
    states at the scored positions and the zero-/mean-ablated CE sums. With it, evaluating
    another coder at the same hook costs one patched pass per batch instead of five.

    A batch is used only if its token ids equal the eval's own (so a changed text or tokenizer
    recomputes it); the file carries a sha256 and a key over the model's weights and dtype, the
    hook, the positions, the config and the mean activation; anything else is recomputed."""

    key: str
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    changed: bool = False
    reused: int = 0

    def get(self, i: int, ids: torch.Tensor) -> dict[str, torch.Tensor] | None:
        b = self.batches[i] if i < len(self.batches) else None
        if b is not None and b["ids"].shape == ids.shape and torch.equal(b["ids"], ids.cpu()):
            self.reused += 1
            return b
        return None

    def put(self, i: int, entry: dict[str, torch.Tensor]) -> None:
        del self.batches[i:]
        self.batches.append({k: v.detach().cpu() for k, v in entry.items()})
        self.changed = True

    @classmethod
    def load(cls, path: Path, key: str) -> CEBaseline:
        """The stored baseline at path if whole and made for `key`, else an empty one."""
        meta = path.with_suffix(".json")
        try:
            m = read_json(meta)
            if m.get("key") != key or m.get("version") != BASELINE_VERSION or sha256_file(path) != m["sha256"]:
                raise ValueError("stale or damaged")
            flat = load_file(path)
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            if path.exists():
                log.warning("CE baseline %s not used (%s): recomputing it", path, e)
            return cls(key)
        batches = [{k: flat[f"{i}.{k}"] for k in BASELINE_FIELDS} for i in range(m["batches"])]
        return cls(key, batches)

    def save(self, path: Path) -> None:
        """Atomically, the tensors first, then the sidecar with their checksum."""
        flat = {f"{i}.{k}": v.contiguous() for i, b in enumerate(self.batches) for k, v in b.items()}
        with atomic_write(path) as f:
            f.write(save(flat))
        write_json(path.with_suffix(".json"), {"key": self.key, "version": BASELINE_VERSION,
                                               "batches": len(self.batches), "sha256": sha256_file(path)})


BASELINE_FIELDS = ("ids", "prefix", "h_clean", "sums")


def baseline_key(cfg: CoreConfig, loaded: LoadedModel, hp: HookPoint, positions: Positions,
                 mean_act: torch.Tensor | None) -> str:
    """What the SAE-independent passes depend on, hashed (the token ids are checked per batch)."""
    m = loaded.model
    parts = {"v": BASELINE_VERSION, "model": loaded.content_hash, "dtype": str(next(m.parameters()).dtype),
             "device": loaded.device.type, "hook": str(hp), "positions": positions.to_dict(),
             "config": cfg.model_dump(mode="json", include={"text", "text_field", "split", "ce_tokens", "ctx_len",
                                                           "batch_size", "seed"}),
             "mean": None if mean_act is None else hashlib.sha256(
                 mean_act.detach().cpu().double().numpy().tobytes()).hexdigest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class AblatedCE:
    """The ablated passes' CE sums of one eval: zero at the kept positions ("zero"), zero at every
    position, BOS included ("zero_all", SAELens' convention) and the mean at the kept positions
    ("mean"). values: ablation -> the value [d] put at its positions.

    At a residual hook a row ablated along its first t + 1 positions, a clean first token aside,
    ends position t in a state that depends on t and that token alone (`position_only_hidden`):
    one context per ablation and first token stands for every such row, and one unembedding of its
    positions serves every target, instead of a [batch, ctx] pass of the blocks above the hook and
    a [batch x ctx, vocab] unembedding per batch. Rows with other clean positions (a special token
    mid-context) and hooks inside a block get their own passes. Each ablation's shortcut is checked
    once per eval against a full pass of a real row (1e-3 relative in float32, 1e-2 in 16-bit);
    where it fails (tokens entering above the hook) that ablation runs full passes."""

    def __init__(self, model, hp: HookPoint, head, rows: int, values: dict[str, torch.Tensor]):
        self.model, self.hp, self.head, self.rows, self.values = model, hp, head, rows, values
        resid = hp.kind in ("resid_pre", "resid_post")
        self.trusted: dict[str, bool | None] = {k: None if resid else False for k in values}  # None: unchecked
        self.reps: dict[tuple[str, int | None], torch.Tensor] = {}  # (ablation, clean first token) -> [T, d]

    def sums(self, prefix: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor,
             score: torch.Tensor) -> dict[str, float]:
        """CE summed over the scored positions [B, T-1] of one batch, per ablation. prefix [B, T, d]:
        the clean residual at prefix_point(hp); keep [B, T]: the positions "zero" and "mean" ablate."""
        return {k: self._sum(k, torch.ones_like(keep) if k == "zero_all" else keep, prefix, ids, mask, score)
                for k in self.values}

    def _full(self, k: str, patched: torch.Tensor, prefix, ids, mask, score, r: torch.Tensor) -> torch.Tensor:
        """Per-token CE [n] of rows r from full patched passes of the blocks above the prefix."""
        value = self.values[k]

        def patch(x):  # x: [len(r), T, d]
            y = x.clone()
            y[patched[r]] = value.to(x.dtype)
            return y
        h = hidden_patched_from(self.model, self.hp, prefix[r], patch, ids[r], mask[r])[:, :-1][score[r]]
        return chunked_ce_kl(h, ids[r, 1:][score[r]], self.head, chunk_rows=self.rows)[0]

    def _shared(self, k: str, first: torch.Tensor | None, first_id: int | None, t: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        """Per-token CE [n] at positions t [n] from the one context standing for these rows."""
        seq = int(t.max()) + 1
        h = self.reps.get((k, first_id))
        if h is None or h.shape[0] < seq:
            h = position_only_hidden(self.model, self.hp, self.values[k], seq, first, first_id or 0)  # [seq, d]
            self.reps[(k, first_id)] = h
        ce = torch.empty(t.shape[0], dtype=torch.float32, device=t.device)
        for s in range(0, seq, self.rows):
            sel = (t >= s) & (t < s + self.rows)
            if sel.any():
                logp = torch.log_softmax(self.head(h[s:s + self.rows]).float(), -1)  # [rows, vocab]
                ce[sel] = -logp[t[sel] - s, targets[sel]]
        return ce

    def _sum(self, k: str, patched: torch.Tensor, prefix, ids, mask, score) -> float:
        n_scored = score.sum(1)  # [B]
        last = torch.where(score, torch.arange(score.shape[1], device=score.device), -1).max(1).values  # [B]
        rest = [r for r in range(ids.shape[0]) if n_scored[r] > 0]
        groups: dict[int | None, list[int]] = {}
        if self.trusted[k] is not False:
            for r in rest:
                if bool(patched[r, 1:int(last[r]) + 1].all()):
                    groups.setdefault(None if bool(patched[r, 0]) else int(ids[r, 0]), []).append(r)
        total = 0.0
        for first_id, group in groups.items():
            g = torch.tensor(group, device=ids.device)
            t = score[g].nonzero()[:, 1]  # [n] row-major, as [score] indexing orders them
            ce = self._shared(k, None if first_id is None else prefix[group[0], 0], first_id, t, ids[g, 1:][score[g]])
            if self.trusted[k] is None:  # once per eval: against a full pass of this group's most-scored row
                i = int(n_scored[g].argmax())
                full = self._full(k, patched, prefix, ids, mask, score, g[i:i + 1])
                mine = ce[int(n_scored[g][:i].sum()):][:full.shape[0]]
                tol = 1e-3 if prefix.dtype == torch.float32 else 1e-2
                self.trusted[k] = bool(torch.allclose(mine, full, rtol=tol, atol=tol))
                if not self.trusted[k]:
                    log.info("CE eval: the %s ablation at %s depends on more than the position in this model "
                             "(max |difference| %.3g nats): full passes", k, self.hp, float((mine - full).abs().max()))
            if not self.trusted[k]:
                break
            total += float(ce.sum())
            rest = [r for r in rest if r not in set(group)]
        if rest:
            total += float(self._full(k, patched, prefix, ids, mask, score, torch.tensor(rest, device=ids.device)).sum())
        return total


@torch.no_grad()
def ce_metrics(sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, stream, n_tokens: int,
               progress: bool, mean_act: torch.Tensor | None = None, positions: Positions = Positions(),
               baseline: CEBaseline | None = None) -> dict[str, Any]:
    """Clean, SAE-spliced, zero-ablated at the kept positions, zero-ablated at every position
    (the SAELens convention) and, given mean_act [d], mean-ablated next-token CE; and
    KL(clean || spliced). Averages over `scored_positions`.

    Per batch the model runs once clean, keeping the residual at the hook's block
    (`prefix_point`); each patched pass starts from it, so the blocks below the hook run once,
    not five times. Passes return final hidden states, and CE / KL are computed from them in
    row chunks (`chunked_ce_kl`): no [batch, ctx, vocab] logits tensor is ever whole, so memory
    beyond the model stays bounded for any vocabulary. At a residual hook each ablation is one
    short context's pass for every row (`AblatedCE`), checked once per eval against a full pass.
    Given a `baseline`, its batches replace
    the clean and ablated passes where their token ids match, and the ones computed are put in it."""
    model = loaded.model
    if model.get_output_embeddings() is None:
        raise ValueError(f"the CE/KL eval needs a model with an LM head; {model.config.model_type} has none "
                         "(an encoder): evaluate reconstruction only")
    head = functools.partial(unembed, model)
    rows = ce_chunk_rows(model.get_output_embeddings().weight.shape[0])
    base = prefix_point(hp)
    device = loaded.device
    zero = torch.zeros(sae.cfg.d_in, device=device)
    values = {"zero": zero, "zero_all": zero, **({"mean": mean_act} if mean_act is not None else {})}
    ablations = tuple(values)
    passes = AblatedCE(model, hp, head, rows, values)
    sums = dict.fromkeys(("clean", "sae", "zero", "zero_all", "mean", "kl"), 0.0)
    n = 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="eval CE/KL", disable=not progress)
    for i, batch in enumerate(stream):
        if n >= n_tokens:
            break
        keep, _ = keep_mask(batch, loaded.tokenizer, positions)
        keep = keep.to(device)
        score = scored_positions(batch, keep)  # [B, T-1]
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        targets = ids[:, 1:][score]
        cached = baseline.get(i, batch.input_ids) if baseline is not None else None
        if cached is not None:
            prefix, h_clean = cached["prefix"].to(device), cached["h_clean"].to(device)
            ablated = dict(zip(ablations, cached["sums"].tolist(), strict=True))
        else:
            with record(model, [base]) as rec:
                h_clean = final_hidden(model, ids, mask)[:, :-1][score]  # [tokens, d]
            prefix = rec[base]  # [B, T, d] the clean residual the patched passes start from
            ablated = passes.sums(prefix, ids, mask, keep, score)
            if baseline is not None:
                baseline.put(i, {"ids": batch.input_ids, "prefix": prefix, "h_clean": h_clean,
                                 "sums": torch.tensor([ablated[k] for k in ablations], dtype=torch.float64)})

        def splice(fn, keep=keep):
            def patch(x):  # x: [B, T, d]
                y = x.clone()
                y[keep] = fn(x[keep].float()).to(x.dtype)
                return y
            return patch

        h = hidden_patched_from(model, hp, prefix, splice(sae.reconstruct), ids, mask)[:, :-1][score]
        ce, ce_clean, kl = chunked_ce_kl(h, targets, head, h_clean, rows)  # [tokens] each
        sums["sae"] += float(ce.sum())
        sums["clean"] += float(ce_clean.sum())
        sums["kl"] += float(kl.sum())
        for k, v in ablated.items():
            sums[k] += v
        n += targets.shape[0]
        bar.update(targets.shape[0])
    bar.close()
    if n == 0:
        raise ValueError("the validation text produced no tokens to score")
    ce = {k: sums[k] / n for k in ("clean", "sae", "zero", "zero_all", "mean")}
    out = {"ce_tokens": n, "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
           "ce_zero_all_positions": ce["zero_all"],
           "ce_loss_recovered": ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
           "ce_loss_recovered_all_positions_zeroed": ce_loss_recovered(ce["clean"], ce["sae"], ce["zero_all"]),
           "kl_to_clean": sums["kl"] / n}
    if mean_act is not None:
        out["ce_mean"] = ce["mean"]
        out["ce_loss_recovered_mean_ablation"] = ce_loss_recovered(ce["clean"], ce["sae"], ce["mean"])
    return out
