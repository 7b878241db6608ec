"""Core eval on held-out text: reconstruction, sparsity, dead latents, CE/KL with the SAE
spliced into the model. Only positions kept by harvesting (no BOS, padding or special
tokens) are reconstructed or spliced; elsewhere the model runs clean.
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
from saelab.evals.metrics import Moments, ce_loss_recovered, token_ce, token_kl
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


def evaluate(cfg: EvalConfig, loaded: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the core eval for the SAE in `cfg.run`; writes eval.json and updates summary.json."""
    run = RunDir(cfg.run)
    previous = run.path / "eval.json"
    if previous.is_file() and read_json(previous).get("config") == cfg.model_dump(mode="json"):
        return read_json(previous)  # this run was already evaluated with this exact config
    sae, meta = load_sae(run.checkpoint_dir)
    model_name = cfg.model or meta["model"]
    loaded = loaded or load_model(model_name, dtype=cfg.dtype)
    hp = resolve(loaded.model, meta["hook"])
    d_model = loaded.model.config.hidden_size
    if sae.cfg.d_in != d_model:
        raise ValueError(f"SAE d_in {sae.cfg.d_in} (hook {meta['hook']}) does not match model "
                         f"{model_name!r} width {d_model}")
    prepend_bos = _store_prepend_bos(meta)
    sae.eval()
    t0 = time.perf_counter()
    recon = reconstruction_metrics(sae, loaded, hp, _validation_batches(cfg, loaded, prepend_bos),
                                   cfg.tokens, progress)
    t1 = time.perf_counter()
    ce = ce_metrics(sae, loaded, hp, _validation_batches(cfg, loaded, prepend_bos), cfg.ce_tokens, progress)
    t2 = time.perf_counter()
    result = {
        "stage": "eval", "suite": "core", "run": str(run.path), "model": model_name, "hook": str(hp),
        "text": cfg.text, "split": cfg.split, **recon, **ce,
        "definitions": {
            "explained_variance": "1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 (variance around the mean over eval tokens)",
            "ce_loss_recovered": "(CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean)",
            "kl_to_clean": "mean over tokens of KL(p_clean || p_sae), nats",
            "dead_fraction": "fraction of latents that never fired on the eval tokens",
        },
        "wall_seconds": {"reconstruction": round(t1 - t0, 2), "ce": round(t2 - t1, 2)},
        "config": cfg.model_dump(mode="json"),
    }
    write_json(run.path / "eval.json", result)
    if run.complete:
        summary = run.summary()
        summary["eval"] = {k: result[k] for k in ("explained_variance", "fvu", "mse", "l0", "dead_fraction",
                                                  "ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered",
                                                  "kl_to_clean", "eval_tokens", "ce_tokens")}
        run.write_summary(summary)
    return result


def _store_prepend_bos(meta: dict[str, Any]) -> bool:
    """Evaluate with the same BOS convention the SAE was trained with."""
    store = meta.get("store")
    if store and (Path(store) / "manifest.json").is_file():
        return bool(read_json(Path(store) / "manifest.json").get("prepend_bos", True))
    return True


@torch.no_grad()
def reconstruction_metrics(sae: SparseCoder, loaded: LoadedModel, hp, stream, n_tokens: int,
                           progress: bool) -> dict[str, Any]:
    moments = Moments(sae.cfg.d_in)
    fired = torch.zeros(sae.cfg.width, dtype=torch.bool)
    l0_sum = 0.0
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="eval reconstruction", disable=not progress)
    for batch in stream:
        if moments.n >= n_tokens:
            break
        acts = capture(loaded.model, [hp], batch.input_ids, batch.attention_mask)[hp]
        keep, _ = keep_mask(batch, loaded.tokenizer, True)
        x = acts[keep].float()[: n_tokens - moments.n]  # [tokens, d]
        z = sae.encode(x)
        x_hat = sae.decode(z)
        moments.update(x, x_hat)
        fired |= (z != 0).any(0)
        l0_sum += float((z != 0).sum())
        bar.update(x.shape[0])
    bar.close()
    if moments.n == 0:
        raise ValueError("the validation text produced no tokens to evaluate")
    ev = moments.explained_variance()
    return {"eval_tokens": moments.n, "explained_variance": ev, "fvu": 1 - ev, "mse": moments.mse(),
            "l0": l0_sum / moments.n, "dead_fraction": float((~fired).float().mean())}


@torch.no_grad()
def ce_metrics(sae: SparseCoder, loaded: LoadedModel, hp, stream, n_tokens: int,
               progress: bool) -> dict[str, Any]:
    """Clean, SAE-spliced and zero-ablated next-token CE, and KL(clean || spliced)."""
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
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
        flat = {k: v[:, :-1][target_ok] for k, v in logits.items()}  # [tokens, vocab]
        for k in ("clean", "sae", "zero"):
            sums[k] += float(token_ce(flat[k], targets).sum())
        sums["kl"] += float(token_kl(flat["clean"], flat["sae"]).sum())
        n += targets.shape[0]
        bar.update(targets.shape[0])
    bar.close()
    if n == 0:
        raise ValueError("the validation text produced no tokens to score")
    ce = {k: sums[k] / n for k in ("clean", "sae", "zero")}
    return {"ce_tokens": n, "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"],
            "ce_loss_recovered": ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
            "kl_to_clean": sums["kl"] / n}

