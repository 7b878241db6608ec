"""The whole loop on the embedded defaults: harvest -> train -> eval, then a summary table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from saelab.activations.harvest import harvest
from saelab.config import EvalConfig, HarvestConfig, QuickstartConfig, SAEConfig, TrainConfig
from saelab.evals.core import evaluate
from saelab.models.load import load_model
from saelab.train.trainer import train


def quickstart(cfg: QuickstartConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or reuse) each stage; returns the final summary (also in <run>/summary.json)."""
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, dtype=cfg.dtype)
    hcfg = HarvestConfig(model=cfg.model, hook=cfg.hook, tokens=cfg.harvest_tokens, dtype=cfg.dtype,
                         seed=cfg.seed)
    hcfg.out = str(Path(cfg.runs_dir) / "stores" / hcfg.store_name())
    store = harvest(hcfg, loaded=loaded, progress=progress)
    t1 = time.perf_counter()
    tcfg = TrainConfig(store=str(store.path), name=f"{cfg.name}-{cfg.hash()[:8]}", runs_dir=cfg.runs_dir,
                       sae=SAEConfig(width=cfg.width, k=cfg.k), tokens=cfg.train_tokens,
                       batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    run = train(tcfg, progress=progress)
    t2 = time.perf_counter()
    evaluate(EvalConfig(run=str(run.path), tokens=cfg.eval_tokens, ce_tokens=cfg.ce_tokens,
                        dtype=cfg.dtype, seed=cfg.seed), loaded=loaded, progress=progress)
    t3 = time.perf_counter()
    summary = run.summary()
    # keep the timings of the run that did the work; a rerun that reuses every stage takes ~0 s
    summary.setdefault("quickstart_seconds", {"harvest": round(t1 - t0, 1),
                                     "train": round(t2 - t1, 1), "eval": round(t3 - t2, 1),
                                     "total": round(t3 - t0, 1)})
    summary["run_dir"] = str(run.path)
    run.write_summary(summary)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    e = s["eval"]
    rows = [
        ("model / hook", f"{s['model']} / {s['hook']}"),
        ("SAE", f"{s['architecture']}  width {s['width']}  k {s['k']}  d_in {s['d_in']}"),
        ("trained on", f"{s['tokens']:,} tokens in {s['wall_seconds']:.0f} s ({s['tokens_per_second']:,.0f} tok/s)"),
        ("explained variance", f"{e['explained_variance']:.3f}   (FVU {e['fvu']:.3f}, MSE {e['mse']:.4g})"),
        ("L0", f"{e['l0']:.1f}"),
        ("CE loss recovered", f"{e['ce_loss_recovered']:.3f}   (clean {e['ce_clean']:.3f}, SAE {e['ce_sae']:.3f}, "
                              f"zero-ablated {e['ce_zero']:.3f} nats)"),
        ("KL to clean", f"{e['kl_to_clean']:.4f} nats/token"),
        ("dead latents", f"{e['dead_fraction']:.4f} of latents never fired on {e['eval_tokens']:,} eval tokens"),
        ("eval tokens", f"{e['eval_tokens']:,} reconstruction, {e['ce_tokens']:,} CE (validation split)"),
    ]
    if "quickstart_seconds" in s:
        q = s["quickstart_seconds"]
        rows.append(("wall time", f"{q['total']:.0f} s (harvest {q['harvest']:.0f}, train {q['train']:.0f}, "
                                  f"eval {q['eval']:.0f})"))
    if "run_dir" in s:
        rows.append(("run directory", s["run_dir"]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
