"""`saelab report`: one self-contained HTML file (and a markdown twin with its figures beside it)
from the ledger and the run directories its rows point to: the EXPERIMENTS table with verdicts,
predictions against outcomes, and per run directory its training curves, feature-density
histogram, probing bars with CI error bars, control gaps and every other comparison a stage
recorded (a forest plot of a - b with its 95% CI), and the later stages' plots (steering scans, probe
plots, circuit graphs, feature-set grids, interpretation scores). What a run lacks is said, with the command
that computes it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from saelab.io import read_json, write_text
from saelab.report import plots
from saelab.report.html import Doc, esc, page, slug
from saelab.runs.ledger import EXPERIMENTS_COLUMNS, Ledger, experiments_row, metric_values
from saelab.runs.results import Comparison, ProbingResult
from saelab.runs.rundir import RunDir, provenance


@dataclass
class Report:
    html: str
    markdown: str
    figures: dict[str, str]  # file name -> svg, for the markdown twin
    rows: int
    runs: int


def build_report(ledger: Ledger, title: str = "saelab results") -> Report:
    rows = ledger.rows()
    full = {r["id"]: ledger.row(r["id"]) for r in rows}
    doc = Doc()
    prov = provenance()
    commit = (prov["git"].get("commit") or "")[:8]
    doc.heading(1, title)
    doc.text(f"{len(rows)} ledger rows from {ledger.path} (schema {ledger.schema_version}); built "
             f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC by saelab {prov['versions'].get('saelab')}"
             f"{' at ' + commit if commit else ''}.", "muted")
    doc.raw('<nav><a href="#experiments">experiments</a><a href="#predictions">predictions</a>'
            '<a href="#runs">runs</a></nav>', "[experiments](#experiments) · [predictions](#predictions) · [runs](#runs)")

    doc.heading(2, "Experiments", "experiments")
    if not rows:
        doc.text("The ledger has no rows yet: run `saelab quickstart` (or any stage) to record one.", "missing")
    table = [experiments_row(r, full[r["id"]]["prediction"]) for r in rows]
    doc.table(list(EXPERIMENTS_COLUMNS), [[t[c] for c in EXPERIMENTS_COLUMNS] for t in table], links={0: "row-"})

    doc.heading(2, "Predictions and outcomes", "predictions")
    preds = [(r, full[r["id"]]["prediction"]) for r in rows if full[r["id"]]["prediction"]]
    if preds:
        out = []
        for r, p in preds:
            v = metric_values(r["metrics"], full[r["id"]]["comparisons"]).get(p["metric"])
            out.append([r["id"], p["created_utc"], f"{p['metric']} {p['expect']}", p["source"],
                        "missing" if v is None else f"{v:.4g}", r["verdict"]])
        doc.table(["id", "registered", "prediction", "source", "outcome", "verdict"], out, links={0: "row-"})
    else:
        doc.text("No prediction was registered (`saelab ledger predict ID --metric M --expect '>= X'` before a run).",
                 "muted")

    doc.heading(2, "Runs", "runs")
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(r["run_dir"] or "?", []).append(full[r["id"]])
    for run_dir, run_rows in by_run.items():
        _run_section(doc, Path(run_dir), run_rows)
    body = doc.html()
    return Report(page(title, body, f"saelab results report: {len(rows)} ledger rows with verdicts, plots and "
                                    "confidence intervals"), doc.markdown(), doc.files, len(rows), len(by_run))


def _run_section(doc: Doc, run_dir: Path, rows: list[dict[str, Any]]) -> None:
    doc.heading(3, str(run_dir), "run-" + slug(str(run_dir)))
    for r in rows:
        doc.raw(f'<p id="row-{slug(r["id"])}"><b>{esc(r["id"])}</b> {esc(r["stage"])}/{esc(r["kind"])} '
                f'<span class="verdict">{esc(r["verdict"])}</span> <span class="muted">{esc(r["verdict_reason"])}'
                f'{" · " + esc(r["notes"]) if r["notes"] else ""}</span></p>',
                f'**{r["id"]}** {r["stage"]}/{r["kind"]} **{r["verdict"]}**: {r["verdict_reason"] or ""}'
                f'{" · " + r["notes"] if r["notes"] else ""} <a id="row-{slug(r["id"])}"></a>')
        if r["metrics"]:
            doc.table(["metric", "value"], [[k, f"{v:.6g}"] for k, v in r["metrics"].items()], numeric={1})
    if not run_dir.is_dir():
        doc.text(f"{run_dir} is not on this machine: its plots cannot be drawn.", "missing")
        return
    figs: list[tuple[str, str | None]] = []
    prefix = slug(str(run_dir))[-24:]
    run = RunDir(run_dir)
    kinds = {(r["stage"], r["kind"]) for r in rows}
    if ("train", "sae") in kinds:
        figs.append((f"training curves {run_dir.name}", _svg(plots.training_curves(run.metrics()), prefix + "-tc")))
        if not (run_dir / "eval.json").is_file():
            doc.text(f"No core eval yet: `saelab eval {run_dir}`.", "missing")
    if (run_dir / "eval.json").is_file():
        hist = read_json(run_dir / "eval.json").get("feature_density_histogram")
        figs.append((f"feature density {run_dir.name}", _svg(plots.density_histogram(hist), prefix + "-dh")))
    if (run_dir / ProbingResult.FILE).is_file():
        figs.append((f"probing {run_dir.name}", _svg(_probing_bars(read_json(run_dir / ProbingResult.FILE)),
                                                     prefix + "-pb")))
    seen: set[Path] = set()
    for r in rows:
        figs += _stage_figures(r, prefix, seen)
    for r in rows:
        cmps = {k: _as_comparison(c) for k, c in r["comparisons"].items()}
        if cmps and (r["stage"], r["kind"]) != ("eval", "probing"):
            figs.append((f"{r['id']} comparisons", _svg(plots.comparison_forest(cmps, f"{r['stage']}/{r['kind']}"),
                                                        prefix + "-" + slug(r["id"]))))
    doc.figures(figs)


def _stage_figures(r: dict[str, Any], prefix: str, seen: set[Path]) -> list[tuple[str, str | None]]:
    """The plots a later stage made or whose data it wrote: steering scans, probe plots, circuit
    graphs and feature-set grids, interpretation scores against their controls."""
    f = Path(r["result_file"]) if r.get("result_file") else None
    if f is None or not f.is_file():
        return []
    out: list[tuple[str, str | None]] = []
    tag = prefix + "-stage-" + slug(r["id"])
    if r["stage"] == "steer":
        plot = read_json(f).get("plot")
        if plot and Path(plot).is_file() and Path(plot) not in seen:
            seen.add(Path(plot))
            out.append((f"{r['id']} steering scan", plots.png_as_svg(Path(plot).read_bytes())))
    elif r["stage"] == "probe" and (f.parent / "plots").is_dir() and f.parent / "plots" not in seen:
        seen.add(f.parent / "plots")
        out += [(f"probe {p.stem}", plots.png_as_svg(p.read_bytes())) for p in sorted((f.parent / "plots").glob("*.png"))]
    elif r["stage"] == "circuit":
        d = read_json(f)
        if d.get("graph"):
            from saelab.circuits.graph import ERR

            gr = d["graph"]
            labels = {(n["hook"], n["latent"]): "|".join(n.get("lens", [])) for n in gr["nodes"]}
            out.append((f"{r['id']} circuit graph {d['task']}", _svg(plots.circuit_graph(gr, d["hooks"], ERR, labels), tag)))
        if d.get("set"):
            grid = d["set"]["grid"]
            cs = {k: v["circuit_vs_random"] for k, v in grid.items()}
            out.append((f"{r['id']} feature-set circuit {d['task']}", _svg(plots.paired_bars(
                [f"K={v['k_per_layer']}" for v in grid.values()], [c["a"] for c in cs.values()],
                [c["b"] for c in cs.values()], [c["a_ci95"] for c in cs.values()], [c["b_ci95"] for c in cs.values()],
                ("top-K circuit", "random sets"), "probe test accuracy", f"{d['task']}: circuit vs random "
                f"(ceiling {d['set']['ceiling_accuracy']['mean']:.3f})"), tag)))
    elif r["stage"] == "interpret":
        d = read_json(f)
        rows = [(n, m, e) for n, ms in (d.get("scores") or {}).items() for m, e in ms.items()
                if m in ("detection_balanced_accuracy", "fuzzing_balanced_accuracy", "embedding_auroc")]
        if rows:
            names = [f"{n}: {m.split('_')[0]}" for n, m, _ in rows]
            out.append((f"{r['id']} interpretation scores", _svg(plots.estimate_bars(
                names, [e["mean"] for *_, e in rows], [e["ci95"] for *_, e in rows],
                "mean over latents [95% CI]", "explanations and their controls (shuffled, token list)"), tag)))
    return out


def _probing_bars(data: dict[str, Any]):
    """SAE top-k vs residual top-k accuracy per task at the smallest k, with the 95% CIs."""
    k = f"k{min(data['ks'])}"
    tasks = {t: v["comparisons"][k] for t, v in data["tasks"].items()}
    if "pooled" in data and k in data["pooled"]:
        tasks["pooled"] = data["pooled"][k]
    return plots.paired_bars(list(tasks), [c["a"] for c in tasks.values()], [c["b"] for c in tasks.values()],
                             [c["a_ci95"] for c in tasks.values()], [c["b_ci95"] for c in tasks.values()],
                             ("SAE", "residual"), "test accuracy", f"sparse probing, top-{k[1:]}")


def _as_comparison(c: dict[str, Any]) -> Comparison:
    """A ledger comparison (a, b, diff, lo, hi, n) as a Comparison, for plotting."""
    nan = float("nan")
    lo, hi = (nan if c["lo"] is None else c["lo"]), (nan if c["hi"] is None else c["hi"])
    return Comparison(a=c["a"] if c["a"] is not None else nan, b=c["b"] if c["b"] is not None else nan,
                      diff=c["diff"] if c["diff"] is not None else nan, a_ci95=[nan, nan], b_ci95=[nan, nan],
                      diff_ci95=[lo, hi], n_units=c["n"] or 0, unit=c["unit"] or "", n_boot=0, method="ledger",
                      sides=c.get("sides") or "")


def _svg(fig, prefix: str) -> str | None:
    return None if fig is None else plots.to_svg(fig, prefix)


def write_report(report: Report, out: str | Path) -> tuple[Path, Path]:
    """FILE.html (self-contained) and FILE.md with its figures in FILE_files/ (atomic writes)."""
    out = Path(out)
    html_path = out if out.suffix == ".html" else out.with_suffix(".html")
    md_path = html_path.with_suffix(".md")
    files = html_path.with_name(html_path.stem + "_files")
    md = report.markdown.replace("](figures/", f"]({files.name}/")
    if _unchanged(html_path, report.html) and _unchanged(md_path, md):
        return html_path, md_path  # the same report: left as it was (and when) it was built
    for name, svg in report.figures.items():
        write_text(files / name, svg)
    write_text(html_path, report.html)
    write_text(md_path, md)
    return html_path, md_path


_BUILT = re.compile(r"built \d{4}-\d\d-\d\d \d\d:\d\d UTC")


def _unchanged(path: Path, text: str) -> bool:
    """Whether path already holds text, up to the time it was built."""
    return path.is_file() and _BUILT.sub("", path.read_text(encoding="utf-8")) == _BUILT.sub("", text)

