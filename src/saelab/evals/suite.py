"""`saelab eval --suite core,probing,absorption,control RUN_DIR`: run the chosen evals on one
SAE, write each result into the run directory (eval.json for core, eval_<name>.json for the
others, eval_suite.json with every eval's wall time) and return them. An eval whose result
file already holds the same config is reused, not recomputed.
"""

from __future__ import annotations

import time
from typing import Any

from saelab.config import EvalConfig
from saelab.evals.absorption import absorption
from saelab.evals.control import randomized_control
from saelab.evals.core import evaluate, open_run
from saelab.evals.probing import sparse_probing
from saelab.io import read_json, write_json
from saelab.models.load import LoadedModel
from saelab.runs.rundir import RunDir

_SHARED = ("run", "text", "text_field", "split", "model", "ctx_len", "batch_size", "dtype", "seed")


def _eval_config(cfg: EvalConfig, name: str) -> dict[str, Any]:
    """What one eval's result depends on: the shared fields, its own section (control: also probing)."""
    d = cfg.model_dump(mode="json")
    keep = {k: d[k] for k in _SHARED} | {name: d[name]}
    if name == "control":
        keep |= {"probing": d["probing"]}
    return keep


def run_suite(cfg: EvalConfig, loaded: LoadedModel | None = None, progress: bool = True) -> dict[str, Any]:
    run = RunDir(cfg.run)
    if not (run.checkpoint_dir / "cfg.json").is_file():
        raise FileNotFoundError(f"run directory {run.path} has no checkpoint/cfg.json (is it a trained run?)")
    sae, meta, loaded, hp, prepend_bos = open_run(run, cfg, loaded)
    results, walls, reused = {}, {}, []
    for name in cfg.suite:
        t0 = time.perf_counter()
        if name == "core":
            results[name] = evaluate(cfg, loaded=loaded, progress=progress)
        else:
            path = run.path / f"eval_{name}.json"
            key = _eval_config(cfg, name)
            if path.is_file() and read_json(path).get("config") == key:
                results[name] = read_json(path)
                reused.append(name)
            else:
                fn = {"probing": lambda: sparse_probing(cfg.probing, sae, loaded, hp, prepend_bos, progress, cfg.seed),
                      "absorption": lambda: absorption(cfg.absorption, sae, loaded, hp, prepend_bos, progress, cfg.seed),
                      "control": lambda: randomized_control(cfg, sae, meta, loaded, hp, prepend_bos, progress)}[name]
                r = fn()
                r.update({"stage": "eval", "suite": name, "run": str(run.path), "model": cfg.model or meta["model"],
                          "hook": str(hp), "eval_wall_seconds": round(time.perf_counter() - t0, 2), "config": key})
                write_json(path, r)
                results[name] = r
        walls[name] = round(time.perf_counter() - t0, 2)
        if name == "core" and time.perf_counter() - t0 < results[name]["wall_seconds"]["total"]:
            reused.append(name)
        if name in reused:  # report the time the stored result took to compute
            stored = results[name]
            walls[name] = stored["wall_seconds"]["total"] if name == "core" else stored["eval_wall_seconds"]
    write_json(run.path / "eval_suite.json", {"run": str(run.path), "suite": cfg.suite, "wall_seconds": walls,
                                              "reused": reused})
    return {"results": results, "wall_seconds": walls, "reused": reused}


def format_suite(out: dict[str, Any]) -> str:
    """A plain-text table of the headline numbers of each eval that ran."""
    lines = []
    r = out["results"]

    def ci(c: list[float]) -> str:
        return f"[{c[0]:+.3f}, {c[1]:+.3f}]"

    if "core" in r:
        c = r["core"]
        lines.append("core")
        for k in ("explained_variance", "explained_variance_legacy", "mse", "l0", "l1", "cosine_similarity",
                  "l2_ratio", "relative_reconstruction_bias", "dead_fraction", "ce_clean", "ce_sae", "ce_zero",
                  "ce_mean", "ce_loss_recovered", "ce_loss_recovered_mean_ablation", "kl_to_clean"):
            if k in c:
                lines.append(f"  {k:<34} {c[k]:.4f}")
        for t, v in c.get("dense_fraction", {}).items():
            lines.append(f"  {'dense_fraction > ' + t:<34} {v:.4f}")
    if "probing" in r:
        p = r["probing"]
        ks = p["ks"]
        lines.append("probing (test accuracy; SAE top-k vs residual top-k, diff [95% CI])")
        lines.append(f"  {'task':<16} " + " ".join(f"{'k=' + str(k):>26}" for k in ks) + f" {'all vs full resid':>26}")
        for t, v in p["tasks"].items():
            cells = []
            for key in [f"k{k}" for k in ks] + ["all"]:
                cm = v["comparisons"][key]
                cells.append(f"{cm['a']:.2f}/{cm['b']:.2f} {cm['diff']:+.2f}{ci(cm['diff_ci95'])}")
            lines.append(f"  {t:<16} " + " ".join(f"{x:>26}" for x in cells))
        for t, why in p.get("skipped", {}).items():
            lines.append(f"  {t:<16} skipped: {why}")
    if "absorption" in r:
        a = r["absorption"]
        lines.append(f"absorption ({a['letters']} letters, {a['words']} words)")
        for k in ("absorption_fraction", "full_absorption_rate"):
            lines.append(f"  {k:<34} {a[k]['mean']:.4f} {ci(a[k]['ci95'])}")
        lines.append(f"  {'split latents (letters with split)':<34} {a['split_latents_total']} ({a['letters_with_split']})")
        lines.append(f"  {'mean probe F1 (residual / SAE k=1)':<34} {a['mean_probe_f1']:.3f} / {a['mean_sparse_probe_f1_k1']:.3f}")
    if "control" in r:
        lines.append("randomized-model control (real, random, real - random [95% CI])")
        for k, g in r["control"]["gaps"].items():
            lines.append(f"  {k:<34} {g['a']:.4f} {g['b']:.4f} {g['diff']:+.4f} {ci(g['diff_ci95'])}")
    lines.append("wall seconds: " + ", ".join(f"{k} {v:.1f}" + (" (stored)" if k in out.get("reused", ()) else "")
                                              for k, v in out["wall_seconds"].items()))
    return "\n".join(lines)
