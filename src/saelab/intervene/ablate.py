"""Latent ablation with the SAE spliced in and its error term kept: the change in next-token
cross-entropy (Delta CE) per latent with a bootstrap CI over contexts, and the tokens whose
log-probabilities move most.

With the SAE spliced in at the kept positions (the positions it reads) and its error term kept,
the activation is x = x_hat(z) + (x - x_hat(z)); ablating the latents S sets z_i to a_i for i in
S (zero ablation: a_i = 0; mean ablation: a_i = the latent's mean activation over the eval
tokens, zeros included), which moves the activation by

    delta = x_hat(z_ablated) - x_hat(z) = sum_{i in S} (a_i - z_i) W_dec[i]

(the error term cancels). The engine adds delta to the activation, so ablating nothing, or a
latent that never differs from a_i (a zero-ablated latent that never fires), leaves the model
bit-identical to the clean one; writing the splice as x_hat + (x - x_hat) instead differs from
x by float rounding only (tests/test_ablate.py shows both). An SAE's own b_dec and the rest of
its reconstruction never enter.

Delta CE = mean CE(ablated) - mean CE(clean) over the scored predictions (those made at kept
positions whose target is a real token, as in the core eval), with a paired bootstrap 95% CI
over contexts (the independent units). "Moves": for each latent, the mean over the positions
where it fired of log p_ablated(v) - log p_clean(v) for every vocabulary token v: the most
negative are the tokens the latent promotes (ablating it lowers them), the most positive the
ones it suppresses; and the targets whose log-probability fell most.

Batched: one pass over the text caches the activation at the hook and the SAE's latents; each
ablation then runs only the blocks after the hook from the cached activation
(`saelab.models.hooks.forward_from`, for resid_pre / resid_post hooks; a full pass with the
patch elsewhere), many (latent, context) rows per forward, and a zero-ablated latent only on
the contexts where it fired (elsewhere nothing changed, so its Delta CE there is exactly 0).
`full_pass_ce` is the plain reference (one full pass over the text per latent) the tests
and benchmarks/ablate.py hold the engine against.

This module computes results from an SAE, a model and text; it knows nothing of run directories.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm.auto import tqdm

from saelab.activations.rows import kept_rows
from saelab.data.tokens import Positions
from saelab.device import describe, peak_memory_bytes, reset_peak
from saelab.evals.core import scored_positions, validation_batches
from saelab.evals.stats import compare
from saelab.hookpoints import HookPoint
from saelab.intervene import InterventionSettings
from saelab.intervene.lens import logit_lens
from saelab.models.hooks import forward_from, run_with_patch
from saelab.models.load import LoadedModel
from saelab.runs.results import AblateResult, LatentAblation
from saelab.saes.base import SparseCoder


class AblateSettings(InterventionSettings):
    """What an ablation run computes (the stage's config adds the run directory and where it runs)."""

    latents: list[int] = Field(default_factory=list, description="latents to ablate, each one alone (and all "
                               "together when joint)")
    top: int | None = Field(None, gt=0, description="instead: each of the N latents with the largest mean "
                            "activation on the eval text")
    mode: Literal["zero", "mean"] = Field("zero", description="zero: z_i -> 0; mean: z_i -> its mean activation on "
                                          "the eval tokens")
    joint: bool = Field(True, description="also ablate the whole set at once (the ledger's primary comparison)")
    text: str = Field("embedded", description="eval text source (as for harvest); its validation split by default")
    text_field: str = "text"
    split: Literal["train", "validation"] = "validation"
    tokens: int = Field(8192, gt=0, description="scored predictions to evaluate on (whole contexts, at least this "
                        "many)")
    ctx_len: int = Field(128, ge=2)
    batch_size: int = Field(8, gt=0, description="contexts per caching pass and per clean pass")
    rows: int = Field(8, gt=0, description="ablated contexts per forward pass")
    top_tokens: int = Field(10, gt=0, description="tokens listed per latent (moves and logit lens)")


@dataclass
class Cached:
    """The eval contexts with the clean activation at the hook and the studied latents' activations."""

    ids: torch.Tensor  # [C, T]
    mask: torch.Tensor  # [C, T]
    acts: torch.Tensor  # [C, T, d] the activation at the hook (on the model's device)
    keep: torch.Tensor  # [C, T] bool: the positions the SAE reads
    score: torch.Tensor  # [C, T - 1] bool: the predictions CE counts
    z: torch.Tensor  # [C, T, N] the studied latents' activations (0 off the kept positions)
    latents: list[int]
    mean: torch.Tensor  # [N] mean activation of each studied latent over the kept tokens
    fire_fraction: torch.Tensor  # [N]
    excluded: dict[str, int] = field(default_factory=dict)


@torch.no_grad()
def cache(cfg: AblateSettings, sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, positions: Positions,
          latents: list[int] | None, top: int | None = None) -> Cached:
    """One pass over the eval text (stopped after the hook): activations, masks, and the latents
    (`latents`, or the `top` latents by mean activation) at every kept position."""
    ids, masks, acts, keeps, scores = [], [], [], [], []
    n_scored = 0
    excluded: dict[str, int] = {}
    T = cfg.ctx_len
    for batch in validation_batches(cfg, loaded, positions):  # the core eval's contexts (cfg: same fields)
        if n_scored >= cfg.tokens:
            break
        kept = kept_rows(loaded.model, [hp], batch, loaded.tokenizer, positions)
        for k, v in kept.counts.items():
            excluded[k] = excluded.get(k, 0) + v
        pad = T - batch.input_ids.shape[1]  # every cached context is padded to ctx_len
        ids.append(F.pad(batch.input_ids, (0, pad), value=loaded.tokenizer.pad_token_id))
        masks.append(F.pad(batch.attention_mask, (0, pad)))
        acts.append(F.pad(kept.full[hp], (0, 0, 0, pad)))
        keeps.append(F.pad(kept.keep, (0, pad)))
        scores.append(scored_positions(batch, kept.keep))
        scores[-1] = F.pad(scores[-1], (0, pad))
        n_scored += int(scores[-1].sum())
    if not ids:
        raise ValueError("the eval text produced no contexts")
    acts_t, keep_t = torch.cat(acts), torch.cat(keeps)
    flat = acts_t[keep_t].float()  # [tokens, d]
    W = sae.cfg.width
    total = torch.zeros(W, dtype=torch.float64, device=flat.device)
    fires = torch.zeros(W, dtype=torch.float64, device=flat.device)
    for s in range(0, flat.shape[0], 4096):
        z = sae.encode(flat[s:s + 4096])
        total += z.double().sum(0)
        fires += (z > 0).double().sum(0)
    if latents is None or not latents:
        if not top:
            raise ValueError("name the latents to ablate (latents) or ask for the top N (top)")
        latents = torch.argsort(total, descending=True, stable=True)[:top].tolist()
    bad = [i for i in latents if not 0 <= i < W]
    if bad:
        raise ValueError(f"latents {bad} are out of range: the SAE has {W} latents (0..{W - 1})")
    sel = torch.tensor(latents, device=flat.device)
    zs = torch.cat([sae.encode(flat[s:s + 4096])[:, sel] for s in range(0, flat.shape[0], 4096)])
    z_full = torch.zeros(*keep_t.shape, len(latents), device=flat.device, dtype=zs.dtype)
    z_full[keep_t] = zs
    n_tok = flat.shape[0]
    return Cached(torch.cat(ids).to(acts_t.device), torch.cat(masks).to(acts_t.device), acts_t, keep_t,
                  torch.cat(scores), z_full, [int(i) for i in latents], (total[sel] / n_tok).float(),
                  (fires[sel] / n_tok).float(), excluded)


def _logits(loaded: LoadedModel, hp: HookPoint, c: Cached, ctx: torch.Tensor, delta: torch.Tensor | None):
    """Logits [B, T, vocab] of contexts ctx [B] with delta [B, T, d] added at the hook (None: clean)."""
    ids, mask = c.ids[ctx], c.mask[ctx]
    if hp.kind in ("resid_pre", "resid_post"):
        x = c.acts[ctx]
        return forward_from(loaded.model, hp, x if delta is None else x + delta.to(x.dtype), ids, mask)
    fn = None if delta is None else (lambda x: x + delta.to(x.dtype))
    return run_with_patch(loaded.model, hp, fn, ids, mask)


def _delta(sae: SparseCoder, c: Cached, ctx: torch.Tensor, cols: list[list[int]], mode: str) -> torch.Tensor:
    """[B, T, d]: sum over the row's latents (columns of c.z) of (a_i - z_i) W_dec[i] at the kept positions."""
    W = sae.W_dec.detach()
    B, T = ctx.shape[0], c.ids.shape[1]
    out = torch.zeros(B, T, W.shape[1], device=W.device, dtype=W.dtype)
    for r, js in enumerate(cols):
        z = c.z[ctx[r]][:, js]  # [T, k]
        a = c.mean[js] if mode == "mean" else torch.zeros_like(c.mean[js])
        coef = (a[None, :] - z) * c.keep[ctx[r]][:, None]  # nothing changes off the kept positions
        out[r] = coef @ W[torch.tensor([c.latents[j] for j in js], dtype=torch.long, device=W.device)]
    return out


@dataclass
class Job:
    name: str
    cols: list[int]  # columns of Cached.z
    ablated: np.ndarray | None = None  # [C] sum of CE (ablated) per context
    moves: torch.Tensor | None = None  # [V] sum over fired positions of log p_abl - log p_clean
    moved_positions: int = 0
    drops: list[tuple[float, int, int, int]] = field(default_factory=list)  # (delta logp, context, pos, target)
    contexts: int = 0  # contexts run


@torch.no_grad()
def run_ablations(sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, c: Cached, jobs: list[Job], mode: str,
                  rows: int = 8, chunk: int = 4, progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fill each job's per-context ablated CE sums; returns (clean CE sum [C], scored tokens [C], counts)."""
    C = c.ids.shape[0]
    clean_sum = np.zeros(C)
    n_tok = c.score.sum(1).cpu().numpy().astype(np.float64)
    for j in jobs:
        j.ablated = np.zeros(C)
    fired = c.z > 0  # [C, T, N]
    differs = fired if mode == "zero" else (c.z != c.mean) & c.keep[..., None]
    forwards = rows_run = 0
    for s in tqdm(range(0, C, chunk), desc="ablate", disable=not progress, leave=False):
        ctx = torch.arange(s, min(C, s + chunk), device=c.ids.device)
        lp_clean = F.log_softmax(_logits(loaded, hp, c, ctx, None)[:, :-1].float(), -1)  # [b, T-1, V]
        forwards += 1
        tgt = c.ids[ctx, 1:]
        ce_clean = -lp_clean.gather(-1, tgt[..., None]).squeeze(-1)  # [b, T-1]
        sc = c.score[ctx]
        clean_sum[ctx.cpu().numpy()] = (ce_clean * sc).sum(1).double().cpu().numpy()
        for j in jobs:
            j.ablated[ctx.cpu().numpy()] = clean_sum[ctx.cpu().numpy()]  # unaffected contexts: unchanged
        work = [(j, int(b)) for j in jobs for b in range(len(ctx)) if bool(differs[ctx[b]][:, j.cols].any())]
        for w in range(0, len(work), rows):
            part = work[w:w + rows]
            local = torch.tensor([b for _, b in part], device=ctx.device)
            delta = _delta(sae, c, ctx[local], [j.cols for j, _ in part], mode)
            lp = F.log_softmax(_logits(loaded, hp, c, ctx[local], delta)[:, :-1].float(), -1)  # [r, T-1, V]
            forwards += 1
            rows_run += len(part)
            t_lp = lp.gather(-1, tgt[local][..., None]).squeeze(-1)  # [r, T-1] log p of the targets
            t_clean = lp_clean[local].gather(-1, tgt[local][..., None]).squeeze(-1)
            for r, (j, b) in enumerate(part):
                ci = int(ctx[b])
                j.ablated[ci] = float((-t_lp[r] * sc[b]).sum())
                j.contexts += 1
                where = fired[ci][:-1][:, j.cols].any(-1) & c.keep[ci][:-1]  # positions where a latent fired
                if bool(where.any()):
                    m = (lp[r][where] - lp_clean[b][where]).double().sum(0)
                    j.moves = m if j.moves is None else j.moves + m
                    j.moved_positions += int(where.sum())
                td = torch.where(sc[b], t_lp[r] - t_clean[r], torch.full_like(t_lp[r], float("inf")))
                vals, pos = td.topk(min(5, td.shape[0]), largest=False)
                j.drops += [(float(v), ci, int(p), int(tgt[b][p])) for v, p in zip(vals, pos, strict=True)
                            if torch.isfinite(v) and v < 0]
                j.drops = sorted(j.drops)[:5]
    full_equiv = len(jobs) * -(-C // chunk)
    return clean_sum, n_tok, {"forward_passes": forwards, "ablated_rows": rows_run,
                              "rows_if_every_context": len(jobs) * C, "full_pass_batches_equivalent": full_equiv}


@torch.no_grad()
def full_pass_ce(sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, c: Cached, cols: list[int] | None,
                 mode: str, chunk: int = 4) -> tuple[float, float]:
    """The reference: (sum of CE, scored tokens) from plain full forward passes over every context with
    the latents `cols` (columns of c.z; None: none) ablated by a `replace` patch at the hook (no cache,
    no skipping). Delta CE = (ablated sum - clean sum) / tokens."""
    total = n = 0.0
    for s in range(0, c.ids.shape[0], chunk):
        ctx = torch.arange(s, min(c.ids.shape[0], s + chunk), device=c.ids.device)
        fn = None
        if cols is not None:
            delta = _delta(sae, c, ctx, [cols] * len(ctx), mode)
            fn = lambda x, delta=delta: x + delta.to(x.dtype)  # noqa: E731
        lp = F.log_softmax(run_with_patch(loaded.model, hp, fn, c.ids[ctx], c.mask[ctx])[:, :-1].float(), -1)
        sc = c.score[ctx]
        total += float((-lp.gather(-1, c.ids[ctx, 1:][..., None]).squeeze(-1) * sc).sum())
        n += float(sc.sum())
    return total, n


def ablate(cfg: AblateSettings, sae: SparseCoder, loaded: LoadedModel, hp: HookPoint, positions: Positions,
           model_name: str, progress: bool = True) -> AblateResult:
    """Delta CE (with a CI over contexts) and the moved tokens for each latent of cfg.latents (or the
    top cfg.top), and for the whole set when cfg.joint."""
    device = loaded.device
    sae = sae.to(device).eval()
    reset_peak(device)
    t0 = time.perf_counter()
    c = cache(cfg, sae, loaded, hp, positions, list(cfg.latents) or None, cfg.top)
    t1 = time.perf_counter()
    jobs = [Job(f"latent_{i}", [k]) for k, i in enumerate(c.latents)]
    if cfg.joint and len(c.latents) > 1:
        jobs.append(Job("joint", list(range(len(c.latents)))))
    clean_sum, n_tok, counts = run_ablations(sae, loaded, hp, c, jobs, cfg.mode, cfg.rows, progress=progress)
    t2 = time.perf_counter()
    tok = loaded.tokenizer
    lens = logit_lens(loaded.model, sae.W_dec.detach()[c.latents], k=cfg.top_tokens) \
        if hp.kind in ("resid_pre", "resid_post") and not sae.transcoder else None

    def cmp(j: Job):
        return compare((j.ablated, n_tok), (clean_sum, n_tok), cfg.bootstrap, cfg.seed, unit="context",
                       sides=f"a = CE with {j.name} {cfg.mode}-ablated, b = CE clean (SAE spliced, error kept)")

    def moves(j: Job) -> dict[str, list]:
        if j.moves is None:
            return {"promoted": [], "suppressed": []}
        m = (j.moves / max(j.moved_positions, 1)).float()
        k = min(cfg.top_tokens, m.shape[0])
        lo, hi = m.topk(k, largest=False), m.topk(k)
        return {"promoted": [[tok.decode([int(t)]), round(float(v), 4)] for v, t in zip(lo.values, lo.indices,
                                                                                       strict=True)],
                "suppressed": [[tok.decode([int(t)]), round(float(v), 4)] for v, t in zip(hi.values, hi.indices,
                                                                                         strict=True)]}

    def drops(j: Job) -> list[dict[str, Any]]:
        return [{"delta_logprob": round(v, 4), "context": ci, "position": p, "target": tok.decode([t]),
                 "before": tok.decode(c.ids[ci, max(0, p - 7):p + 1].tolist(), skip_special_tokens=True)}
                for v, ci, p, t in j.drops]

    per_latent = []
    for k, j in enumerate(jobs[: len(c.latents)]):
        lt = lens.tokens(tok, k) if lens is not None else {}
        per_latent.append(LatentAblation(
            latent=c.latents[k], fire_fraction=float(c.fire_fraction[k]), mean_activation=float(c.mean[k]),
            contexts_changed=j.contexts, delta_ce=cmp(j), moves=moves(j), target_drops=drops(j),
            lens=lt))
    joint = next((j for j in jobs if j.name == "joint"), None)
    t3 = time.perf_counter()
    return AblateResult(
        model=model_name, hook=str(hp), mode=cfg.mode, text=cfg.text, split=cfg.split,
        contexts=int(c.ids.shape[0]), tokens=int(n_tok.sum()), ce_clean=float(clean_sum.sum() / n_tok.sum()),
        latents=per_latent, joint=cmp(joint) if joint is not None else None,
        joint_moves=moves(joint) if joint is not None else None, positions=positions.to_dict(),
        excluded=c.excluded, engine={**counts, "suffix_forward": hp.kind in ("resid_pre", "resid_post")},
        definitions=DEFINITIONS, seed=cfg.seed,
        wall_seconds={"cache": round(t1 - t0, 2), "ablate": round(t2 - t1, 2), "total": round(t3 - t0, 2)},
        device=describe(device), peak_memory_bytes=peak_memory_bytes(device))


DEFINITIONS = {
    "ablation": "z_i -> a_i for the ablated latents (zero: a_i = 0; mean: the latent's mean activation over the eval "
                "tokens, zeros included) with the SAE spliced in at the kept positions and its error term kept: the "
                "activation moves by sum_i (a_i - z_i) W_dec[i]",
    "delta_ce": "mean next-token CE with the ablation - without, over the predictions made at kept positions whose "
                "target is a real token (nats); 95% CI: paired percentile bootstrap over contexts",
    "moves": "mean over the positions where the latent fired of log p_ablated(v) - log p_clean(v); promoted: the most "
             "negative (ablating the latent lowers them), suppressed: the most positive",
    "target_drops": "the scored predictions whose target token's log-probability fell most",
    "lens": "logit lens of the latent's decoder row (saelab.intervene.lens)",
}
