"""Plots of typed results (matplotlib, Agg backend, PNG). Each function takes results and a
directory and returns the files it wrote; the numbers behind every plot are in the results' JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

XLABEL = {"normal": "training rows", "scarcity": "training rows (balanced)", "imbalance": "positive ratio of train and test",
          "label_noise": "fraction of training labels flipped"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def probe_plots(results: list, records: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """Per setting: each probe's mean test AUC over tasks along the regime, and the quiver (best of
    the baselines vs best of baselines + SAE probes, by validation AUC) with the share of points an
    SAE probe is picked; and one summary of every setting's win rate with 95% CIs."""
    plt = _plt()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for r in results:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
        xs = [c["point"] for c in r.curve]
        probes = list(r.test_auc)
        if len(xs) == 1:  # one point (normal): bars with the CI over tasks
            means = [r.test_auc[p].mean for p in probes]
            err = [[m - r.test_auc[p].ci95[0] for p, m in zip(probes, means, strict=True)],
                   [r.test_auc[p].ci95[1] - m for p, m in zip(probes, means, strict=True)]]
            ax.bar(probes, means, yerr=err, color=["C0" if p in ("logreg", "pca", "knn", "gbdt", "mlp") else
                                                   "C3" if p.startswith("sae") else "C7" for p in probes])
            ax.set_ylim(min(0.5, min(means) - 0.05), 1.0)
            ax.tick_params(axis="x", rotation=45)
        else:
            for p in probes:
                style = "-" if p.startswith("sae") else ":" if p.startswith("ctrl") else "--"
                ax.plot(xs, [c["test_auc"][p] for c in r.curve], style, marker=".", label=p)
            if r.setting == "scarcity":
                ax.set_xscale("log", base=2)
            ax.set_xlabel(XLABEL.get(r.setting, "point"))
            ax.legend(fontsize=7, ncol=2)
        ax.set_ylabel("mean test ROC-AUC over tasks")
        ax.set_title(f"{r.setting}: every probe ({len(r.tasks)} tasks, {r.pool} token)" if r.pool == "last"
                     else f"{r.setting}: every probe ({len(r.tasks)} tasks, mean-pooled)")
        for i, (name, c) in enumerate(r.quiver.items()):
            pts = [cv for cv in r.curve if name in cv]
            px = [cv["point"] for cv in pts] if len(xs) > 1 else [i]
            if i == 0:
                bx.plot(px, [cv[name]["test_auc_without"] for cv in pts], "k--", marker="o", label="best baseline")
            bx.plot(px, [cv[name]["test_auc_with"] for cv in pts], marker="o",
                    label=f"+{name}: picked {r.picked[name].mean:.0%}, diff {c.diff:+.3f} "
                          f"[{c.diff_ci95[0]:+.3f}, {c.diff_ci95[1]:+.3f}]")
        if r.setting == "scarcity":
            bx.set_xscale("log", base=2)
        bx.set_xlabel(XLABEL.get(r.setting, "point") if len(xs) > 1 else "")
        bx.set_ylabel("mean test ROC-AUC of the pick")
        bx.set_title("quiver: pick by validation AUC")
        bx.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{r.setting}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    files.append(winrate_summary_plot(results, out / "winrate.png"))
    return files


def winrate_summary_plot(results: list, path: Path) -> Path:
    """Per setting and extra-probe group: the share of points picked and the change in mean test
    AUC of the pick, with 95% bootstrap CIs over tasks."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    groups = list(dict.fromkeys(g for r in results for g in r.quiver))
    width = 0.8 / max(1, len(groups))
    for j, g in enumerate(groups):
        xs, share, lo_s, hi_s, diff, lo_d, hi_d = [], [], [], [], [], [], []
        for i, r in enumerate(results):
            if g in r.quiver:
                e, c = r.picked[g], r.quiver[g]
                xs.append(i + j * width)
                share.append(e.mean)
                lo_s.append(e.mean - e.ci95[0])
                hi_s.append(e.ci95[1] - e.mean)
                diff.append(c.diff)
                lo_d.append(c.diff - c.diff_ci95[0])
                hi_d.append(c.diff_ci95[1] - c.diff)
        ax.bar(xs, share, width, yerr=[lo_s, hi_s], label=g)
        bx.bar(xs, diff, width, yerr=[lo_d, hi_d], label=g)
    for a in (ax, bx):
        a.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(results))], [r.setting for r in results])
        a.legend(fontsize=8)
    ax.set_ylabel("share of task-points where it is picked")
    bx.axhline(0, color="k", lw=0.8)
    bx.set_ylabel("test AUC of the pick: with - without")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scr_tpp_plots(r, out: str | Path) -> Path:
    """SCR or TPP: the score vs the number of ablated latents (normal size), SAE vs random latents,
    per task; and the n = 20 score along the scarcity sizes."""
    plt = _plt()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    key = "sae"

    def val(p, n, side):
        s = p["scores"][str(n)]
        return s[side] if r.kind == "scr" else s[side]["tpp"]

    for i, task in enumerate(r.tasks):
        normal = [p for p in r.points if p["task"] == task and p["setting"] == "normal"]
        if normal:
            p = normal[0]
            ax.plot(r.n_values, [val(p, n, key) for n in r.n_values], "-o", color=f"C{i}", label=f"{task} (SAE)")
            ax.plot(r.n_values, [val(p, n, "random") for n in r.n_values], ":", color=f"C{i}", label=f"{task} (random)")
        sc = sorted((p for p in r.points if p["task"] == task and p["setting"] == "scarcity"), key=lambda p: p["n_train"])
        if sc:
            bx.plot([p["n_train"] for p in sc], [val(p, 20, key) for p in sc], "-o", color=f"C{i}", label=f"{task} (SAE)")
            bx.plot([p["n_train"] for p in sc], [val(p, 20, "random") for p in sc], ":", color=f"C{i}")
    ax.set_xscale("log")
    ax.set_xlabel("latents ablated (n)")
    ax.set_ylabel(r.kind.upper())
    ax.set_title(f"{r.kind.upper()} at the normal probe training size")
    ax.legend(fontsize=7)
    bx.set_xscale("log", base=2)
    bx.set_xlabel("probe training rows (scarcity)")
    bx.set_ylabel(f"{r.kind.upper()} at n = 20")
    bx.set_title("under data scarcity (dotted: random latents)")
    for a in (ax, bx):
        a.axhline(0, color="k", lw=0.6)
    fig.tight_layout()
    path = out / f"{r.kind}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def analyses_plots(r, out: str | Path) -> Path:
    """JS separability of each task's top latent, Gini selectivity of the top latents, the Jaccard
    reuse matrix, and silhouette per multi-class task and space."""
    import numpy as np

    plt = _plt()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    tasks = list(r.separability)
    axes[0, 0].barh(tasks, [r.separability[t][0]["js"] if r.separability[t] else 0 for t in tasks])
    axes[0, 0].set_xlabel("JS divergence (bits) of the top latent, test rows")
    axes[0, 0].tick_params(axis="y", labelsize=6)
    axes[0, 1].hist(r.selectivity["gini"]["values"], bins=20)
    axes[0, 1].set_xlabel(f"Gini over {len(r.selectivity['tasks'])} tasks (max {r.selectivity['gini']['max_possible']:.2f})")
    axes[0, 1].set_ylabel(f"top-{r.selectivity['k']} latents")
    jac = np.array(r.selectivity["jaccard"])
    im = axes[1, 0].imshow(jac, vmin=0, vmax=max(0.2, float(np.triu(jac, 1).max())), cmap="viridis")
    axes[1, 0].set_xticks(range(len(jac)), r.selectivity["tasks"], rotation=90, fontsize=5)
    axes[1, 0].set_yticks(range(len(jac)), r.selectivity["tasks"], fontsize=5)
    axes[1, 0].set_title(f"Jaccard of top-{r.selectivity['k']} latents (random: {r.selectivity['jaccard_random']:.4f})")
    fig.colorbar(im, ax=axes[1, 0])
    names = list(r.clusters)
    spaces = list(dict.fromkeys(s for c in r.clusters.values() for s in c))
    w = 0.8 / max(1, len(spaces))
    for j, s in enumerate(spaces):
        axes[1, 1].bar([i + j * w for i in range(len(names))], [r.clusters[t].get(s, {}).get("silhouette", 0) for t in names],
                       w, label=s)
    axes[1, 1].set_xticks([i + w * (len(spaces) - 1) / 2 for i in range(len(names))], names, rotation=30, fontsize=7)
    axes[1, 1].set_ylabel("silhouette of the classes (test rows)")
    axes[1, 1].axhline(0, color="k", lw=0.6)
    if spaces:
        axes[1, 1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "analyses.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
