"""Typed results: one pydantic model per stage (and per eval of the suite).

A stage returns one of these; the run directory stores it as JSON (`Result.write`), the
ledger records its headline metrics and comparisons (`headline`, `comparisons`, `primary`),
the CLI prints `table()`, and the report and dashboard read the same files back with
`Result.read`. A comparison is always both sides, the difference, the 95% CIs and n.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from saelab.io import read_json, write_json

R = TypeVar("R", bound="Result")


class Comparison(BaseModel):
    """Statistic A vs B on the same units: both sides, a - b, and percentile-bootstrap 95% CIs."""

    model_config = ConfigDict(extra="forbid")

    a: float
    b: float
    diff: float
    a_ci95: list[float]
    b_ci95: list[float]
    diff_ci95: list[float]
    n_units: int
    unit: str
    n_boot: int
    method: str
    sides: str = ""  # what a and b are, e.g. "a = SAE latents, b = residual stream"

    @property
    def conclusive(self) -> bool:
        """The 95% CI of the difference excludes 0 (a NaN CI is not conclusive)."""
        lo, hi = self.diff_ci95
        return math.isfinite(lo) and math.isfinite(hi) and not lo <= 0 <= hi

    def cell(self) -> str:
        lo, hi = self.diff_ci95
        return f"{self.a:.4f} {self.b:.4f} {self.diff:+.4f} [{lo:+.4f}, {hi:+.4f}]"


class Estimate(BaseModel):
    """A mean over independent units with its percentile-bootstrap 95% CI (no comparison)."""

    model_config = ConfigDict(extra="forbid")

    mean: float
    ci95: list[float]
    n_units: int
    n_boot: int = 0
    method: str = ""


class Result(BaseModel):
    """What one stage computed. Subclasses name their stage, kind and file."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    STAGE: ClassVar[str] = ""
    KIND: ClassVar[str] = ""
    FILE: ClassVar[str] = ""  # file name in the run directory
    PRIMARY: ClassVar[str | None] = None  # the comparison the ledger verdict is decided on

    def primary(self) -> str | None:
        """Name of the comparison (in `comparisons()`) the ledger verdict is decided on."""
        return self.PRIMARY

    def headline(self) -> dict[str, float]:
        """The few numbers a ledger row and a results table show."""
        return {}

    def comparisons(self) -> dict[str, Comparison]:
        return {}

    def facts(self) -> dict[str, Any]:
        """Ledger fields this result knows (model, hook, tokens, seed, wall seconds, data, l0, ...)."""
        return {}

    def table(self) -> str:
        return "\n".join(f"  {k:<34} {v:.4f}" for k, v in self.headline().items())

    def write(self, path: str | Path) -> None:
        write_json(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls: type[R], path: str | Path) -> R:
        return cls.model_validate(read_json(path))


def _num(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: float(d[k]) for k in keys if d.get(k) is not None}


class HarvestResult(Result):
    """One activation store (its manifest holds the details)."""

    STAGE: ClassVar[str] = "harvest"
    KIND: ClassVar[str] = "store"
    FILE: ClassVar[str] = "manifest.json"

    model: str
    model_source: str | None = None
    model_hash: str | None = None
    hook: str
    d_in: int
    n_tokens: int
    dtype: str
    text: str
    split: str
    excluded: dict[str, int]
    seed: int
    wall_seconds: float | None = None
    device: str | None = None

    @classmethod
    def read(cls, path: str | Path) -> HarvestResult:
        m = read_json(path)
        return cls(model=m["model"], model_source=m.get("model_source"), model_hash=m.get("model_hash"),
                   hook=m["hook"], d_in=m["d_in"], n_tokens=m["n_tokens"], dtype=m["dtype"], text=m["text"],
                   split=m["split"], excluded=m["excluded"], seed=m["config"].get("seed", 0),
                   wall_seconds=m.get("wall_seconds"), device=m.get("device"))

    def write(self, path: str | Path) -> None:  # the store writer owns manifest.json
        raise NotImplementedError("a harvest result is the store's manifest, written by StoreWriter")

    def headline(self) -> dict[str, float]:
        out = {"tokens": float(self.n_tokens)}
        if self.wall_seconds:
            out["tokens_per_second"] = self.n_tokens / self.wall_seconds
        return out

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "model_hash": self.model_hash, "hook": self.hook, "tokens": self.n_tokens,
                "seed": self.seed, "wall_seconds": self.wall_seconds, "data_source": self.text,
                "data_slice": self.split, "device": self.device}


class TrainResult(Result):
    """A trained sparse coder (summary.json, written once when training ends)."""

    STAGE: ClassVar[str] = "train"
    KIND: ClassVar[str] = "sae"
    FILE: ClassVar[str] = "summary.json"

    stage: str = "train"
    name: str
    smoke: bool = False
    source: str = "store"  # "store" or "on the fly"
    architecture: str
    transcoder: bool
    skip: bool
    d_in: int
    d_out: int
    width: int
    k: int
    steps: int
    tokens: int
    lr: float
    optimizer: str
    train_fvu_last: float
    train_l0_last: float
    train_loss_terms_last: dict[str, float] = {}
    dead_fraction: float
    dead_definition: str
    wall_seconds: float
    tokens_per_second: float
    topk_select_dtype: str
    world_size: int
    hook: str
    hook_out: str | None = None
    model: str
    text: str | None = None  # the text source the activations came from
    seed: int = 0
    device: str | None = None
    peak_memory_bytes: int | None = None

    # older summaries' extras: the core eval's headline now stays in eval.json (summary.json is
    # never rewritten, so the checksum its ledger row holds stays true)
    LEGACY: ClassVar[tuple[str, ...]] = ("verdict", "quickstart_seconds", "run_dir", "eval")

    @classmethod
    def read(cls, path: str | Path) -> TrainResult:
        return cls.model_validate({k: v for k, v in read_json(path).items() if k not in cls.LEGACY})

    def headline(self) -> dict[str, float]:
        out = {"train_fvu": self.train_fvu_last, "train_l0": self.train_l0_last, "dead_fraction": self.dead_fraction,
               "tokens_per_second": self.tokens_per_second}
        return out | {f"train_{k}": v for k, v in self.train_loss_terms_last.items() if k != "fvu"}

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook if not self.hook_out else f"{self.hook}->{self.hook_out}",
                "architecture": self.architecture, "width": self.width, "l0": self.train_l0_last,
                "tokens": self.tokens, "seed": self.seed, "wall_seconds": self.wall_seconds,
                "data_source": self.text or self.source, "data_slice": f"train ({self.source})", "smoke": self.smoke,
                "device": self.device,
                "peak_memory_bytes": self.peak_memory_bytes}


# Bumped when what an eval computes changes meaning (2: evals read the positions the SAE was
# trained on; CE/KL leave out the prediction made at BOS): a stored eval of another version is
# recomputed, never reused.
RESULT_VERSION = 2


class CoreResult(Result):
    """SAEBench core metrics on held-out text (eval.json)."""

    STAGE: ClassVar[str] = "eval"
    KIND: ClassVar[str] = "core"
    FILE: ClassVar[str] = "eval.json"

    stage: str = "eval"
    suite: str = "core"
    result_version: int = RESULT_VERSION
    run: str | None = None
    model: str
    hook: str
    text: str
    split: str
    seed: int = 0
    eval_tokens: int
    explained_variance: float
    fvu: float
    explained_variance_legacy: float
    mse: float
    l0: float
    l1: float
    cosine_similarity: float
    l2_ratio: float
    relative_reconstruction_bias: float
    dead_fraction: float
    dead_latents: int
    dense_fraction: dict[str, float]
    dense_latents: dict[str, int]
    feature_density_histogram: dict[str, Any]
    ce_tokens: int
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_zero_all_positions: float
    ce_mean: float | None = None
    ce_loss_recovered: float
    ce_loss_recovered_all_positions_zeroed: float
    ce_loss_recovered_mean_ablation: float | None = None
    kl_to_clean: float
    ce_baseline: str | None = None  # the SAE-independent passes: "computed", "reused" (cache) or "uncached"
    positions: dict[str, Any]
    similar_decoder_pairs: list[dict[str, Any]]
    definitions: dict[str, str]
    wall_seconds: dict[str, float]
    device: str | None = None
    peak_memory_bytes: int | None = None
    config: dict[str, Any] = {}

    HEADLINE: ClassVar[tuple[str, ...]] = (  # the first three are what a one-line summary shows
        "explained_variance", "ce_loss_recovered", "kl_to_clean", "fvu", "mse", "l0", "l1", "cosine_similarity",
        "l2_ratio", "relative_reconstruction_bias", "dead_fraction", "ce_clean", "ce_sae", "ce_zero",
        "ce_zero_all_positions", "ce_mean", "ce_loss_recovered_all_positions_zeroed",
        "ce_loss_recovered_mean_ablation", "eval_tokens", "ce_tokens")

    def headline(self) -> dict[str, float]:
        return _num(self.model_dump(), self.HEADLINE)

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "l0": self.l0, "tokens": self.eval_tokens, "seed": self.seed,
                "wall_seconds": self.wall_seconds.get("total"), "data_source": self.text, "data_slice": self.split,
                "device": self.device, "peak_memory_bytes": self.peak_memory_bytes}

    def table(self) -> str:
        rows = {"explained_variance_legacy": self.explained_variance_legacy, **self.headline()}
        lines = [f"  {k:<34} {v:.4f}" for k, v in rows.items() if k not in ("eval_tokens", "ce_tokens")]
        lines += [f"  {'dense_fraction > ' + t:<34} {v:.4f}" for t, v in self.dense_fraction.items()]
        return "\n".join(lines)


class _SuiteEval(Result):
    """An eval of the suite other than core (eval_<kind>.json)."""

    STAGE: ClassVar[str] = "eval"

    stage: str = "eval"
    suite: str
    result_version: int = RESULT_VERSION
    run: str | None = None
    model: str | None = None
    hook: str | None = None
    seed: int = 0
    eval_wall_seconds: float | None = None
    device: str | None = None
    config: dict[str, Any] = {}

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "seed": self.seed, "wall_seconds": self.eval_wall_seconds,
                "device": self.device}


class ProbingTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    classes: list[str]
    counts: dict[str, dict[str, int]]
    groups: int
    label_balance: dict[str, int]
    source: str
    accuracy: dict[str, float]
    comparisons: dict[str, Comparison]
    test_examples: int
    comparison_sides: str
    wall_seconds: float


class ProbingResult(_SuiteEval):
    """SAEBench sparse probing on labelled tasks (eval_probing.json)."""

    KIND: ClassVar[str] = "probing"
    FILE: ClassVar[str] = "eval_probing.json"

    suite: str = "probing"
    tasks: dict[str, ProbingTask]
    skipped: dict[str, str]
    ks: list[int]
    pooled: dict[str, Comparison]  # every task's test examples together
    method: str

    def primary(self) -> str | None:
        return f"pooled_k{min(self.ks)}"  # SAEBench's headline: top-1 (the smallest k) accuracy

    def comparisons(self) -> dict[str, Comparison]:
        out = {f"pooled_{k}": c for k, c in self.pooled.items()}
        for t, v in self.tasks.items():
            out |= {f"{t}_{k}": c for k, c in v.comparisons.items() if "_vs_" not in k}
        return out

    def headline(self) -> dict[str, float]:
        out = {}
        for k, c in self.pooled.items():
            out |= {f"sae_{k}_accuracy": c.a, f"resid_{k}_accuracy": c.b}
        return out

    def table(self) -> str:
        lines = ["probing (test accuracy; SAE top-k vs residual top-k, diff [95% CI])",
                 f"  {'task':<16} " + " ".join(f"{'k=' + str(k):>26}" for k in self.ks) + f" {'all vs full resid':>26}"]
        for t, v in {**self.tasks, "pooled": None}.items():
            cmps = self.pooled if v is None else v.comparisons
            cells = []
            for key in [f"k{k}" for k in self.ks] + ["all"]:
                c = cmps[key]
                cells.append(f"{c.a:.2f}/{c.b:.2f} {c.diff:+.2f}[{c.diff_ci95[0]:+.2f},{c.diff_ci95[1]:+.2f}]")
            lines.append(f"  {t:<16} " + " ".join(f"{x:>26}" for x in cells))
        lines += [f"  {t:<16} skipped: {why}" for t, why in self.skipped.items()]
        return "\n".join(lines)


class AbsorptionResult(_SuiteEval):
    """First-letter feature absorption (eval_absorption.json)."""

    KIND: ClassVar[str] = "absorption"
    FILE: ClassVar[str] = "eval_absorption.json"

    suite: str = "absorption"
    words: int
    word_source: str
    letters: int
    absorption_fraction: Estimate
    full_absorption_rate: Estimate
    split_latents_total: int
    letters_with_split: int
    mean_probe_f1: float
    mean_sparse_probe_f1_k1: float
    per_letter: dict[str, dict[str, Any]]
    wall_seconds: float
    method: str

    def headline(self) -> dict[str, float]:
        return {"absorption_fraction": self.absorption_fraction.mean, "full_absorption_rate":
                self.full_absorption_rate.mean, "split_latents_total": float(self.split_latents_total),
                "mean_probe_f1": self.mean_probe_f1, "mean_sparse_probe_f1_k1": self.mean_sparse_probe_f1_k1}

    def table(self) -> str:
        def ci(e: Estimate) -> str:
            return f"{e.mean:.4f} [{e.ci95[0]:+.3f}, {e.ci95[1]:+.3f}]"
        return "\n".join([
            f"absorption ({self.letters} letters, {self.words} words)",
            f"  {'absorption_fraction':<34} {ci(self.absorption_fraction)}",
            f"  {'full_absorption_rate':<34} {ci(self.full_absorption_rate)}",
            f"  {'split latents (letters with split)':<34} {self.split_latents_total} ({self.letters_with_split})",
            f"  {'mean probe F1 (residual / SAE k=1)':<34} {self.mean_probe_f1:.3f} / {self.mean_sparse_probe_f1_k1:.3f}"])


class ControlResult(_SuiteEval):
    """Randomized-model control: real - random on the same units (eval_control.json)."""

    KIND: ClassVar[str] = "control"
    FILE: ClassVar[str] = "eval_control.json"
    PRIMARY: ClassVar[str | None] = "explained_variance"

    suite: str = "control"
    comparison_sides: str
    gaps: dict[str, Comparison]
    probing_skipped: dict[str, str]
    random_run: str
    random_core: dict[str, float]
    budget: dict[str, int]
    wall_seconds: dict[str, float]

    def comparisons(self) -> dict[str, Comparison]:
        return dict(self.gaps)

    def headline(self) -> dict[str, float]:
        out = {}
        for k, g in self.gaps.items():
            out |= {f"{k}_real": g.a, f"{k}_random": g.b}
        return out

    def table(self) -> str:
        return "\n".join(["randomized-model control (real, random, real - random [95% CI])",
                          *(f"  {k:<34} {g.cell()}" for k, g in self.gaps.items())])


class ProbeSettingResult(Result):
    """One data regime of `saelab probe` over every task (RUN/probe/winrate_<setting>.json): each
    probe's mean test AUC, and the win rate of the SAE probes (the paper's quiver of arrows)."""

    STAGE: ClassVar[str] = "probe"
    KIND: ClassVar[str] = "winrate"
    FILE: ClassVar[str] = "probe/winrate.json"  # the stage writes one per setting: probe/winrate_<setting>.json
    PRIMARY: ClassVar[str | None] = "sae"

    stage: str = "probe"
    setting: str
    run: str | None = None
    model: str | None = None
    hook: str | None = None
    pool: str
    seed: int = 0
    tasks: list[str]
    skipped_tasks: dict[str, str] = {}
    points: int  # (task, point) pairs in the win rate
    points_without_validation: int  # n_train < 4: no split, left out of the win rate
    test_auc: dict[str, Estimate]  # probe -> mean over tasks of its mean test AUC over the task's points
    test_acc: dict[str, Estimate]
    quiver: dict[str, Comparison]  # extra probes -> pick among baselines + extra (a) vs baselines only (b)
    picked: dict[str, Estimate]  # extra probes -> share of each task's points where an extra probe is picked
    curve: list[dict[str, Any]]  # per point of the regime: means over tasks (for the plots)
    method: str
    wall_seconds: float | None = None
    device: str | None = None
    config: dict[str, Any] = {}

    def comparisons(self) -> dict[str, Comparison]:
        return dict(self.quiver)

    def headline(self) -> dict[str, float]:
        out = {}
        for k, c in self.quiver.items():
            out |= {f"{k}_picked": self.picked[k].mean, f"{k}_test_auc_with": c.a, f"{k}_test_auc_without": c.b}
        return out | {f"{p}_test_auc": e.mean for p, e in self.test_auc.items()}

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "seed": self.seed, "wall_seconds": self.wall_seconds,
                "data_source": f"{len(self.tasks)} binary tasks", "data_slice": f"{self.setting} ({self.pool} token)"
                if self.pool == "last" else f"{self.setting} (mean-pooled)", "device": self.device}

    def table(self) -> str:
        lines = [f"{self.setting} ({len(self.tasks)} tasks, {self.points} task-points; {self.pool} pooling)",
                 "  mean test AUC over tasks [95% CI]: " + ", ".join(
                     f"{p} {e.mean:.3f} [{e.ci95[0]:.3f}, {e.ci95[1]:.3f}]" for p, e in self.test_auc.items())]
        for k, c in self.quiver.items():
            e = self.picked[k]
            lines.append(f"  +{k:<10} picked {e.mean:.1%} of points; test AUC {c.a:.4f} vs baselines {c.b:.4f}, "
                         f"diff {c.diff:+.4f} [{c.diff_ci95[0]:+.4f}, {c.diff_ci95[1]:+.4f}]")
        return "\n".join(lines)


class _ProbeExtra(Result):
    """A result of `saelab probe` beside the regimes (RUN/probe/<file>)."""

    STAGE: ClassVar[str] = "probe"

    stage: str = "probe"
    run: str | None = None
    model: str | None = None
    hook: str | None = None
    pool: str
    seed: int = 0
    method: str
    wall_seconds: float | None = None
    device: str | None = None
    config: dict[str, Any] = {}

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "seed": self.seed, "wall_seconds": self.wall_seconds,
                "data_slice": f"{self.KIND} ({self.pool} pooling)", "device": self.device}


class ScrTppResult(_ProbeExtra):
    """SAEBench SCR or TPP: per task and probe training size, the score after ablating the SAE's
    top-n latents vs n random ones (paired bootstrap CIs); primary: the mean over tasks at the
    normal size and n = 20 latents."""

    PRIMARY: ClassVar[str | None] = "mean_normal_top20"

    kind: str  # "scr" or "tpp"
    tasks: list[str]
    skipped_tasks: dict[str, str] = {}
    n_values: list[int]
    points: list[dict[str, Any]]  # one per (task, setting, n_train): the scores at every n
    summary: dict[str, Comparison]  # mean over tasks, per setting and n: SAE latents (a) vs random (b)

    def comparisons(self) -> dict[str, Comparison]:
        return dict(self.summary)

    def headline(self) -> dict[str, float]:
        return {f"{self.kind}_{k}": c.a for k, c in self.summary.items() if k.startswith("mean_normal")}

    def facts(self) -> dict[str, Any]:
        return super().facts() | {"data_source": ", ".join(self.tasks)}

    def table(self) -> str:
        lines = [f"{self.kind.upper()} (SAE top-n latents vs n random ones, mean over {len(self.tasks)} tasks)"]
        lines += [f"  {k:<28} {c.cell()}" for k, c in self.summary.items() if k.startswith("mean_normal")]
        return "\n".join(lines)


class ScrResult(ScrTppResult):
    """SAEBench SCR (RUN/probe/scr.json)."""

    KIND: ClassVar[str] = "scr"
    FILE: ClassVar[str] = "probe/scr.json"

    kind: str = "scr"


class TppResult(ScrTppResult):
    """SAEBench TPP (RUN/probe/tpp.json)."""

    KIND: ClassVar[str] = "tpp"
    FILE: ClassVar[str] = "probe/tpp.json"

    kind: str = "tpp"


class ProbeAnalysesResult(_ProbeExtra):
    """Interpretability analyses of the SAE probes (RUN/probe/analyses.json): JS separability of
    top latents, Gini selectivity and Jaccard reuse across tasks, cluster separation."""

    KIND: ClassVar[str] = "analyses"
    FILE: ClassVar[str] = "probe/analyses.json"

    separability: dict[str, list[dict[str, float]]]  # task -> top latents' JS divergence
    selectivity: dict[str, Any]
    clusters: dict[str, dict[str, dict[str, float]]]  # task -> space -> CH / DB / silhouette

    def headline(self) -> dict[str, float]:
        js = [v["js"] for lat in self.separability.values() for v in lat[:1]]
        out = {"top1_js_mean": float(sum(js) / len(js)) if js else float("nan"),
               "gini_mean": self.selectivity["gini"]["mean"], "jaccard_mean": self.selectivity["jaccard_mean_offdiag"]}
        for space in ("resid", "sae"):
            vals = [c[space]["silhouette"] for c in self.clusters.values() if space in c]
            if vals:
                out[f"silhouette_{space}_mean"] = float(sum(vals) / len(vals))
        return out


class QuickstartResult(Result):
    """harvest -> train -> core eval on the embedded defaults (quickstart.json)."""

    STAGE: ClassVar[str] = "quickstart"
    KIND: ClassVar[str] = "pipeline"
    FILE: ClassVar[str] = "quickstart.json"

    model: str
    hook: str
    store: str
    run_dir: str
    dtype: str = "float32"  # the model's, in harvest and eval (quickstart.json files written before it: float32)
    architecture: str
    width: int
    k: int
    d_in: int
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    seed: int
    eval: dict[str, float]
    seconds: dict[str, float]  # harvest, train, eval, interpret, dashboard, total: of the run that did the work
    pages: dict[str, str] = {}  # dashboard (and, once built, report): the pages to open

    def headline(self) -> dict[str, float]:
        return {k: self.eval[k] for k in ("explained_variance", "ce_loss_recovered", "kl_to_clean", "l0",
                                          "dead_fraction") if k in self.eval}

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "architecture": self.architecture, "width": self.width,
                "l0": self.eval.get("l0"), "tokens": self.train_tokens, "seed": self.seed,
                "wall_seconds": self.seconds.get("total"), "data_source": "embedded", "data_slice": "train/validation"}

    def table(self) -> str:
        e = self.eval
        rows = [
            ("model / hook", f"{self.model} / {self.hook}  ({self.dtype})"),
            ("SAE", f"{self.architecture}  width {self.width}  k {self.k}  d_in {self.d_in}"),
            ("trained on", f"{self.train_tokens:,} tokens in {self.train_seconds:.0f} s "
                           f"({self.tokens_per_second:,.0f} tok/s)"),
            ("explained variance", f"{e['explained_variance']:.3f}   (FVU {e['fvu']:.3f}, MSE {e['mse']:.4g})"),
            ("L0", f"{e['l0']:.1f}"),
            ("CE loss recovered", f"{e['ce_loss_recovered']:.3f}   (clean {e['ce_clean']:.3f}, SAE {e['ce_sae']:.3f}, "
                                  f"zero-ablated {e['ce_zero']:.3f} nats)"),
            ("KL to clean", f"{e['kl_to_clean']:.4f} nats/token"),
            ("dead latents", f"{e['dead_fraction']:.4f} of latents never fired on {int(e['eval_tokens']):,} eval tokens"),
            ("eval tokens", f"{int(e['eval_tokens']):,} reconstruction, {int(e['ce_tokens']):,} CE (validation split)"),
            ("wall time", f"{self.seconds['total']:.0f} s (" + ", ".join(
                f"{k} {v:.0f}" for k, v in self.seconds.items() if k != "total") + ")"),
            ("run directory", self.run_dir),
        ] + [(f"{k} page", v) for k, v in self.pages.items()]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


class InterpretResult(Result):
    """Auto-interpretation of one coder's latents (RUN/interp/interp.json): one record per latent
    (its explanations and detection, fuzzing, embedding, ... scores), the scores averaged over
    latents with bootstrap CIs, and the controls (shuffled explanations, the token-list
    explainer, the randomized model when run)."""

    STAGE: ClassVar[str] = "interpret"
    KIND: ClassVar[str] = "interp"
    FILE: ClassVar[str] = "interp/interp.json"
    PRIMARY: ClassVar[str | None] = "detection_real_vs_shuffled"

    stage: str = "interpret"
    result_version: int = 1
    run: str | None = None
    model: str
    hook: str
    seed: int = 0
    width: int
    n_latents: int
    eligible_latents: int
    examples: dict[str, Any]  # the examples pass: tokens, contexts, latents firing, text, split
    latents: list[dict[str, Any]]  # one record per latent
    scores: dict[str, dict[str, Estimate]]  # explanation name -> metric -> mean over latents [95% CI]
    paired: dict[str, Comparison]  # comparisons over the same latents
    controls: dict[str, Any]
    validation: dict[str, Estimate]
    llm: dict[str, Any]  # backends, usage, cache hits, log-probability fallbacks
    parse_failures: dict[str, Any]
    definitions: dict[str, str]
    wall_seconds: dict[str, float]
    device: str | None = None
    peak_memory_bytes: int | None = None
    config: dict[str, Any] = {}

    def comparisons(self) -> dict[str, Comparison]:
        return dict(self.paired)

    def headline(self) -> dict[str, float]:
        out = {}
        for name, metrics in self.scores.items():
            for m in ("detection_balanced_accuracy", "fuzzing_balanced_accuracy", "embedding_auroc",
                      "detection_auroc", "saebench_score", "saebench_floor"):
                if m in metrics and math.isfinite(metrics[m].mean):
                    out[f"{name}_{m}"] = metrics[m].mean
        if "confidence" in self.validation and math.isfinite(self.validation["confidence"].mean):
            out["confidence"] = self.validation["confidence"].mean
        return out

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "tokens": self.examples.get("tokens"), "seed": self.seed,
                "wall_seconds": self.wall_seconds.get("total"), "data_source": self.examples.get("text"),
                "data_slice": self.examples.get("split"), "device": self.device,
                "peak_memory_bytes": self.peak_memory_bytes}

    def table(self) -> str:
        lines = [f"interpretation of {self.n_latents} latents (of {self.eligible_latents} eligible, width "
                 f"{self.width}); mean over latents [95% CI]"]
        metrics = ("detection_balanced_accuracy", "detection_auroc", "fuzzing_balanced_accuracy", "embedding_auroc",
                   "discrimination_accuracy", "simulation_pearson_r", "saebench_score")
        lines.append(f"  {'explanation':<14}" + "".join(f"{m.replace('_balanced_accuracy', ' BA'):>26}"
                                                       for m in metrics))
        for name, ms in self.scores.items():
            cells = []
            for m in metrics:
                e = ms.get(m)
                cells.append("-" if e is None or not math.isfinite(e.mean) else
                             f"{e.mean:.3f} [{e.ci95[0]:.3f},{e.ci95[1]:.3f}]")
            lines.append(f"  {name:<14}" + "".join(f"{c:>26}" for c in cells))
        lines.append("paired over latents (a, b, a - b [95% CI]):")
        lines += [f"  {k:<40} {c.cell()}" for k, c in self.paired.items()]
        for k, v in self.controls.items():
            if isinstance(v, dict) and "comparison" in v:
                c = Comparison.model_validate(v["comparison"])
                lines.append(f"  {k:<40} {c.cell()}  ({c.method.split(',')[0]})")
        if "confidence" in self.validation:
            e = self.validation["confidence"]
            lines.append(f"label confidence (composite): {e.mean:.3f} [{e.ci95[0]:.3f}, {e.ci95[1]:.3f}]")
        return "\n".join(lines)


class InterpretCompareResult(Result):
    """Two coders interpreted on the same latents budget with the same scorer (RUN_A/interp/
    compare-<B>.json): both sides, the difference and its CI (latents of two coders are
    independent units: an unpaired bootstrap)."""

    STAGE: ClassVar[str] = "interpret"
    KIND: ClassVar[str] = "interp-compare"
    FILE: ClassVar[str] = "interp/compare.json"
    PRIMARY: ClassVar[str | None] = "detection_balanced_accuracy"

    stage: str = "interpret"
    run_a: str
    run_b: str
    model: str
    hook: str
    seed: int = 0
    n_latents: dict[str, int]
    sides: str
    gaps: dict[str, Comparison]
    wall_seconds: float | None = None
    config: dict[str, Any] = {}

    def comparisons(self) -> dict[str, Comparison]:
        return dict(self.gaps)

    def headline(self) -> dict[str, float]:
        out = {}
        for k, g in self.gaps.items():
            out |= {f"{k}_a": g.a, f"{k}_b": g.b}
        return out

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "seed": self.seed, "wall_seconds": self.wall_seconds}

    def table(self) -> str:
        return "\n".join([f"interpretation compared: a = {self.run_a}, b = {self.run_b} (a, b, a - b [95% CI])",
                          *(f"  {k:<34} {g.cell()}" for k, g in self.gaps.items())])


EVAL_RESULTS: dict[str, type[Result]] = {"core": CoreResult, "probing": ProbingResult,
                                         "absorption": AbsorptionResult, "control": ControlResult}
RESULTS: tuple[type[Result], ...] = (TrainResult, *EVAL_RESULTS.values(), ProbeSettingResult, ScrResult,
                                     TppResult, ProbeAnalysesResult, QuickstartResult,
                                     InterpretResult, InterpretCompareResult)


class SteerDirection(BaseModel):
    """One steering direction: what it is, its norm, its cosine with the DoM direction, its logit lens."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str
    norm: float
    info: dict[str, Any] = {}
    cosine_with_dom: float | None = None
    lens: dict[str, list[Any]] = {}  # promoted / suppressed: (token, score) pairs


class ScanPoint(BaseModel):
    """One (direction, alpha) on one half of the prompts: success and fluency with CIs over prompts."""

    model_config = ConfigDict(extra="forbid")

    direction: str  # "baseline" for the unsteered alpha = 0
    alpha: float
    half: str  # choose | report
    success: Estimate
    nll: Estimate  # mean per-token NLL of the continuation under the clean model (nats)
    perplexity: float  # exp(nll.mean)
    perplexity_ci95: list[float]
    within_cap: bool
    mean_score: float  # the judge's mean score (VADER compound, or the probe's probability)


class ChosenAlpha(BaseModel):
    """A direction's alpha, chosen on the choose half under the fluency cap."""

    model_config = ConfigDict(extra="forbid")

    alpha: float
    success: float  # on the choose half
    perplexity: float
    max_perplexity: float  # the cap: fluency_cap x the unsteered perplexity (choose half)
    excluded_by_cap: list[float]
    reason: str


class _Intervention(Result):
    """Fields a steering and an ablation result share: where it ran, how long, with what config."""

    run: str | None = None
    definitions: dict[str, str] = {}
    seed: int = 0
    wall_seconds: dict[str, float]
    device: str | None = None
    peak_memory_bytes: int | None = None
    config: dict[str, Any] = {}


class SteerResult(_Intervention):
    """Steering: every direction's scan, chosen alpha and the head-to-head (RUN/steer/<name>.json)."""

    STAGE: ClassVar[str] = "steer"
    KIND: ClassVar[str] = "steering"
    FILE: ClassVar[str] = "steer/sentiment.json"  # the default name; the stage passes its own file
    PRIMARY: ClassVar[str | None] = "sae_vs_dom"

    stage: str = "steer"
    name: str = "sentiment"
    model: str
    hook: str
    concept: str
    judge: dict[str, Any]
    positions: dict[str, Any]
    steer_positions: str
    scale: dict[str, Any]
    alphas: list[float]
    generations: int
    sampling: dict[str, Any]
    prompts: dict[str, Any]
    directions: dict[str, SteerDirection]
    latent_choice: dict[str, Any] = {}
    scan: list[ScanPoint]
    chosen: dict[str, ChosenAlpha]
    head_to_head: dict[str, Comparison]
    fluency_cap: float
    examples: dict[str, list[str]] = {}
    plot: str | None = None
    plot_note: str | None = None
    generations_file: str | None = None

    def primary(self) -> str | None:
        return self.PRIMARY if self.PRIMARY in self.head_to_head else next(iter(self.head_to_head), None)

    def comparisons(self) -> dict[str, Comparison]:
        return dict(self.head_to_head)

    def point(self, direction: str, alpha: float, half: str = "report") -> ScanPoint:
        key = "baseline" if alpha == 0 else direction
        return next(p for p in self.scan if p.direction == key and p.alpha == alpha and p.half == half)

    def headline(self) -> dict[str, float]:
        base = self.point("baseline", 0.0)
        out = {"baseline_success": base.success.mean, "baseline_perplexity": base.perplexity}
        for name, c in self.chosen.items():
            p = self.point(name, c.alpha)
            out |= {f"{name}_alpha": c.alpha, f"{name}_success": p.success.mean, f"{name}_perplexity": p.perplexity}
        return out

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "seed": self.seed, "wall_seconds": self.wall_seconds.get("total"),
                "data_source": f"{len(self.prompts.get('candidates', []))} candidate prompts",
                "data_slice": f"report half ({len(self.prompts.get('report', []))} prompts x {self.generations})",
                "device": self.device, "peak_memory_bytes": self.peak_memory_bytes}

    def table(self) -> str:
        lines = [f"steering toward {self.concept} at {self.hook} (judge: {self.judge.get('rule', self.judge.get('judge'))};"
                 f" s = {self.scale['s']:.3g}; report half: {len(self.prompts['report'])} prompts x {self.generations})",
                 f"  {'direction':<10} {'alpha':>6} {'success [95% CI]':>24} {'perplexity [95% CI]':>26} {'cap':>4}"]
        for p in (p for p in self.scan if p.half == "report"):
            star = " *" if p.direction in self.chosen and self.chosen[p.direction].alpha == p.alpha else ""
            lines.append(f"  {p.direction:<10} {p.alpha:>6g} {p.success.mean:>8.3f} [{p.success.ci95[0]:.3f}, "
                         f"{p.success.ci95[1]:.3f}] {p.perplexity:>10.2f} [{p.perplexity_ci95[0]:.2f}, "
                         f"{p.perplexity_ci95[1]:.2f}] {'ok' if p.within_cap else 'over':>4}{star}")
        lines.append("  chosen on the choose half (* above): " + ", ".join(f"{k} alpha {c.alpha:g}"
                                                                         for k, c in self.chosen.items()))
        lines.append("  head to head (report half; a, b, a - b [95% CI]):")
        lines += [f"    {k:<22} {c.cell()}" for k, c in self.head_to_head.items()]
        return "\n".join(lines)


class LatentAblation(BaseModel):
    """One latent ablated: Delta CE with its CI over contexts, the tokens it moves, its logit lens."""

    model_config = ConfigDict(extra="forbid")

    latent: int
    fire_fraction: float  # of the eval tokens
    mean_activation: float
    contexts_changed: int  # contexts where the ablation moved the activation (the others are unchanged)
    delta_ce: Comparison  # a = CE ablated, b = CE clean; diff = Delta CE
    moves: dict[str, list[Any]]  # promoted / suppressed: (token, mean change of log p)
    target_drops: list[dict[str, Any]]
    lens: dict[str, list[Any]] = {}


class AblateResult(_Intervention):
    """Latent ablation with the SAE spliced in and its error kept (RUN/ablate/<name>.json)."""

    STAGE: ClassVar[str] = "ablate"
    KIND: ClassVar[str] = "ablation"
    FILE: ClassVar[str] = "ablate/ablate.json"  # the default name; the stage passes its own file

    stage: str = "ablate"
    name: str = "ablate"
    model: str
    hook: str
    mode: str
    text: str
    split: str
    contexts: int
    tokens: int
    ce_clean: float
    latents: list[LatentAblation]
    joint: Comparison | None = None  # the whole set ablated at once
    joint_moves: dict[str, list[Any]] | None = None
    positions: dict[str, Any]
    excluded: dict[str, int] = {}
    engine: dict[str, Any] = {}

    def primary(self) -> str | None:
        """The whole set ablated at once (no latent picked after the fact), or the one latent."""
        if self.joint is not None:
            return "joint"
        return f"latent_{self.latents[0].latent}" if len(self.latents) == 1 else None

    def comparisons(self) -> dict[str, Comparison]:
        out = {"joint": self.joint} if self.joint is not None else {}
        return out | {f"latent_{x.latent}": x.delta_ce for x in self.latents}

    def headline(self) -> dict[str, float]:
        out = {"ce_clean": self.ce_clean, "latents": float(len(self.latents)),
               "max_delta_ce": max((x.delta_ce.diff for x in self.latents), default=0.0),
               "mean_delta_ce": float(sum(x.delta_ce.diff for x in self.latents) / max(len(self.latents), 1))}
        if self.joint is not None:
            out["joint_delta_ce"] = self.joint.diff
        return out

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "hook": self.hook, "tokens": self.tokens, "seed": self.seed,
                "wall_seconds": self.wall_seconds.get("total"), "data_source": self.text, "data_slice": self.split,
                "device": self.device, "peak_memory_bytes": self.peak_memory_bytes}

    def table(self) -> str:
        lines = [f"{self.mode}-ablation at {self.hook}: {self.contexts} contexts, {self.tokens:,} scored tokens, "
                 f"CE clean {self.ce_clean:.4f} (SAE spliced, error kept)",
                 f"  {'latent':>7} {'fires':>7} {'Delta CE [95% CI]':>30}  promoted (ablation lowers) / lens"]
        for x in self.latents:
            d = x.delta_ce
            prom = " ".join(repr(t) for t, _ in x.moves.get("promoted", [])[:4])
            lens = " ".join(repr(t) for t, _ in x.lens.get("promoted", [])[:4])
            lines.append(f"  {x.latent:>7} {x.fire_fraction:>7.4f} {d.diff:>+10.5f} [{d.diff_ci95[0]:+.5f}, "
                         f"{d.diff_ci95[1]:+.5f}]  {prom} / {lens}")
        if self.joint is not None:
            d = self.joint
            lines.append(f"  {'joint':>7} {'':>7} {d.diff:>+10.5f} [{d.diff_ci95[0]:+.5f}, {d.diff_ci95[1]:+.5f}]  "
                         f"(all {len(self.latents)} at once)")
        e = self.engine
        if e:
            lines.append(f"  engine: {e.get('ablated_rows')} ablated context rows of {e.get('rows_if_every_context')} "
                         f"in {e.get('forward_passes')} forward passes ({'blocks after the hook only' if e.get('suffix_forward') else 'full passes'})")
        return "\n".join(lines)
