"""Core eval on held-out text (SAEBench core metrics): reconstruction (MSE, explained variance
and its legacy variant, cosine, L2 ratio, relative reconstruction bias), sparsity (L0, L1), dead
and dense latents, the feature-density histogram, the most similar decoder pairs, and CE/KL
with the SAE spliced into the model against zero- and mean-ablation. Only positions kept by
harvesting (no BOS, padding or special tokens) are reconstructed or spliced; elsewhere the
model runs clean.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelab.config import EvalConfig
from saelab.data.corpus import iter_documents
from saelab.data.tokens import batches, contexts, keep_mask, shuffled
from saelab.evals.metrics import (
    Moments,
    ce_loss_recovered,
    density_histogram,
    explained_variance_legacy,
    most_similar_decoder_pairs,
    token_ce,
    token_kl,
)
from saelab.io import read_json, write_json
from saelab.models.hooks import capture, resolve, run_with_patch
from saelab.models.load import LoadedModel, load_model
from saelab.runs.rundir import RunDir
from saelab.saes.base import SparseCoder, load_sae


def _validation_batches(cfg: EvalConfig, loaded: LoadedModel, prepend_bos: bool):
    docs = shuffled(iter_documents(cfg.text, cfg.split, cfg.text_field), cfg.seed)
    if not docs:
        raise ValueError(f"text source {cfg.text!r} has no documents in split {cfg.split!r}")
    return batches(contexts(docs, loaded.tokenizer, cfg.ctx_len, prepend_bos), cfg.batch_size,
                   loaded.tokenizer.pad_token_id)


CORE_KEYS = ("explained_variance", "fvu", "mse", "l0", "l1", "cosine_similarity", "l2_ratio",
             "relative_reconstruction_bias", "dead_fraction", "ce_clean", "ce_sae", "ce_zero", "ce_mean",
             "ce_loss_recovered", "ce_loss_recovered_mean_ablation", "kl_to_clean", "eval_tokens", "ce_tokens")
DEFINITIONS = {
    "explained_variance": "1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2, variance around the mean over all eval "
                          "tokens (Gao et al. 2024; SAEBench core)",
    "explained_variance_legacy": "LEGACY (older SAELens): mean over tokens of 1 - ||x - x_hat||^2 / ||x - "
                                 "mean_batch(x)||^2; a mean of ratios, not comparable to explained_variance",
    "l0": "mean number of nonzero latents per token", "l1": "mean sum |z| per token",
    "cosine_similarity": "mean over tokens of cos(x, x_hat)", "l2_ratio": "mean over tokens of ||x_hat|| / ||x||",
    "relative_reconstruction_bias": "E||x_hat||^2 / E[x . x_hat] (Wright & Sharkey 2024); 1 = unbiased",
    "ce_loss_recovered": "(CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean)",
    "ce_loss_recovered_mean_ablation": "(CE_mean_ablation - CE_sae) / (CE_mean_ablation - CE_clean), mean = "
                                       "the hook's mean activation over the eval tokens",
    "kl_to_clean": "mean over tokens of KL(p_clean || p_sae), nats",
    "dead_fraction": "fraction of latents that never fired on the eval tokens (eval_tokens of them)",
    "dense_fraction": "fraction of latents firing on more than the threshold fraction of eval tokens",
    "excluded": "BOS, padding and other special tokens are excluded from every metric",
}


def check_compatible(sae: SparseCoder, meta: dict[str, Any], loaded: LoadedModel, model_name: str):
    """The SAE's hook must exist in the model and its d_in must equal the model width; refuse
    with both values otherwise. Returns the resolved hook point."""
    try:
        hp = resolve(loaded.model, meta["hook"])
    except ValueError as e:
        raise ValueError(f"SAE hook {meta['hook']!r} does not exist in model {model_name!r}: {e}") from None
    d_model = loaded.model.config.hidden_size
    if sae.cfg.d_in != d_model:
        raise ValueError(f"SAE d_in {sae.cfg.d_in} (hook {meta['hook']}) does not match model "
                         f"{model_name!r} width {d_model}")
    return hp


def _core_config(cfg: EvalConfig) -> dict[str, Any]:
    """The fields the core eval depends on (so adding other evals to the suite keeps it reusable)."""
    return cfg.model_dump(mode="json", exclude={"suite", "probing", "absorption", "control"})


def open_run(run: RunDir, cfg: EvalConfig, loaded: LoadedModel | None = None):
    """The run's SAE (eval mode) and cfg.json, the model (loaded unless given), the checked hook
    point, and the BOS convention the SAE was trained with."""
    sae, meta = load_sae(run.checkpoint_dir)
    model_name = cfg.model or meta["model"]
    loaded = loaded or load_model(model_name, dtype=cfg.dtype)
    hp = check_compatible(sae, meta, loaded, model_name)
    return sae.eval(), meta, loaded, hp, _store_prepend_bos(meta)


def evaluate(cfg: EvalConfig, loaded: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the core eval for the SAE in `cfg.run`; writes eval.json and updates summary.json."""
    run = RunDir(cfg.run)
    previous = run.path / "eval.json"
    if previous.is_file() and read_json(previous).get("config") == _core_config(cfg):
        return read_json(previous)  # this run was already evaluated with this exact config
    sae, meta, loaded, hp, prepend_bos = open_run(run, cfg, loaded)
    model_name = cfg.model or meta["model"]
    t0 = time.perf_counter()
    recon = reconstruction_metrics(sae, loaded, hp, _validation_batches(cfg, loaded, prepend_bos),
                                   cfg.tokens, progress, cfg.dense_thresholds)
    mean_act = torch.tensor(recon.pop("mean_activation"))
    t1 = time.perf_counter()
    ce = ce_metrics(sae, loaded, hp, _validation_batches(cfg, loaded, prepend_bos), cfg.ce_tokens, progress,
                    mean_act=mean_act)
    t2 = time.perf_counter()
    pairs = most_similar_decoder_pairs(sae.W_dec.detach(), cfg.similar_pairs)
    t3 = time.perf_counter()
    result = {
        "stage": "eval", "suite": "core", "run": str(run.path), "model": model_name, "hook": str(hp),
        "text": cfg.text, "split": cfg.split, **recon, **ce, "similar_decoder_pairs": pairs,
        "definitions": DEFINITIONS,
        "wall_seconds": {"reconstruction": round(t1 - t0, 2), "ce": round(t2 - t1, 2),
                         "decoder_pairs": round(t3 - t2, 2), "total": round(t3 - t0, 2)},
        "config": _core_config(cfg),
    }
    write_json(run.path / "eval.json", result)
    if run.complete:
        summary = run.summary()
        summary["eval"] = {k: result[k] for k in CORE_KEYS}
        run.write_summary(summary)
    return result


def _store_prepend_bos(meta: dict[str, Any]) -> bool:
    """Evaluate with the same BOS convention the SAE was trained with."""
    store = meta.get("store")
    if store and (Path(store) / "manifest.json").is_file():
        return bool(read_json(Path(store) / "manifest.json").get("prepend_bos", True))
    return True


@torch.no_grad()
def reconstruction_metrics(sae: SparseCoder, loaded: LoadedModel, hp, stream, n_tokens: int, progress: bool,
                           dense_thresholds: tuple[float, ...] | list[float] = (0.1, 0.01),
                           units: dict[str, list] | None = None) -> dict[str, Any]:
    """Reconstruction and sparsity metrics over n_tokens kept tokens of the stream.

    units: if given, per-context sums are appended to it ("sse", "sumsq", "sum" [d], "n") so a
    caller can bootstrap explained variance over contexts (saelab.evals.stats)."""
    moments = Moments(sae.cfg.d_in)
    fires = torch.zeros(sae.cfg.width, dtype=torch.float64)  # tokens each latent fired on
    sums = {"l0": 0.0, "l1": 0.0, "cos": 0.0, "l2_ratio": 0.0, "ev_legacy": 0.0, "xhat_sq": 0.0, "x_dot_xhat": 0.0}
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="eval reconstruction", disable=not progress)
    for batch in stream:
        if moments.n >= n_tokens:
            break
        acts = capture(loaded.model, [hp], batch.input_ids, batch.attention_mask)[hp]
        keep, _ = keep_mask(batch, loaded.tokenizer, True)
        ctx = keep.nonzero()[:, 0][: n_tokens - moments.n]  # [tokens] context of each kept token
        x = acts[keep].float()[: n_tokens - moments.n]  # [tokens, d]
        z = sae.encode(x)  # [tokens, width]
        x_hat = sae.decode(z)
        moments.update(x, x_hat)
        active = z != 0
        fires += active.sum(0).double()
        sums["l0"] += float(active.sum())
        sums["l1"] += float(z.abs().sum())
        sums["cos"] += float(torch.nn.functional.cosine_similarity(x_hat.double(), x.double(), dim=-1).sum())
        sums["l2_ratio"] += float((x_hat.double().norm(dim=-1) / x.double().norm(dim=-1).clamp_min(1e-12)).sum())
        sums["ev_legacy"] += float(explained_variance_legacy(x, x_hat).sum())
        sums["xhat_sq"] += float(x_hat.double().pow(2).sum())
        sums["x_dot_xhat"] += float((x.double() * x_hat.double()).sum())
        if units is not None:
            for c in ctx.unique():
                sel = ctx == c
                xs, hs = x[sel].double(), x_hat[sel].double()
                units["sse"].append(float((xs - hs).pow(2).sum()))
                units["sumsq"].append(float(xs.pow(2).sum()))
                units["sum"].append(xs.sum(0))
                units["n"].append(int(sel.sum()))
        bar.update(x.shape[0])
    bar.close()
    if moments.n == 0:
        raise ValueError("the validation text produced no tokens to evaluate")
    n = moments.n
    ev = moments.explained_variance()
    freq = fires / n
    return {
        "eval_tokens": n, "explained_variance": ev, "fvu": 1 - ev, "explained_variance_legacy": sums["ev_legacy"] / n,
        "mse": moments.mse(), "l0": sums["l0"] / n, "l1": sums["l1"] / n, "cosine_similarity": sums["cos"] / n,
        "l2_ratio": sums["l2_ratio"] / n, "relative_reconstruction_bias": sums["xhat_sq"] / sums["x_dot_xhat"],
        "dead_fraction": float((fires == 0).double().mean()), "dead_latents": int((fires == 0).sum()),
        "dense_fraction": {str(t): float((freq > t).double().mean()) for t in dense_thresholds},
        "dense_latents": {str(t): int((freq > t).sum()) for t in dense_thresholds},
        "feature_density_histogram": density_histogram(freq),
        "mean_activation": (moments.sum / n).float().tolist(),
    }


@torch.no_grad()
def ce_metrics(sae: SparseCoder, loaded: LoadedModel, hp, stream, n_tokens: int,
               progress: bool, mean_act: torch.Tensor | None = None) -> dict[str, Any]:
    """Clean, SAE-spliced, zero-ablated (and, given mean_act [d], mean-ablated) next-token CE,
    and KL(clean || spliced)."""
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0, "kl": 0.0}
    n = 0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="eval CE/KL", disable=not progress)
    for batch in stream:
        if n >= n_tokens:
            break
        keep, _ = keep_mask(batch, loaded.tokenizer, True)
        # score predictions of tokens 1..T-1 whose target is a real (non-pad) token
        target_ok = batch.attention_mask[:, 1:].bool()
        targets = batch.input_ids[:, 1:][target_ok]

        def splice(fn, keep=keep):
            def patch(x):  # x: [B, T, d]
                y = x.clone()
                y[keep] = fn(x[keep].float()).to(x.dtype)
                return y
            return patch

        logits = {
            "clean": run_with_patch(loaded.model, hp, None, batch.input_ids, batch.attention_mask),
            "sae": run_with_patch(loaded.model, hp, splice(sae.reconstruct), batch.input_ids, batch.attention_mask),
            "zero": run_with_patch(loaded.model, hp, splice(torch.zeros_like), batch.input_ids, batch.attention_mask),
        }
        if mean_act is not None:
            logits["mean"] = run_with_patch(loaded.model, hp, splice(lambda x: mean_act.expand_as(x)),
                                            batch.input_ids, batch.attention_mask)
        flat = {k: v[:, :-1][target_ok] for k, v in logits.items()}  # [tokens, vocab]
        for k in flat:
            sums[k] += float(token_ce(flat[k], targets).sum())
        sums["kl"] += float(token_kl(flat["clean"], flat["sae"]).sum())
        n += targets.shape[0]
        bar.update(targets.shape[0])
    bar.close()
    if n == 0:
        raise ValueError("the validation text produced no tokens to score")
    ce = {k: sums[k] / n for k in ("clean", "sae", "zero", "mean")}
    out = {"ce_tokens": n, "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
           "ce_loss_recovered": ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
           "kl_to_clean": sums["kl"] / n}
    if mean_act is not None:
        out["ce_mean"] = ce["mean"]
        out["ce_loss_recovered_mean_ablation"] = ce_loss_recovered(ce["clean"], ce["sae"], ce["mean"])
    return out

