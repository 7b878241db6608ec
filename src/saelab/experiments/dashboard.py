"""`saelab dashboard RUN`: gather what a run has about each latent and write the feature dashboard.

Per latent, from the examples pass over held-out text (interp/examples.py; its state is the one
`saelab interpret` keeps in RUN/interp/, so a run interpreted with the same example settings
costs one window pass more): density, mean and max activation, a histogram of activations,
top contexts, contexts from equal-count activation quantile bands, corpus domains; from the
weights: the logit lens and the nearest latents by decoder cosine. Then whatever other stages
left in the run directory, joined per latent: explanations and scores (interp/interp.json),
label validation, probing usefulness (probe/analyses.json: tasks where it is a top latent),
absorption role (eval_absorption.json: letters it is a main latent of), ablation effect
(ablate/*.json) and steering result (steer/*.json). What is missing is listed with the
command that computes it."""

from __future__ import annotations

import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from pydantic import Field

from saelab.config import Config
from saelab.dashboard.build import Column, SiteData, write_site
from saelab.experiments.evaluate import open_run
from saelab.experiments.interpret import examples_fingerprint
from saelab.interp.examples import (
    ExamplesConfig,
    band_sample,
    collect_examples,
    documents,
    quantile_bands,
    read_windows,
)
from saelab.interp.select import nearest_latents
from saelab.intervene.lens import logit_lens
from saelab.io import read_json, stable_hash, write_json
from saelab.models.load import LoadedModel


class DashboardConfig(Config):
    """Build the feature dashboard of a run directory."""

    run: str = Field(..., description="run directory holding checkpoint/")
    out: str = Field("", description="dashboard folder (default RUN/dashboard); open its index.html")
    model: str | None = Field(None, description="model override (default: the one the coder was trained on)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    examples: ExamplesConfig = ExamplesConfig()
    top: int = Field(10, ge=1, description="top-activating contexts shown per latent")
    bands: int = Field(10, ge=1, description="equal-count activation quantile bands per latent")
    per_band: int = Field(2, ge=0, description="contexts shown per band")
    neighbours: int = Field(8, ge=0, description="nearest latents by decoder cosine")
    lens_k: int = Field(10, ge=1, description="promoted / suppressed logit-lens tokens")
    bins: int = Field(30, ge=2, description="bins of the activation histogram")
    seed: int = 0

    UNHASHED = Config.UNHASHED | {"out", "device"}


def examples_state_path(run: Path) -> Path:
    """Where the examples pass keeps its state: shared with `saelab interpret`."""
    return run / "interp" / "examples.safetensors"


def build_dashboard(cfg: DashboardConfig, loaded: LoadedModel | None = None, progress: bool = True
                    ) -> tuple[Path, dict[str, float]]:
    """Write the dashboard; returns the path of its index.html and the wall seconds per part."""
    t: dict[str, float] = {"start": time.perf_counter()}
    o = open_run(SimpleNamespace(run=cfg.run, model=cfg.model, dtype=cfg.examples.dtype, device=cfg.device), loaded)
    run = o.run.path
    ctx_len = cfg.examples.ctx_len or o.meta.get("ctx_len") or 128
    fp = examples_fingerprint(cfg.examples, o.run, o.model_name, ctx_len)
    out = Path(cfg.out or run / "dashboard")
    key = stable_hash({"config": cfg.hash(), "examples": fp, "results": {
        str(f.relative_to(run)): [f.stat().st_size, f.stat().st_mtime_ns] for f in _joined_files(run)}})
    stamp = out / "build.json"
    if stamp.is_file() and (out / "index.html").is_file() and (old := read_json(stamp)).get("key") == key:
        return out / "index.html", old["wall_seconds"]  # built from the same inputs: reused as it is
    state = collect_examples(cfg.examples, o.sae, o.loaded, o.hp, o.positions, ctx_len, examples_state_path(run),
                             fp, progress)
    t["examples"] = time.perf_counter()
    alive = (state.fire_contexts > 0).nonzero().squeeze(1).tolist()
    rng = random.Random(cfg.seed)
    requests: list[tuple[int, int, int]] = []
    plan: dict[int, dict[str, Any]] = {}
    for j in alive:
        sample = state.sample(j)  # a uniform sample of its activating contexts, descending
        entry: dict[str, Any] = {"top": [], "bands": [], "sample": sample}
        for _, c, p in state.top(j)[: cfg.top]:
            entry["top"].append(len(requests))
            requests.append((j, c, p))
        ranges = quantile_bands(len(sample), cfg.bands)
        entry["bands"] = [{"band": b, "lo": sample[r[-1]][0], "hi": sample[r[0]][0], "n": len(r), "idx": []}
                          for b, r in enumerate(ranges)]
        for b, (_, c, p) in band_sample(sample, cfg.bands, cfg.per_band, rng):
            entry["bands"][b]["idx"].append(len(requests))
            requests.append((j, c, p))
        plan[j] = entry
    windows = read_windows(cfg.examples, o.sae, o.loaded, o.hp, o.positions, ctx_len, requests, progress)
    t["windows"] = time.perf_counter()
    tok = o.loaded.tokenizer
    strs: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in strs:
            strs[i] = tok.decode([i])
        return strs[i]

    def win(i: int) -> dict[str, Any]:
        w = windows[i]
        return {"t": [text(x) for x in w.ids], "a": [round(a, 4) for a in w.acts], "c": w.offset, "s": w.source}

    W = o.sae.W_dec.detach().float()  # [width, d]
    lens = logit_lens(o.loaded.model, W, k=cfg.lens_k)
    near = _neighbours(W, alive, cfg.neighbours)
    t["weights"] = time.perf_counter()
    docs = documents(cfg.examples)
    joins, missing = _joins(run)
    latents, rows = {}, []
    density, mean_act = state.density(), state.mean_activation()  # [width] each, once
    for j in alive:
        pj = plan[j]
        vals = np.array([v for v, _, _ in pj["sample"]])
        counts, edges = np.histogram(vals, bins=cfg.bins, range=(0.0, float(max(vals.max(), 1e-6))))
        domains: dict[str, int] = {}
        for _, c, _ in pj["sample"]:
            s = docs[state.ctx_doc[c]].source
            domains[s] = domains.get(s, 0) + 1
        ex = joins["interp"].get(j)
        join = dict(joins["row"].get(j, {}))
        latents[j] = {
            "stats": {"density": float(density[j]), "mean_activation": float(mean_act[j]),
                      "max_activation": float(state.act_max[j]), "fire_contexts": int(state.fire_contexts[j])},
            "hist": {"edges": edges.tolist(), "counts": counts.tolist(),
                     "what": f"each context's maximum activation, over a uniform sample of {len(vals)} of the "
                             f"{int(state.fire_contexts[j])} contexts it fired in ({state.tokens:,} tokens)"},
            "lens": lens.tokens(tok, j),
            "neighbours": [[int(a), round(float(c), 4)] for a, c in near[j]],
            "domains": dict(sorted(domains.items(), key=lambda x: -x[1])),
            "domains_what": f"corpus domain of the {len(vals)} sampled activating contexts",
            "top": [win(i) for i in pj["top"]],
            "bands": [{"band": b["band"], "lo": b["lo"], "hi": b["hi"], "n": b["n"], "windows": [win(i) for i in b["idx"]]}
                      for b in pj["bands"]],
            "bands_what": (f"real quantiles: the sampled activating contexts sorted by their maximum activation and cut "
                           f"into {cfg.bands} bands of equal count (band 1 = the strongest); {cfg.per_band} drawn at "
                           "random from each"),
            "explanation": ex,
            "join": join,
        }
        rows.append({"id": j, "density": latents[j]["stats"]["density"],
                     "max_activation": latents[j]["stats"]["max_activation"],
                     "mean_activation": latents[j]["stats"]["mean_activation"],
                     "top_tokens": " ".join(x for x, _ in latents[j]["lens"]["promoted"][:5]),
                     "explanation": ex["label"] if ex else None, **join})
    t["assemble"] = time.perf_counter()
    keys = sorted({k for r in rows for k in r} - {c.key for c in BASE_COLUMNS})
    columns = BASE_COLUMNS + [Column(k, k.replace("_", " "), _kind(rows, k), help=JOIN_HELP.get(k, "")) for k in keys]
    dead = o.sae.cfg.width - len(alive)
    meta = {"title": f"saelab dashboard: {run.name}", "run": str(run), "model": o.model_name, "hook": str(o.hp),
            "subtitle": (f"{o.model_name} at {o.hp}, {o.sae.cfg.width:,} latents ({dead:,} never fired on the "
                         f"{state.tokens:,} tokens of the examples pass, {cfg.examples.text} {cfg.examples.split})"),
            "missing": missing, "interpret_command": f"saelab interpret {run}",
            "join_note": ("one row per latent: every result the run directory holds about it; "
                          "blank = not measured for this latent. Also as data/join.csv.")}
    index = write_site(SiteData(meta, columns, rows, latents), out)
    t["write"] = time.perf_counter()
    names = list(t)
    wall = {b: round(t[b] - t[a], 2) for a, b in zip(names, names[1:], strict=False)} | {
        "total": round(t["write"] - t["start"], 2)}
    write_json(stamp, {"key": key, "wall_seconds": wall})
    return index, wall


BASE_COLUMNS = [
    Column("id", "latent", index=True), Column("density", "density", index=True,
                                                help="fraction of the examples pass's tokens it fired on"),
    Column("max_activation", "max act", index=True), Column("mean_activation", "mean act"),
    Column("top_tokens", "logit lens", "text", index=True, help="top promoted tokens of its decoder direction"),
    Column("explanation", "explanation", "text", index=True),
]
JOIN_HELP = {
    "detection": "detection balanced accuracy of its default explanation (saelab interpret)",
    "fuzzing": "fuzzing balanced accuracy (saelab interpret)",
    "embedding": "embedding-scorer AUROC (saelab interpret)",
    "label_confidence": "composite label-validation confidence in [0, 1] (saelab interpret)",
    "probing_tasks": "tasks where it is among the top latents by JS separability (saelab probe)",
    "absorption_letters": "first letters it is a main latent of (saelab eval --suite absorption)",
    "ablation_delta_ce": "Delta CE when ablated (saelab ablate)",
    "steering": "its steering head-to-head, SAE latent vs DoM (saelab steer)",
}


def _kind(rows: list[dict[str, Any]], key: str) -> str:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return "num" if vals and all(isinstance(v, int | float) for v in vals) else "text"


def _neighbours(W: torch.Tensor, alive: list[int], k: int, chunk: int = 1024) -> dict[int, list[tuple[int, float]]]:
    """Each alive latent's k nearest other alive latents by decoder cosine (interp's
    nearest_latents, `chunk` latents at a time so only [chunk, width] cosines are held)."""
    if k == 0 or len(alive) < 2:
        return {j: [] for j in alive}
    mask = torch.zeros(W.shape[0], 1)
    mask[alive] = 1.0
    out = {}
    for s in range(0, len(alive), chunk):
        ids = torch.tensor(alive[s:s + chunk])
        i, v = nearest_latents(W * mask, ids, min(k, len(alive) - 1))
        out |= {int(j): list(zip(a.tolist(), b.tolist(), strict=True)) for j, a, b in zip(ids, i, v, strict=True)}
    return out


def _flat_scores(scores: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, by in (scores or {}).items():
        for scorer, d in (by or {}).items():
            for m, v in (d or {}).items() if isinstance(d, dict) else ():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{name} {scorer} {m}"] = float(v)
    return out


def _joined_files(run: Path) -> list[Path]:
    """The result files the dashboard joins per latent (a change in any rebuilds it)."""
    fixed = [run / "interp" / "interp.json", run / "probe" / "analyses.json", run / "eval_absorption.json"]
    return [f for f in fixed if f.is_file()] + sorted(run.glob("ablate/*.json")) + sorted(run.glob("steer/*.json"))


def _joins(run: Path) -> tuple[dict[str, dict[int, Any]], list[dict[str, str]]]:
    """Per-latent facts from the run's result files, and what is missing (with its command)."""
    row: dict[int, dict[str, Any]] = {}
    interp: dict[int, Any] = {}
    missing = []

    def put(j: int, k: str, v: Any) -> None:
        row.setdefault(int(j), {})[k] = v

    f = run / "interp" / "interp.json"
    if f.is_file():
        for r in read_json(f).get("latents", []):
            j = int(r["latent"])
            labels = {n: e.get("label") for n, e in (r.get("explanations") or {}).items()}
            scores = _flat_scores(r.get("scores"))
            conf = (r.get("validation") or {}).get("confidence")
            interp[j] = {"label": labels.get("default") or next(iter(labels.values()), None), "all": labels,
                         "scores": scores | ({"label confidence": conf} if isinstance(conf, int | float) else {})}
            d = r.get("scores", {}).get("default", {})
            for col, (scorer, m) in {"detection": ("detection", "balanced_accuracy"),
                                     "fuzzing": ("fuzzing", "balanced_accuracy"),
                                     "embedding": ("embedding", "auroc")}.items():
                v = (d.get(scorer) or {}).get(m)
                if isinstance(v, int | float):
                    put(j, col, float(v))
            if isinstance(conf, int | float):
                put(j, "label_confidence", float(conf))
    else:
        missing.append({"what": "explanations and their scores", "command": f"saelab interpret {run}"})
    f = run / "probe" / "analyses.json"
    if f.is_file():
        tasks: dict[int, list[str]] = {}
        for task, lats in (read_json(f).get("separability") or {}).items():
            for x in lats:
                tasks.setdefault(int(x["latent"]), []).append(task)
        for j, ts in tasks.items():
            put(j, "probing_tasks", ", ".join(sorted(ts)))
    else:
        missing.append({"what": "probing usefulness (top latents per task)", "command": f"saelab probe {run}"})
    f = run / "eval_absorption.json"
    if f.is_file():
        letters: dict[int, list[str]] = {}
        for letter, d in (read_json(f).get("per_letter") or {}).items():
            for j in d.get("main_latents", []):
                letters.setdefault(int(j), []).append(letter)
        for j, ls in letters.items():
            put(j, "absorption_letters", "".join(sorted(ls)))
    else:
        missing.append({"what": "absorption roles", "command": f"saelab eval {run} --suite absorption"})
    ablations = sorted((run / "ablate").glob("*.json")) if (run / "ablate").is_dir() else []
    for f in ablations:
        for x in read_json(f).get("latents", []):
            c = x.get("delta_ce") or {}
            if isinstance(c.get("diff"), int | float):
                put(x["latent"], "ablation_delta_ce", float(c["diff"]))
                lo, hi = (c.get("diff_ci95") or [None, None])[:2]
                if lo is not None:
                    put(x["latent"], "ablation_delta_ce_ci95", f"[{lo:+.4f}, {hi:+.4f}]")
    if not ablations:
        missing.append({"what": "ablation effects", "command": f"saelab ablate {run} --latents ..."})
    steers = sorted(p for p in (run / "steer").glob("*.json")) if (run / "steer").is_dir() else []
    for f in steers:
        d = read_json(f)
        lat = (d.get("latent_choice") or {}).get("latent")
        h = (d.get("head_to_head") or {}).get("sae_vs_dom")
        if lat is not None and h:
            put(lat, "steering", f"{d.get('name', f.stem)}: SAE {h['a']:.3f} vs DoM {h['b']:.3f}, "
                                 f"diff {h['diff']:+.3f} [{h['diff_ci95'][0]:+.3f}, {h['diff_ci95'][1]:+.3f}]")
    if not steers:
        missing.append({"what": "steering results", "command": f"saelab steer {run}"})
    return {"row": row, "interp": interp}, missing
