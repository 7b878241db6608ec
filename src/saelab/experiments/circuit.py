"""`saelab circuit --kind set|graph RUN [RUN ...]`: feature circuits over SAEs at several layers
(saelab.circuits.sets and .graph compute; this composes, writes <first run>/circuit/ and records
a ledger row).

- set: a labelled task; the top-K latents per layer vs the all-latent ceiling and random sets
  of the same size, for a grid of K; the build-up over layers.
- graph: contrastive prompt pairs (agreement, induction); AP (and IG) node effects, nodes kept
  above node_threshold, edges between consecutive hooks above edge_threshold, faithfulness and
  completeness of the circuit against random circuits of the same size, and a check that the
  linear estimates agree with real patching for the top nodes. Written as JSON and drawn (SVG).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from saelab.circuits import graph as g
from saelab.circuits.sets import feature_set_circuit
from saelab.config import StageConfig
from saelab.data.prompts import TASKS, PromptPairs
from saelab.data.tasks import TaskSpec, load_task
from saelab.device import describe
from saelab.evals.probing import pooled_features, resolve_tasks
from saelab.evals.stats import compare, ratio_ci
from saelab.experiments.evaluate import EvalConfig, open_run
from saelab.io import write_text
from saelab.models.hooks import forward
from saelab.report import plots
from saelab.report.html import Doc, page
from saelab.runs.ledger import check_ledger, record
from saelab.runs.results import Comparison, Estimate, Result


class CircuitConfig(StageConfig):
    """Feature circuits over the SAEs of several run directories (one hook each, same model)."""

    kind: Literal["set", "graph"] = Field("set", description="set: top-K latents per layer for a labelled task; "
                                          "graph: a causal graph on contrastive prompt pairs")
    runs: list[str] = Field(..., min_length=1, description="run directories of the SAEs, in any order (sorted by "
                            "layer)")
    model: str | None = Field(None, description="model override (default: the one the SAEs were trained on)")
    task: str | TaskSpec = Field("sentiment", description="set: a probing task (built-in name or TaskSpec); graph: "
                                 "agreement or induction")
    ks: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 20], description="set: latents per layer")
    rank: Literal["mean_diff", "probe"] = Field("mean_diff", description="set: how latents are ranked (class-mean "
                                                "difference, or |probe weight x mean activation|)")
    n_random: int = Field(20, gt=0, description="random sets / circuits of the same size drawn as the control")
    max_per_class: int = Field(200, gt=1, description="set: examples per class")
    max_tokens: int = Field(32, ge=2, description="set: tokens per example")
    prompts: int = Field(64, gt=1, description="graph: prompt pairs")
    method: Literal["ap", "ig"] = Field("ig", description="graph: node effects by attribution patching (ap) or "
                                        "integrated gradients (ig, 10 steps; ap is computed beside it)")
    ig_steps: int = Field(10, gt=0)
    node_threshold: float = Field(0.1, ge=0, description="graph: keep nodes whose mean |effect| exceeds this")
    edge_threshold: float = Field(0.01, ge=0, description="graph: keep edges whose mean |effect| exceeds this")
    max_nodes_per_hook: int = Field(30, gt=0, description="graph: at most this many latent nodes per hook")
    check_nodes: int = Field(20, ge=0, description="graph: top nodes whose linear estimate is checked by real "
                             "patching")
    batch_size: int = Field(32, gt=0)
    bootstrap: int = Field(1000, gt=0)
    seed: int = 0
    out: str = Field("", description="output folder (default: <first run>/circuit)")


class CircuitResult(Result):
    STAGE: ClassVar[str] = "circuit"
    FILE: ClassVar[str] = "circuit.json"

    kind: str
    task: str
    model: str
    hooks: list[str]
    runs: list[str]
    seed: int = 0
    wall_seconds: float
    device: str | None = None
    set: dict[str, Any] | None = None
    graph: dict[str, Any] | None = None
    primary_comparison: Comparison
    config: dict[str, Any] = {}

    @property
    def KIND(self) -> str:  # noqa: N802 - the row's kind is the circuit kind
        return self.kind

    def primary(self) -> str | None:
        return "circuit_vs_random"

    def comparisons(self) -> dict[str, Comparison]:
        out = {"circuit_vs_random": self.primary_comparison}
        if self.set:
            for k, v in self.set["grid"].items():
                out |= {f"{k}_vs_random": v["circuit_vs_random"], f"{k}_vs_ceiling": v["circuit_vs_ceiling"]}
        return out

    def headline(self) -> dict[str, float]:
        c = self.primary_comparison
        out = {"circuit": c.a, "random": c.b}
        if self.graph:
            out |= {"faithfulness": self.graph["faithfulness"].a, "completeness": self.graph["completeness"].mean,
                    "nodes": float(self.graph["n_nodes"]), "edges": float(self.graph["n_edges"]),
                    "ap_vs_patching_r": self.graph["linear_check"]["pearson_r_ap"]}
        return out

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": "+".join(self.hooks), "seed": self.seed, "wall_seconds": self.wall_seconds,
                "data_source": self.task, "device": self.device}


def _open(cfg: CircuitConfig):
    opened, loaded = [], None
    for run in cfg.runs:
        o = open_run(EvalConfig(run=run, model=cfg.model, device=cfg.device), loaded)
        loaded = o.loaded
        opened.append(o)
    opened.sort(key=lambda o: o.hp)
    names = {o.model_name for o in opened}
    if len(names) != 1:
        raise ValueError(f"the SAEs are of different models ({sorted(names)}); a circuit needs one model")
    hooks = [o.hp for o in opened]
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"two SAEs sit at the same hook ({[str(h) for h in hooks]}); give one per hook")
    return opened, loaded


def run_circuit(cfg: CircuitConfig) -> tuple[CircuitResult, Path]:
    check_ledger(cfg)
    t0 = time.perf_counter()
    opened, loaded = _open(cfg)
    out = Path(cfg.out or Path(cfg.runs[0]) / "circuit")
    if cfg.kind == "set":
        spec, data_name, body = _set(cfg, opened, loaded)
    else:
        spec, data_name, body = _graph(cfg, opened, loaded)
    name = f"{cfg.kind}-{data_name}"
    result = CircuitResult(kind=cfg.kind, task=data_name, model=opened[0].model_name, hooks=[str(o.hp) for o in opened],
                           runs=[str(o.run.path) for o in opened], seed=cfg.seed,
                           wall_seconds=round(time.perf_counter() - t0, 2), device=describe(loaded.device),
                           config=cfg.model_dump(mode="json"), **body)
    result.write(out / f"{name}.json")
    write_text(out / f"{name}.html", circuit_page(result, spec))
    record(result, out, cfg, result_file=out / f"{name}.json")
    return result, out


def _set(cfg: CircuitConfig, opened, loaded) -> tuple[Any, str, dict[str, Any]]:
    specs, skipped = resolve_tasks([cfg.task], cfg.max_per_class)
    if not specs:
        raise ValueError(f"task {cfg.task!r} cannot run: {skipped}")
    data = load_task(specs[0])
    layers = []
    for o in opened:  # each SAE pooled over the positions it reads
        _, z = pooled_features(data.texts, loaded, o.hp, o.sae, cfg.max_tokens, cfg.batch_size, o.positions,
                               desc=f"circuit {o.hp}")
        layers.append(z.numpy())
    r = feature_set_circuit(layers, [str(o.hp) for o in opened], data, cfg.ks, cfg.n_random, cfg.rank,
                            n_boot=cfg.bootstrap, seed=cfg.seed)
    mid = f"k{r['buildup']['k_per_layer']}"
    return data, specs[0].name, {"set": r, "primary_comparison": r["grid"][mid]["circuit_vs_random"]}


def _graph(cfg: CircuitConfig, opened, loaded) -> tuple[Any, str, dict[str, Any]]:
    if not isinstance(cfg.task, str) or cfg.task not in TASKS:
        raise ValueError(f"a graph circuit needs a prompt-pair task: {', '.join(TASKS)} (got {cfg.task!r})")
    prepend = opened[0].positions.prepend_bos
    pairs: PromptPairs = TASKS[cfg.task](loaded.tokenizer, cfg.prompts, seed=cfg.seed, prepend_bos=prepend)
    model, dev = loaded.model, loaded.device
    saes = {o.hp: o.sae for o in opened}
    for p in model.parameters():
        p.requires_grad_(False)
    for s in saes.values():
        s.requires_grad_(False)
    chunks = [slice(i, i + cfg.batch_size) for i in range(0, len(pairs), cfg.batch_size)]
    ap_l, ap_e, ig_l, ig_e, m_clean, m_patch, cstates, pstates = {}, {}, {}, {}, [], [], [], []
    for sl in chunks:
        clean, patch = pairs.clean[sl].to(dev), pairs.patch[sl].to(dev)

        def metric(logits, sl=sl):
            return pairs.metric(logits, sl)

        lat, err, mc, mp, cs, ps = g.attribution_patching(model, saes, clean, patch, metric)
        _extend(ap_l, lat)
        _extend(ap_e, err)
        m_clean.append(mc)
        m_patch.append(mp)
        cstates.append(cs)
        pstates.append(ps)
        if cfg.method == "ig":
            il, ie = g.integrated_gradients(model, saes, cs, ps, clean, metric, cfg.ig_steps)
            _extend(ig_l, il)
            _extend(ig_e, ie)
    ap_l, ap_e = {h: torch.cat(v) for h, v in ap_l.items()}, {h: torch.cat(v) for h, v in ap_e.items()}
    eff_l, eff_e = ap_l, ap_e  # [prompts, width] and [prompts] per hook: the effects the circuit is built from
    if cfg.method == "ig":
        eff_l, eff_e = {h: torch.cat(v) for h, v in ig_l.items()}, {h: torch.cat(v) for h, v in ig_e.items()}
    m_clean, m_patch = torch.cat(m_clean), torch.cat(m_patch)
    clean_all = g.State({h: torch.cat([c.f[h] for c in cstates]) for h in saes},
                        {h: torch.cat([c.err[h] for c in cstates]) for h in saes})
    means = g.mean_state(clean_all)
    # nodes: mean effect over prompts above the threshold (at most max_nodes_per_hook latents per hook)
    nodes: dict[Any, list[int]] = {}
    for h in saes:
        mean = eff_l[h].mean(0)
        idx = torch.nonzero(mean.abs() > cfg.node_threshold).flatten()
        idx = idx[mean[idx].abs().argsort(descending=True)][: cfg.max_nodes_per_hook]
        nodes[h] = idx.tolist() + ([g.ERR] if eff_e[h].mean().abs() > cfg.node_threshold else [])
    # edges between consecutive hooks, summed over prompt chunks, as a mean per prompt
    hooks = list(saes)
    edge_list: list[dict[str, Any]] = []
    for up, down in zip(hooks, hooks[1:], strict=False):
        total: dict[tuple[int, int], float] = {}
        for sl, cs, ps in zip(chunks, cstates, pstates, strict=True):
            e = g.edges(model, saes, up, down, nodes[down], pairs.clean[sl].to(dev), cs, ps,
                        lambda logits, sl=sl: pairs.metric(logits, sl))
            for key, v in e.items():
                total[key] = total.get(key, 0.0) + v
        keep_up = set(nodes[up])
        for (u, d), v in total.items():
            if u in keep_up and abs(v / len(pairs)) > cfg.edge_threshold:
                edge_list.append({"from": [str(up), u], "to": [str(down), d], "effect": v / len(pairs)})
    # faithfulness and completeness of the node set, against random node sets of the same size
    full_keep = {h: torch.ones(saes[h].cfg.width, dtype=torch.bool) for h in saes}

    def keep_of(sel: dict[Any, list[int]]):
        keep = {h: torch.zeros(saes[h].cfg.width, dtype=torch.bool) for h in saes}
        for h, ids in sel.items():
            lat = [i for i in ids if i != g.ERR]
            keep[h][lat] = True
        return keep, {h: g.ERR in sel.get(h, []) for h in saes}

    def metric_with(keep, keep_err, complement=False):
        vals = []
        for sl in chunks:
            k = {h: (~v if complement else v) for h, v in keep.items()}
            ke = {h: (not v if complement else v) for h, v in keep_err.items()}
            vals.append(g.ablated_metric(model, saes, pairs.clean[sl].to(dev), k, ke, means,
                                         lambda logits, sl=sl: pairs.metric(logits, sl)))
        return torch.cat(vals)

    m_full = metric_with(full_keep, dict.fromkeys(saes, True))
    m_empty = metric_with({h: ~v for h, v in full_keep.items()}, dict.fromkeys(saes, False))
    keep, keep_err = keep_of(nodes)
    m_c = metric_with(keep, keep_err)
    m_comp = metric_with(keep, keep_err, complement=True)
    rng = np.random.default_rng(cfg.seed)
    rand_num = []
    for _ in range(cfg.n_random):
        sel = {h: list(rng.choice(saes[h].cfg.width, sum(i != g.ERR for i in ids), replace=False))
               + ([g.ERR] if g.ERR in ids else []) for h, ids in nodes.items()}
        k, ke = keep_of(sel)
        rand_num.append(g.faithfulness_units(metric_with(k, ke), m_empty, m_full)[0])
    num_c, den = g.faithfulness_units(m_c, m_empty, m_full)
    num_comp, _ = g.faithfulness_units(m_comp, m_empty, m_full)
    faith = compare((num_c, den), (np.mean(rand_num, axis=0), den), cfg.bootstrap, cfg.seed, unit="prompt pair",
                    sides=f"a = the circuit, b = random node sets of the same size per hook (mean of {cfg.n_random})")
    complete = ratio_ci(num_comp, den, cfg.bootstrap, cfg.seed)
    # the linear estimates against real patching of single nodes, for the top nodes
    flat = [(h, i, float(eff_l[h].mean(0)[i]), float(ap_l[h].mean(0)[i])) for h in saes
            for i in torch.argsort(eff_l[h].mean(0).abs(), descending=True)[: cfg.check_nodes].tolist()]
    flat = sorted(flat, key=lambda x: -abs(x[2]))[: cfg.check_nodes]
    real = []
    for h, i, _, _ in flat:
        vals = []
        for sl, ps in zip(chunks, pstates, strict=True):
            def edit(hp, f, e, h=h, i=i, ps=ps):
                if hp == h:
                    f = f.clone()
                    f[..., i] = ps.f[h][..., i]
                return f, e
            with torch.no_grad(), g.spliced(model, saes, edit=edit):
                vals.append(pairs.metric(forward(model, pairs.clean[sl].to(dev)), sl))
        real.append(float((torch.cat(vals) - m_clean).mean()))
    est, est_ap = np.array([x[2] for x in flat]), np.array([x[3] for x in flat])

    def r(a, b):
        return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")

    node_json = [{"hook": str(h), "latent": i, "effect": float((eff_e[h] if i == g.ERR else eff_l[h][:, i]).mean()),
                  "effect_ap": float((ap_e[h] if i == g.ERR else ap_l[h][:, i]).mean())}
                 for h in saes for i in nodes[h]]
    graph = {
        "pairs": pairs.note, "n_pairs": len(pairs), "examples": pairs.texts[:4],
        "metric_clean": Estimate(mean=float(m_clean.mean()), ci95=[float(m_clean.min()), float(m_clean.max())],
                                 n_units=len(pairs), method="range, not a CI"),
        "metric_patched_mean": float(m_patch.mean()), "metric_all_ablated_mean": float(m_empty.mean()),
        "splice_exact": bool(torch.equal(m_full, m_clean)) or float((m_full - m_clean).abs().max()) < 1e-4,
        "method": cfg.method, "nodes": node_json, "n_nodes": len(node_json), "edges": edge_list,
        "n_edges": len(edge_list), "faithfulness": faith,
        "completeness": complete,
        "linear_check": {"nodes": [{"hook": str(h), "latent": i, "estimate": e, "estimate_ap": a, "patched": p}
                                   for (h, i, e, a), p in zip(flat, real, strict=True)],
                         "pearson_r": r(est, np.array(real)), "pearson_r_ap": r(est_ap, np.array(real))},
    }
    return pairs, cfg.task, {"graph": graph, "primary_comparison": faith}


def _extend(acc: dict, part: dict) -> None:
    for h, v in part.items():
        acc.setdefault(h, []).append(v.detach().cpu())


def circuit_page(r: CircuitResult, spec: Any) -> str:
    doc = Doc()
    doc.heading(1, f"{r.kind} circuit: {r.task}")
    doc.text(f"{r.model}, hooks {', '.join(r.hooks)}; {r.wall_seconds:.0f} s on {r.device}.", "muted")
    c = r.primary_comparison
    doc.table(["", "circuit", "random (same size)", "difference [95% CI]", "n"],
              [[c.sides, f"{c.a:.4f}", f"{c.b:.4f}", f"{c.diff:+.4f} [{c.diff_ci95[0]:+.4f}, {c.diff_ci95[1]:+.4f}]",
                f"{c.n_units} {c.unit}s"]])
    if r.set:
        rows = [[k, v["latents"], f"{v['circuit_vs_random'].a:.3f}", f"{v['circuit_vs_random'].b:.3f}",
                 f"{v['circuit_vs_ceiling'].b:.3f}", f"{v['fraction_of_ceiling']:.3f}"] for k, v in r.set["grid"].items()]
        doc.table(["K per layer", "latents", "circuit acc.", "random acc.", "ceiling acc.", "of ceiling"], rows)
        b = r.set["buildup"]
        doc.table([f"layers (K = {b['k_per_layer']})", "accuracy [95% CI]"],
                  [[" + ".join(p["layers"]), f"{p['accuracy'].mean:.3f} [{p['accuracy'].ci95[0]:.3f}, "
                                             f"{p['accuracy'].ci95[1]:.3f}]"] for p in b["points"]])
    if r.graph:
        gr = r.graph
        doc.table(["", "value"], [["faithfulness (circuit)", f"{gr['faithfulness'].a:.3f}"],
                                  ["faithfulness (random, same size)", f"{gr['faithfulness'].b:.3f}"],
                                  ["completeness (lower: the rest carries less)",
                                   f"{gr['completeness'].mean:.3f} [{gr['completeness'].ci95[0]:.3f}, "
                                   f"{gr['completeness'].ci95[1]:.3f}]"],
                                  ["nodes / edges", f"{gr['n_nodes']} / {gr['n_edges']}"],
                                  ["linear estimate vs real patching, Pearson r (IG / AP)",
                                   f"{gr['linear_check']['pearson_r']:.3f} / {gr['linear_check']['pearson_r_ap']:.3f}"]])
        doc.figures([("circuit graph", plots.to_svg(plots.circuit_graph(gr, r.hooks, g.ERR), "graph"))])
    return page(f"{r.kind} circuit {r.task}", doc.html(), f"saelab {r.kind} circuit for {r.task}")
