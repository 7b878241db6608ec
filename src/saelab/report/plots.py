"""Plots for the report and the dashboard: matplotlib figures returned as inline SVG text (no
files, no network). Each function takes plain data (a result or rows of metrics) and draws one
figure; a missing input returns None so a page can say what is missing."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display: render to SVG/PNG only
import matplotlib.pyplot as plt  # noqa: E402

from saelab.runs.results import Comparison  # noqa: E402

# fonttype none: text stays text (searchable, small); a fixed hash salt: the same figure, the same SVG
plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                     "svg.hashsalt": "saelab"})


def to_svg(fig, prefix: str = "f") -> str:
    """The figure as an <svg> element (its XML prolog dropped), closed afterwards. Every id inside
    is prefixed, so several figures inline in one page keep unique ids and their clip paths."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # matplotlib's RDF block: no use inline
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    return re.sub(r"(url\(#|href=\"#)([^)\"]+)", lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", text)


def to_png(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def training_curves(rows: list[dict[str, Any]]):
    """FVU, L0 and every named loss term against training tokens (metrics.jsonl rows)."""
    rows = [r for r in rows if "fvu" in r]
    if not rows:
        return None
    tokens = [r["tokens"] for r in rows]
    terms = sorted({k for r in rows for k in r if k.startswith("loss_")})
    panels = [("fvu", "train FVU"), ("l0", "L0"), *((t, t) for t in terms)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        ax.plot(tokens, [r.get(key, math.nan) for r in rows], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("tokens")
        if key == "fvu":
            ax.set_yscale("log")
    val = [r for r in rows if "val_fvu" in r]
    if val:
        axes[0][0].plot([r["step"] * rows[0]["tokens"] / rows[0]["step"] for r in val], [r["val_fvu"] for r in val],
                        lw=1.2, ls="--", label="validation")
        axes[0][0].legend(frameon=False)
    fig.tight_layout()
    return fig


def density_histogram(hist: dict[str, Any] | None):
    """Latents per log10 firing-frequency bin (the core eval's feature-density histogram)."""
    if not hist:
        return None
    edges, counts = hist["log10_edges"], hist["counts"]
    fig, ax = plt.subplots(figsize=(4.2, 2.3))
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:], strict=False)], align="edge",
           edgecolor="white")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"feature density (never fired: {hist.get('never_fired', 0)})")
    fig.tight_layout()
    return fig


def comparison_forest(comparisons: dict[str, Comparison], title: str = ""):
    """Each comparison's difference a - b with its 95% CI as an error bar (a forest plot)."""
    if not comparisons:
        return None
    names = list(comparisons)
    fig, ax = plt.subplots(figsize=(5.2, 0.28 * len(names) + 0.9))
    for i, n in enumerate(names):
        c = comparisons[n]
        lo, hi = c.diff_ci95
        color = "tab:blue" if c.conclusive else "tab:gray"
        ax.errorbar([c.diff], [i], xerr=[[c.diff - lo], [hi - c.diff]], fmt="o", ms=3, color=color, capsize=2)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("a - b (95% CI)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def paired_bars(labels: Sequence[str], a: Sequence[float], b: Sequence[float], a_ci: Sequence[Sequence[float]],
                b_ci: Sequence[Sequence[float]], names: tuple[str, str], ylabel: str, title: str = ""):
    """Two bars per label (a and b) with 95% CI error bars, e.g. SAE vs residual probe accuracy per task."""
    if not labels:
        return None
    x = range(len(labels))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(3.5, 0.7 * len(labels) + 1.5), 2.6))
    for off, vals, cis, name in ((-w / 2, a, a_ci, names[0]), (w / 2, b, b_ci, names[1])):
        err = [[v - c[0] for v, c in zip(vals, cis, strict=True)], [c[1] - v for v, c in zip(vals, cis, strict=True)]]
        ax.bar([i + off for i in x], vals, w, yerr=err, capsize=2, label=name)
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def histogram_pair(a, b, name_a: str, name_b: str, xlabel: str, key: str) -> str:
    """Two overlaid histograms on shared bins (e.g. two SAEs' decoder norms), as inline SVG."""
    fig, ax = plt.subplots(figsize=(4.2, 2.3))
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 40)
    ax.hist(a, bins, alpha=0.6, label=f"A {name_a}")
    ax.hist(b, bins, alpha=0.6, label=f"B {name_b}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latents")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return to_svg(fig, key)


def circuit_graph(gr: dict, hooks: list[str], err_id: int, labels: dict[tuple[str, int], str] | None = None):
    """A circuit: hooks as columns, nodes (latent id or 'err', plus a label when given) sized by
    |effect|, red for a positive and blue for a negative effect on the metric; edges between
    consecutive hooks with width by |effect|."""
    labels = labels or {}
    by_hook: dict[str, list[dict]] = {h: [] for h in hooks}
    for n in gr["nodes"]:
        by_hook[n["hook"]].append(n)
    pos = {}
    rows = max(3, *(len(v) for v in by_hook.values()))
    fig, ax = plt.subplots(figsize=(2.4 * len(hooks) + 1, 0.32 * rows + 1.2))
    for x, h in enumerate(hooks):
        for y, n in enumerate(sorted(by_hook[h], key=lambda n: -abs(n["effect"]))):
            pos[(h, n["latent"])] = (x, -y)
            name = "err" if n["latent"] == err_id else str(n["latent"])
            text = f"{name} {labels.get((h, n['latent']), '')}".strip()
            ax.scatter([x], [-y], s=20 + 180 * min(1.0, abs(n["effect"])), zorder=3,
                       c="tab:red" if n["effect"] > 0 else "tab:blue")
            ax.annotate(text[:30], (x, -y), xytext=(6, 0), textcoords="offset points", fontsize=7, va="center")
    top = max((abs(e["effect"]) for e in gr["edges"]), default=1.0) or 1.0
    for e in gr["edges"]:
        a, b = pos.get(tuple(e["from"])), pos.get(tuple(e["to"]))
        if a and b:
            ax.plot([a[0], b[0]], [a[1], b[1]], lw=0.3 + 2.5 * abs(e["effect"]) / top, alpha=0.5, zorder=1,
                    c="tab:red" if e["effect"] > 0 else "tab:blue")
    ax.set_xticks(range(len(hooks)), hooks)
    ax.set_yticks([])
    ax.set_xlim(-0.3, len(hooks) - 0.2)
    ax.set_title("circuit: node effect on the metric (red +, blue -), edges between consecutive hooks")
    fig.tight_layout()
    return fig
