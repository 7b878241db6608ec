"""`saelab probe RUN`: probing under four data regimes (normal, scarcity, imbalance, label noise)
with residual-stream baselines and SAE probes on every binary task, the SAE probes' win rate per
regime, and the randomized-model SAE's probes as their control.

Writes RUN/probe/: records.json (one record per task, setting, point and probe), tasks.json
(source, size and split of each task), winrate_<setting>.json (a ProbeSettingResult each, one
ledger row each), probe.json (the config, wall times, what was reused) and plots/*.png. Features
are computed once per base task and cached in RUN/probe/features/ (keyed by SAE, model, task and
pooling), so a rerun with other settings or probes reads them back; a rerun asking for the same
work reuses records.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from saelab.config import StageConfig
from saelab.data.tasks import (
    BINARY_TASKS,
    BUILTINS,
    SCR_PAIRS,
    BinaryTask,
    TaskData,
    TaskSpec,
    binary_rows,
    binary_tasks_of,
    builtin_available,
    builtin_spec,
    load_task,
)
from saelab.device import describe
from saelab.evals.probe_analyses import cluster_separation, selectivity_and_reuse, separability
from saelab.evals.probe_features import Features, task_features
from saelab.evals.probe_regimes import (
    BASELINES,
    CONTROL_PREFIX,
    MAX_TRAIN,
    SAE_PROBES,
    SETTINGS,
    grid,
    make_probes,
    setting_summary,
)
from saelab.evals.scr_tpp import N_VALUES, scarcity_sizes, scr, summarize, tpp
from saelab.experiments.control import ControlConfig, random_model_coder
from saelab.experiments.evaluate import EvalConfig, open_run
from saelab.io import read_json, write_json
from saelab.models.load import LoadedModel
from saelab.runs.ledger import check_ledger, record
from saelab.runs.results import ProbeAnalysesResult, ProbeSettingResult, ScrResult, TppResult
from saelab.saes.base import load_sae

Setting = Literal["normal", "scarcity", "imbalance", "label_noise"]
CONTROL_PROBES = tuple(CONTROL_PREFIX + p[len("sae_"):] for p in SAE_PROBES)


class ProbeConfig(StageConfig):
    """Probing under four data regimes (Kantamneni et al. 2025) with baselines and SAE probes."""

    UNHASHED: ClassVar[frozenset[str]] = StageConfig.UNHASHED | {"n_jobs", "run"}

    run: str = Field(..., description="run directory holding checkpoint/")
    settings: list[Setting] = Field(default_factory=lambda: list(SETTINGS),
                                    description="regimes: normal, scarcity, imbalance, label_noise")
    probes: list[str] = Field(default_factory=lambda: [*BASELINES, *SAE_PROBES],
                              description="baselines logreg, pca, knn, gbdt, mlp on the residual; SAE probes "
                              "sae_topk, sae_all on the latents")
    tasks: list[str | TaskSpec] = Field(
        default_factory=lambda: list(BINARY_TASKS),
        description="binary tasks (saelab.data.tasks.BINARY_TASKS), built-in task names (all their binary "
        "tasks), or TaskSpec mappings of your own .jsonl/.csv (two classes: one task; more: one per class vs "
        "the rest); a task whose source is not fetched is skipped with the reason")
    pool: Literal["last", "mean"] = Field("last", description="features at the last kept token (as Kantamneni et "
                                          "al.) or mean-pooled over the kept tokens (as SAEBench)")
    budget: int = Field(4, ge=1, le=8, description="hyperparameter configurations each probe tries (every probe the same, at most 8), "
                        "scored by validation AUC on the training rows")
    max_train: int = Field(MAX_TRAIN, gt=1, description="most training rows of a point (the paper's 1024)")
    max_per_class: int | None = Field(None, description="override each base task's examples per class (None: the "
                                      "task's own, 400 for the built-ins)")
    max_tokens: int = Field(32, ge=2, description="tokens per example (longer texts are cut)")
    batch_size: int = Field(32, gt=0, description="examples per forward pass")
    scr_tpp: bool = Field(True, description="also SAEBench SCR and TPP, at the normal size and the scarcity sizes")
    scr_pairs: list[str] = Field(default_factory=lambda: ["category_number"], description="SCR tasks (two "
                                 "attributes per row): " + ", ".join(SCR_PAIRS) + " (kind_genre is not a default: "
                                 "a line's genre is barely decodable, so its oracle is no better than the biased probe)")
    tpp_tasks: list[str] = Field(default_factory=lambda: ["language_id", "pos", "city_continent", "text_source"],
                                 description="TPP tasks (built-in, three or more classes)")
    scr_pool: Literal["last", "mean"] = Field("mean", description="pooling for SCR / TPP (mean, as SAEBench)")
    analyses: bool = Field(True, description="also the interpretability analyses (JS separability, Gini selectivity, "
                           "Jaccard reuse, cluster separation)")
    control: bool = Field(True, description="also probe the randomized-model SAE (ctrl_topk, ctrl_all); it is "
                          "trained at the control's budgets unless RUN/control already holds it")
    control_cfg: ControlConfig = Field(default_factory=ControlConfig, description="the randomized-model control")
    n_jobs: int = Field(2, ge=1, description="worker processes for the grid (one thread each)")
    bootstrap: int = Field(1000, gt=0, description="bootstrap resamples over tasks")
    seed: int = 0
    model: str | None = Field(None, description="model override (default: the one the SAE was trained on)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model dtype")


def resolve_binary_tasks(tasks: list[str | TaskSpec], max_per_class: int | None = None
                         ) -> tuple[list[tuple[BinaryTask, TaskSpec]], dict[str, str]]:
    """(binary task, its base task's spec) for every task asked for, and the skipped ones with why."""
    out, skipped = [], {}
    for t in tasks:
        if isinstance(t, TaskSpec):
            spec = t.model_copy(update={"max_per_class": max_per_class}) if max_per_class else t
            classes = sorted({str(r) for r in load_task(spec).classes})
            out += [(bt, spec) for bt in binary_tasks_of(spec, classes)]
            continue
        if t in BINARY_TASKS:
            bts = [BINARY_TASKS[t]]
        elif t in BUILTINS:
            bts = [b for b in BINARY_TASKS.values() if b.base == t]
        else:
            raise ValueError(f"unknown task {t!r}: binary tasks are {', '.join(BINARY_TASKS)}; built-in tasks "
                             f"{', '.join(BUILTINS)}; or give a mapping with name/source/text_field/label_field")
        for bt in bts:
            if not builtin_available(bt.base):
                skipped[bt.name] = f"source not fetched ({', '.join(BUILTINS[bt.base].assets)}); run `saelab data fetch`"
                continue
            spec = builtin_spec(bt.base, **({"max_per_class": max_per_class} if max_per_class else {}))
            out.append((bt, spec))
    if not out:
        raise ValueError(f"no probing task could run: {skipped or 'the task list is empty'}")
    return out, skipped


def task_record(bt: BinaryTask, spec: TaskSpec, data: TaskData, y: np.ndarray, test: np.ndarray) -> dict:
    what = BUILTINS[spec.name].what if spec.source.startswith("builtin:") else f"your task {spec.source}"
    return {"task": bt.name, "what": bt.describe(), "base": spec.name, "source": data.source, "base_what": what,
            "split": f"grouped by field {spec.group_field or spec.text_field!r}: {spec.test_fraction:.0%} of each "
                     "class's groups held out (seeded hash order), no group on both sides",
            "size": int(len(y)), "train": {"positive": int((y[~test] == 1).sum()), "negative": int((y[~test] == 0).sum())},
            "test": {"positive": int((y[test] == 1).sum()), "negative": int((y[test] == 0).sum())},
            "groups": len(set(data.groups))}


# what each part of the stage depends on; a part is reused when its stored config agrees on these
NOT_GRID = frozenset({"scr_tpp", "scr_pairs", "tpp_tasks", "scr_pool", "analyses"})
DEPENDS = {"scr": {"run", "model", "dtype", "max_per_class", "max_tokens", "batch_size", "budget", "bootstrap", "seed",
                   "scr_pool", "scr_pairs"},
           "tpp": {"run", "model", "dtype", "max_per_class", "max_tokens", "batch_size", "budget", "bootstrap", "seed",
                   "scr_pool", "tpp_tasks"},
           "analyses": {"run", "model", "dtype", "max_per_class", "max_tokens", "batch_size", "seed", "tasks", "pool",
                        "control", "control_cfg"}}


def _kept(cfg: ProbeConfig, cls, path):
    """The result file of an SCR / TPP / analyses part if it was made asking for the same work."""
    r = _stored(cls, path)
    if r is None or not cfg.same_work(r.config, exclude=set(ProbeConfig.model_fields) - DEPENDS[cls.KIND]):
        return None
    return r


def _stored(cls, path):
    try:
        return cls.read(path) if path.is_file() else None
    except ValueError:
        return None  # written by an older saelab in another shape: recompute


class Featurizer:
    """Loads base tasks and their cached features (RUN/probe/features/) for the SAE and the control's."""

    def __init__(self, cfg: ProbeConfig, o, ecfg: EvalConfig, out, with_control: bool, progress: bool):
        self.cfg, self.o, self.out, self.progress = cfg, o, out, progress
        self.coders = {"sae": (o.loaded, o.sae)}
        self.tasks: dict[str, TaskData] = {}
        self.seconds = {"control_sae": 0.0, "features": 0.0}
        self.reused = 0
        if with_control:
            t0 = time.perf_counter()
            rand, rand_run, _ = random_model_coder(ecfg, o.sae, o.meta, o.loaded, o.hp, o.positions, progress)
            rand_sae, _ = load_sae(rand_run.checkpoint_dir)
            self.coders["ctrl"] = (rand, rand_sae.to(rand.device).eval())
            self.seconds["control_sae"] = round(time.perf_counter() - t0, 1)

    def task(self, spec: TaskSpec) -> TaskData:
        if spec.name not in self.tasks:
            self.tasks[spec.name] = load_task(spec)
        return self.tasks[spec.name]

    def features(self, spec: TaskSpec, coder: str, pool: str) -> Features:
        t0 = time.perf_counter()
        model, sae = self.coders[coder]
        f, hit = task_features(self.task(spec).texts, model, self.o.hp, sae, self.o.positions, self.out / "features",
                               self.cfg.max_tokens, self.cfg.batch_size, self.progress,
                               desc=f"features {spec.name} ({coder})")
        self.reused += hit
        self.seconds["features"] = round(self.seconds["features"] + time.perf_counter() - t0, 1)
        return f[pool]


def run_grid(cfg: ProbeConfig, fz: Featurizer, probes: list[str], ctrl_probes: list[str]):
    """The regimes x probes grid over every binary task: (records, tasks.json rows, skipped tasks)."""
    pairs, skipped = resolve_binary_tasks(cfg.tasks, cfg.max_per_class)
    jobs, tasks_info = [], []
    for bt, spec in pairs:
        data = fz.task(spec)
        rows, y = binary_rows(data, bt)
        f = fz.features(spec, "sae", cfg.pool)
        m = {"resid": f.x[rows], "sae": f.z[rows]}
        if ctrl_probes:
            m["ctrl"] = fz.features(spec, "ctrl", cfg.pool).z[rows]
        tasks_info.append(task_record(bt, spec, data, y, data.test[rows]))
        jobs.append((bt.name, m, y, data.test[rows], list(cfg.settings),
                     make_probes([*probes, *ctrl_probes], cfg.budget, cfg.seed), cfg.seed, cfg.max_train))
    t0 = time.perf_counter()
    records = [r for rs in grid(jobs, cfg.n_jobs, fz.progress) for r in rs]
    fz.seconds["grid"] = round(time.perf_counter() - t0, 1)
    return records, tasks_info, skipped


def run_scr_tpp(cfg: ProbeConfig, fz: Featurizer, kinds: tuple[str, ...] = ("scr", "tpp")
                ) -> tuple[dict[str, list], dict[str, str]]:
    """SCR on every pair of cfg.scr_pairs and TPP on every task of cfg.tpp_tasks (those of `kinds`),
    at the normal size and the scarcity sizes: (points by kind, skipped tasks with why)."""
    w_dec = fz.o.sae.W_dec.detach().float().cpu().numpy()
    points: dict[str, list] = {"scr": [], "tpp": []}
    skipped = {}
    for kind, names in (("scr", cfg.scr_pairs), ("tpp", cfg.tpp_tasks)):
        if kind not in kinds:
            continue
        for name in names:
            if name not in BUILTINS or (kind == "scr" and name not in SCR_PAIRS):
                raise ValueError(f"unknown {kind} task {name!r}; built-in: "
                                 f"{', '.join(SCR_PAIRS if kind == 'scr' else BUILTINS)}")
            if not builtin_available(name):
                skipped[f"{kind}:{name}"] = f"source not fetched ({', '.join(BUILTINS[name].assets)})"
                continue
            spec = builtin_spec(name, **({"max_per_class": cfg.max_per_class} if cfg.max_per_class else {}))
            data = fz.task(spec)
            f = fz.features(spec, "sae", cfg.scr_pool)
            seed = cfg.seed
            if kind == "scr":
                (pa, _), (pb, _) = SCR_PAIRS[name]
                attr = [c.rsplit("_", 1) for c in data.classes]  # "<a>_<b>"
                a = np.array([attr[i][0] == pa for i in data.labels], dtype=int)
                b = np.array([attr[i][1] == pb for i in data.labels], dtype=int)
                q = min(int((~data.test & (a == i) & (b == j)).sum()) for i in (0, 1) for j in (0, 1))
                sizes = {"normal": [2 * q]} | {"scarcity": scarcity_sizes(2 * q, 12)}
                for setting, ns in sizes.items():
                    for n in ns:
                        r = scr(f.x, f.z, a, b, data.test, w_dec, n, budget=cfg.budget, n_boot=cfg.bootstrap, seed=seed)
                        points[kind].append({"task": name, "setting": setting, **r})
            else:
                q = min(int((~data.test & (data.labels == i)).sum()) for i in range(len(data.classes)))
                for setting, ns in {"normal": [2 * q], "scarcity": scarcity_sizes(2 * q, 12)}.items():
                    for n in ns:
                        r = tpp(f.x, f.z, data.labels, data.classes, data.test, w_dec, n, budget=cfg.budget,
                                n_boot=cfg.bootstrap, seed=seed)
                        points[kind].append({"task": name, "setting": setting, **r})
    return points, skipped


def run_analyses(cfg: ProbeConfig, fz: Featurizer, with_control: bool) -> dict:
    """JS separability per binary task, Gini selectivity and Jaccard reuse across them, and the cluster
    separation of the multi-class base tasks in residual, SAE and (control) SAE-latent space."""
    pairs, _ = resolve_binary_tasks(cfg.tasks, cfg.max_per_class)
    sep, sel_in = {}, {}
    for bt, spec in pairs:
        data = fz.task(spec)
        rows, y = binary_rows(data, bt)
        z = fz.features(spec, "sae", cfg.pool).z[rows]
        sep[bt.name] = separability(z, y, data.test[rows])
        sel_in[bt.name] = (z, y, data.test[rows])
    clusters = {}
    for spec in {s.name: s for _, s in pairs}.values():
        data = fz.task(spec)
        if len(data.classes) < 3:
            continue
        f = fz.features(spec, "sae", cfg.pool)
        spaces = {"resid": f.x[data.test], "sae": f.z[data.test]}
        if with_control:
            g = fz.features(spec, "ctrl", cfg.pool)
            spaces |= {"ctrl_resid": g.x[data.test], "ctrl_sae": g.z[data.test]}
        clusters[spec.name] = cluster_separation(spaces, data.labels[data.test], seed=cfg.seed)
    return {"separability": sep, "selectivity": selectivity_and_reuse(sel_in), "clusters": clusters}


def probe(cfg: ProbeConfig, loaded: LoadedModel | None = None, progress: bool = True) -> list:
    """Run (or reuse) the grid on cfg.run's SAE, write RUN/probe/ and record one ledger row per
    setting (and one each for SCR, TPP and the analyses). Returns the results."""
    check_ledger(cfg)
    t0 = time.perf_counter()
    ecfg = EvalConfig(run=cfg.run, model=cfg.model, dtype=cfg.dtype, device=cfg.device, ledger=cfg.ledger,
                      control=cfg.control_cfg, seed=cfg.seed)
    o = open_run(ecfg, loaded)
    out = o.run.path / "probe"
    ctrl_probes = [p for p in cfg.probes if p.startswith(CONTROL_PREFIX)]
    probes = [p for p in cfg.probes if not p.startswith(CONTROL_PREFIX)]
    if cfg.control and not ctrl_probes:
        ctrl_probes = [c for c, s in zip(CONTROL_PROBES, SAE_PROBES, strict=True) if s in probes]
    make_probes([*probes, *ctrl_probes])  # refuse unknown names before any work
    stored = read_json(out / "probe.json") if (out / "probe.json").is_file() else None
    reused = (stored is not None and cfg.same_work(stored.get("config"), exclude=NOT_GRID)
              and (out / "records.json").is_file())
    seconds: dict = {}
    common = {"run": str(o.run.path), "model": o.model_name, "hook": str(o.hp), "seed": cfg.seed,
              "device": describe(o.loaded.device), "config": cfg.model_dump(mode="json")}
    fz = None
    if reused:
        records, skipped, seconds = read_json(out / "records.json"), stored["skipped"], dict(stored["wall_seconds"])
    else:
        fz = Featurizer(cfg, o, ecfg, out, bool(ctrl_probes), progress)
        records, tasks_info, skipped = run_grid(cfg, fz, probes, ctrl_probes)
        write_json(out / "records.json", records)
        write_json(out / "tasks.json", tasks_info)
    extra = []
    if cfg.scr_tpp:
        kept = {c.KIND: _kept(cfg, c, out / Path(c.FILE).name) for c in (ScrResult, TppResult)}
        extra += [r for r in kept.values() if r is not None]
        todo = tuple(k for k, r in kept.items() if r is None)
        if todo:
            fz = fz or Featurizer(cfg, o, ecfg, out, bool(ctrl_probes), progress)
            t1 = time.perf_counter()
            points, skipped_st = run_scr_tpp(cfg, fz, todo)
            wall = fz.seconds["scr_tpp"] = round(time.perf_counter() - t1, 1)
            for cls, kind in ((ScrResult, "scr"), (TppResult, "tpp")):
                if points[kind]:
                    summary, clean = summarize(points[kind], kind)
                    names = cfg.scr_pairs if kind == "scr" else cfg.tpp_tasks
                    r = cls(**common, pool=cfg.scr_pool, method=SCR_TPP_METHOD, wall_seconds=wall,
                            tasks=sorted({p["task"] for p in points[kind]}), n_values=list(N_VALUES), points=clean,
                            summary=summary, skipped_tasks={k: v for k, v in skipped_st.items()
                                                            if k.split(":", 1)[1] in names})
                    r.write(out / Path(cls.FILE).name)
                    extra.append(r)
    if cfg.analyses:
        kept_a = _kept(cfg, ProbeAnalysesResult, out / "analyses.json")
        if kept_a is not None:
            extra.append(kept_a)
        else:
            fz = fz or Featurizer(cfg, o, ecfg, out, bool(ctrl_probes), progress)
            t1 = time.perf_counter()
            a = run_analyses(cfg, fz, bool(ctrl_probes))
            wall = fz.seconds["analyses"] = round(time.perf_counter() - t1, 1)
            r = ProbeAnalysesResult(**common, pool=cfg.pool, method=ANALYSES_METHOD, wall_seconds=wall, **a)
            r.write(out / "analyses.json")
            extra.append(r)
    if fz is not None:  # this call did work: its wall times (the grid's kept when the grid was reused)
        seconds |= {k: v for k, v in fz.seconds.items() if v or k not in seconds}
        seconds["feature_files_reused"] = fz.reused
        seconds["total" if not reused else "total_this_call"] = round(time.perf_counter() - t0, 1)
    extras = {"sae": [p for p in SAE_PROBES if p in probes]}
    extras |= {p: [p] for p in SAE_PROBES if p in probes and len(extras["sae"]) > 1}
    if ctrl_probes:
        extras["control"] = ctrl_probes
    baselines = [p for p in probes if p in BASELINES]
    results = []
    for setting in cfg.settings:
        path = out / f"winrate_{setting}.json"
        r = _stored(ProbeSettingResult, path) if reused else None
        if r is None:  # computed now (or its file is missing): written, and recorded as a new row
            fields = setting_summary(records, setting, baselines, extras, cfg.bootstrap, cfg.seed)
            r = ProbeSettingResult(**fields, **common, pool=cfg.pool, skipped_tasks=skipped,
                                   wall_seconds=seconds.get("total"))
            r.write(path)
        results.append(r)
    for r in [*results, *extra]:
        name = r.setting if isinstance(r, ProbeSettingResult) else r.KIND
        path = out / (f"winrate_{name}.json" if isinstance(r, ProbeSettingResult) else Path(r.FILE).name)
        record(r, o.run.path, cfg, result_file=path, ledger_id=f"{cfg.ledger_id}-{name}" if cfg.ledger_id else "")
    write_json(out / "probe.json", {"run": str(o.run.path), "config": cfg.model_dump(mode="json"),
                                    "wall_seconds": seconds, "reused": reused, "skipped": skipped,
                                    "files": ["records.json", "tasks.json", *[f"winrate_{s}.json" for s in cfg.settings],
                                              *[Path(r.FILE).name for r in extra]]})
    try:
        from saelab.report.probe_plots import analyses_plots, probe_plots, scr_tpp_plots

        probe_plots(results, records, out / "plots")
        for r in extra:
            (analyses_plots if isinstance(r, ProbeAnalysesResult) else scr_tpp_plots)(r, out / "plots")
    except ImportError as e:  # matplotlib is a dependency; a broken install still gets the numbers
        write_json(out / "plots_skipped.json", {"reason": f"matplotlib could not be imported: {e}"})
    return [*results, *extra]


SCR_TPP_METHOD = ("SAEBench SCR / TPP (Karvonen et al. 2025) on cached pooled features: latents zero-ablated with the "
                  "SAE error kept, ranked by delta-mu x (w_probe . W_dec); vs the same number of random latents with a "
                  "nonzero effect; probes: standardised logistic regression, C by validation AUC on their training rows")
ANALYSES_METHOD = ("JS divergence (bits) of the top-10 latents' class-conditional activations (chosen on train rows, "
                   "measured on test rows); Gini over tasks of each top-20 latent's normalised |class-mean difference|; "
                   "Jaccard overlap of top-20 sets; Calinski-Harabasz / Davies-Bouldin / silhouette of multi-class "
                   "tasks' test rows in standardised residual vs SAE-latent space (and the randomized model's)")
