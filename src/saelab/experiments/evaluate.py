"""`saelab eval --suite core,probing,absorption,control RUN_DIR`: run the chosen evals on one
SAE, write each result into the run directory (eval.json for core, eval_<name>.json for the
others, eval_suite.json with every eval's wall time), record each in the ledger, and return
them. An eval whose result file was made with a config asking for the same work is reused
(the decision is `Config.same_work`, over the fields that eval depends on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field

from saelab.config import Config, StageConfig
from saelab.data.tokens import Positions
from saelab.device import describe, resolve_device
from saelab.evals.absorption import AbsorptionConfig, absorption
from saelab.evals.core import DEFAULT_CTX_LEN, CoreConfig, core_eval
from saelab.evals.probing import ProbingConfig, sparse_probing
from saelab.experiments.control import ControlConfig, randomized_control
from saelab.hookpoints import HookPoint
from saelab.io import cache_dir, read_json, write_json
from saelab.models.hooks import resolve
from saelab.models.load import LoadedModel, load_model
from saelab.runs.ledger import check_ledger, derived_id, record
from saelab.runs.results import EVAL_RESULTS, CoreResult, Result
from saelab.runs.rundir import RunDir
from saelab.saes.base import SparseCoder, load_sae

SUITE = tuple(EVAL_RESULTS)
R = TypeVar("R", bound=Result)


class EvalConfig(StageConfig, CoreConfig):
    """Evaluate one run directory's SAE with the evals of the suite."""

    run: str = Field(..., description="run directory holding checkpoint/")
    suite: list[Literal["core", "probing", "absorption", "control"]] = Field(
        default_factory=lambda: ["core"], description="evals to run: core, probing, absorption, control")
    model: str | None = Field(None, description="model override (default: the one the SAE was trained on)")
    probing: ProbingConfig = ProbingConfig()
    absorption: AbsorptionConfig = AbsorptionConfig()
    control: ControlConfig = ControlConfig()

    def not_used_by(self, name: str) -> set[str]:
        """The fields eval `name` does not depend on (left out when deciding reuse). The run
        directory itself is left out too: its result files move with it."""
        sections = {"probing", "absorption", "control"}
        core_only = {"tokens", "ce_tokens", "dense_thresholds", "similar_pairs", "text", "text_field", "split",
                     "ctx_len", "batch_size"}  # probing and absorption read their own tasks and batches
        own = {"core": set(), "probing": {"probing"}, "absorption": {"absorption"},
               "control": {"control", "probing"}}[name]
        return {"run", "suite"} | (sections - own) | (core_only if name in ("probing", "absorption") else set())


def check_compatible(sae: SparseCoder, meta: dict[str, Any], loaded: LoadedModel, model_name: str) -> HookPoint:
    """The SAE's hook must exist in the model and its d_in must equal the model width; refuse
    with both values otherwise. Returns the resolved hook point."""
    try:
        hp = resolve(loaded.model, meta["hook"])
    except ValueError as e:
        raise ValueError(f"SAE hook {meta['hook']!r} does not exist in model {model_name!r}: {e}") from None
    d_model = loaded.model.config.hidden_size
    if sae.cfg.d_in != d_model:
        raise ValueError(f"SAE d_in {sae.cfg.d_in} (hook {meta['hook']}) does not match model "
                         f"{model_name!r} width {d_model}")
    return hp


def coder_positions(meta: dict[str, Any]) -> Positions:
    """The positions a coder was trained on: recorded in its cfg.json, else (older checkpoints)
    its store's harvest config, else the defaults."""
    if "positions" in meta:
        return Positions.from_config(meta["positions"])
    store = meta.get("store")
    if store and (Path(store) / "manifest.json").is_file():
        return Positions.from_config(read_json(Path(store) / "manifest.json").get("config"))
    return Positions()


@dataclass
class OpenRun:
    """A run directory opened for evaluation: its SAE, checkpoint meta, the model, the checked
    hook point and the positions the SAE reads."""

    run: RunDir
    sae: SparseCoder
    meta: dict[str, Any]
    loaded: LoadedModel
    hp: HookPoint
    positions: Positions
    model_name: str


def open_run(cfg: EvalConfig, loaded: LoadedModel | None = None) -> OpenRun:
    run = RunDir(cfg.run)
    if not (run.checkpoint_dir / "cfg.json").is_file():
        raise FileNotFoundError(f"run directory {run.path} has no checkpoint/cfg.json (is it a trained run?)")
    sae, meta = load_sae(run.checkpoint_dir)
    model_name = cfg.model or meta["model"]
    loaded = loaded or load_model(model_name, dtype=cfg.dtype, device=resolve_device(cfg.device))
    hp = check_compatible(sae, meta, loaded, model_name)
    return OpenRun(run, sae.to(loaded.device).eval(), meta, loaded, hp, coder_positions(meta), model_name)


def _compute(name: str, cfg: EvalConfig, o: OpenRun, progress: bool) -> Result:
    # contexts as long as the coder's own (its harvest's), unless asked otherwise
    cfg = cfg.model_copy(update={"ctx_len": cfg.ctx_len or o.meta.get("ctx_len") or DEFAULT_CTX_LEN})
    if name == "core":
        return core_eval(cfg, o.sae, o.loaded, o.hp, o.positions, o.model_name, progress,
                         baseline_dir=cache_dir() / "eval-baselines")
    if name == "probing":
        return sparse_probing(cfg.probing, o.sae, o.loaded, o.hp, o.positions, progress, cfg.seed)
    if name == "absorption":
        return absorption(cfg.absorption, o.sae, o.loaded, o.hp, o.positions, progress, cfg.seed)
    return randomized_control(cfg, o.sae, o.meta, o.loaded, o.hp, o.positions, progress)


def reusable(cls: type[R], path: Path, cfg: Config, exclude: set[str]) -> R | None:
    """The result in `path` if it was made with a config asking for the same work as cfg (the
    fields in `exclude` left out), else None."""
    if not path.is_file():
        return None
    data = read_json(path)
    versioned = cls.model_fields.get("result_version")
    if versioned is not None and data.get("result_version") != versioned.default:
        return None  # computed with other definitions (or before they were versioned)
    if not cfg.same_work(data.get("config"), exclude=exclude):
        return None
    try:
        return cls.model_validate(data)
    except ValueError:
        return None  # written by an older saelab in another shape: recompute


def stored_result(name: str, cfg: EvalConfig, run: RunDir) -> Result | None:
    """The result file of eval `name` if it was made with a config asking for the same work."""
    return reusable(EVAL_RESULTS[name], run.path / EVAL_RESULTS[name].FILE, cfg, cfg.not_used_by(name))


@dataclass
class SuiteOutput:
    results: dict[str, Result]
    wall_seconds: dict[str, float]
    reused: list[str] = field(default_factory=list)
    ledger_ids: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        lines = []
        for name, r in self.results.items():
            if name == "core":
                lines.append("core")
            lines.append(r.table())
        lines.append("wall seconds: " + ", ".join(f"{k} {v:.1f}" + (" (stored)" if k in self.reused else "")
                                                  for k, v in self.wall_seconds.items()))
        if self.ledger_ids:
            lines.append("ledger: " + ", ".join(f"{k} {v}" for k, v in self.ledger_ids.items()))
        return "\n".join(lines)


def run_suite(cfg: EvalConfig, loaded: LoadedModel | None = None, progress: bool = True,
              suite_file: bool = True) -> SuiteOutput:
    """Run (or reuse) every eval in cfg.suite on cfg.run's SAE; record each in the ledger; write
    eval_suite.json (the evals' wall times, which were reused, their ledger ids) unless suite_file=False."""
    check_ledger(cfg, cfg.run if len(cfg.suite) == 1 else None)
    o = open_run(cfg, loaded)
    out = SuiteOutput({}, {})
    for name in cfg.suite:
        t0 = time.perf_counter()
        result = stored_result(name, cfg, o.run)
        if result is not None:
            out.reused.append(name)
            wall = result.wall_seconds["total"] if isinstance(result, CoreResult) else result.eval_wall_seconds
        else:
            result = _compute(name, cfg, o, progress)
            wall = round(time.perf_counter() - t0, 2)
            update = {"run": str(o.run.path), "config": cfg.model_dump(mode="json"), "seed": cfg.seed,
                      "device": describe(o.loaded.device)}
            if isinstance(result, CoreResult):
                wall = result.wall_seconds["total"]  # what a rerun that reuses it reports
            else:
                update |= {"model": o.model_name, "hook": str(o.hp), "eval_wall_seconds": wall}
            result = result.model_copy(update=update)
            result.write(o.run.path / result.FILE)
        out.results[name] = result
        out.wall_seconds[name] = wall
        rec = record(result, o.run.path, cfg, ledger_id=(cfg.ledger_id or '') if len(cfg.suite) == 1 else derived_id(cfg.ledger_id, name))
        if rec is not None:
            out.ledger_ids[name] = rec.id
    if suite_file:
        write_json(o.run.path / "eval_suite.json", {"run": str(o.run.path), "suite": cfg.suite,
                                                    "wall_seconds": out.wall_seconds, "reused": out.reused,
                                                    "ledger": out.ledger_ids})
    return out


def evaluate(cfg: EvalConfig, loaded: LoadedModel | None = None, progress: bool = True) -> CoreResult:
    """The core eval of cfg.run (eval.json; the summary's `eval`), reused when already done."""
    out = run_suite(cfg.model_copy(update={"suite": ["core"]}), loaded, progress, suite_file=False)
    return out.results["core"]
