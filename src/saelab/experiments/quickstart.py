"""The whole loop on the embedded defaults: harvest -> train -> core eval -> a few latents explained
and scored -> the feature dashboard and the results report, then a summary table.

Each stage records its own ledger row; the quickstart records one more (its headline, with the
user's --ledger-id when given, so a prediction registered for that id is checked on it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.config import StageConfig
from saelab.device import resolve_device, select_dtype
from saelab.experiments.evaluate import EvalConfig, evaluate
from saelab.interp.explain import PromptName
from saelab.interp.score import ScorerName
from saelab.models.load import load_model
from saelab.runs.ledger import Ledger, check_ledger, ledger_path, record
from saelab.runs.results import QuickstartResult, TrainResult
from saelab.saes.config import SAEConfig
from saelab.train.trainer import TrainConfig, train


class QuickstartConfig(StageConfig):
    """harvest -> train -> eval on the embedded model and corpus."""

    model: str = Field("smollm2", description="'smollm2' (embedded), local dir or .gguf, or hub id")
    hook: str = Field("resid_post.10", description="hook point KIND.LAYER")
    runs_dir: str = Field("runs", description="where the run and store directories go")
    name: str = Field("quickstart", description="run name prefix: the run directory is <runs_dir>/<name>-<hash>")
    harvest_tokens: int = Field(400_000, gt=0, description="activations to harvest")
    train_tokens: int = Field(1_200_000, gt=0, description="tokens to train on (several passes over the store)")
    eval_tokens: int = Field(32_768, gt=0, description="validation tokens for reconstruction metrics")
    ce_tokens: int = Field(16_384, gt=0, description="validation tokens for CE / KL")
    width: int = Field(4608, gt=0, description="number of latents")
    k: int = Field(32, gt=0, description="active latents per token")
    batch_size: int = Field(4096, gt=0, description="training batch")
    lr: float = Field(1e-3, gt=0, description="higher than the long-run default: measured better for this short budget")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="model dtype for harvest, eval and the examples pass; 'auto' = bfloat16 where the device "
        "computes it natively (a GPU that supports it, a CPU with AVX512-BF16: the harvest runs 2.4x faster there with "
        "the same EV and CE recovered, docs/benchmarks.md), else float32; resolved before hashing, so the run "
        "directory and the ledger name the dtype that ran")
    seed: int = 0
    explain_latents: int = Field(16, ge=0, description="latents explained and scored by the embedded model for the "
                                 "dashboard (0: none)")
    dashboard: bool = Field(True, description="build the feature dashboard (RUN/dashboard/index.html)")
    examples_tokens: int = Field(50_000, gt=0, description="held-out tokens of the examples pass the explanations "
                                 "and the dashboard share")
    explain_prompts: list[PromptName] = Field(default_factory=lambda: ["default"], description="explanation prompts "
                                              "of the quickstart's interpretation (`saelab interpret` runs all four "
                                              "and a consensus); two or more add the consensus")
    scorers: list[ScorerName] = Field(default_factory=lambda: ["detection", "embedding"], description="scorers of the "
                               "quickstart's interpretation, always with the shuffled and token-list controls "
                               "(`saelab interpret` adds fuzzing, discrimination and SAEBench's)")
    report: bool = Field(True, description="build the results report from the ledger (<runs_dir>/report.html)")

    PAGES: ClassVar[frozenset[str]] = frozenset({"explain_latents", "dashboard", "examples_tokens", "explain_prompts",
                                                "scorers", "report"})  # shown, not trained

    REQUIRED: ClassVar[dict[str, tuple[str, str]]] = {  # field -> (value it must list, why)
        "explain_prompts": ("default", "its explanations are what the controls are compared against, the ledger "
                            "row records and the dashboard shows"),
        "scorers": ("detection", "the interpretation's ledger row compares real against shuffled explanations by "
                    "detection balanced accuracy")}

    @field_validator("explain_prompts", "scorers")
    @classmethod
    def _keeps_what_is_read(cls, v: list[str], info: ValidationInfo) -> list[str]:
        need, why = cls.REQUIRED[info.field_name]
        if need not in v:
            raise ValueError(f"must include {need!r}: {why}")
        return v


def stage_seconds(now: dict[str, float], before: dict[str, float] | None) -> dict[str, float]:
    """Each stage's time in the run that did its work: a rerun reuses a finished stage in seconds
    (under 5 s or a tenth of the time it took; then the earlier time is kept), a stage redone (its
    settings changed, or it was killed before) reports this run's time; total = their sum."""
    before = before or {}
    out = {k: round(before[k] if k in before and v < max(5.0, 0.1 * before[k]) else v, 1) for k, v in now.items()}
    return out | {"total": round(sum(out.values()), 1)}


def quickstart(cfg: QuickstartConfig, progress: bool = True) -> QuickstartResult:
    """Run (or reuse) each stage; returns the result (also in <run>/quickstart.json)."""
    check_ledger(cfg)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    cfg = cfg.model_copy(update={"dtype": str(select_dtype(cfg.dtype, device)).removeprefix("torch.")})
    loaded = load_model(cfg.model, dtype=cfg.dtype, device=device)
    examples = {"tokens": cfg.examples_tokens, "dtype": cfg.dtype}
    sub = {"device": cfg.device, "ledger": cfg.ledger}  # every stage runs and records where the quickstart does
    hcfg = HarvestConfig(model=cfg.model, hook=cfg.hook, tokens=cfg.harvest_tokens, dtype=cfg.dtype, seed=cfg.seed,
                         **sub)
    hcfg.out = str(Path(cfg.runs_dir) / "stores" / hcfg.store_name())
    store = harvest(hcfg, loaded=loaded, progress=progress)
    t1 = time.perf_counter()
    tcfg = TrainConfig(store=str(store.path), name=f"{cfg.name}-{cfg.hash(cfg.PAGES)[:8]}", runs_dir=cfg.runs_dir,
                       sae=SAEConfig(width=cfg.width, k=cfg.k), tokens=cfg.train_tokens,
                       batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, **sub)
    run = train(tcfg, progress=progress)
    t2 = time.perf_counter()
    core = evaluate(EvalConfig(run=str(run.path), tokens=cfg.eval_tokens, ce_tokens=cfg.ce_tokens, dtype=cfg.dtype,
                               seed=cfg.seed, **sub), loaded=loaded, progress=progress)
    t3 = time.perf_counter()
    if cfg.explain_latents:
        from saelab.experiments.interpret import InterpretConfig, interpret

        interpret(InterpretConfig(run=str(run.path), latents=cfg.explain_latents, seed=cfg.seed, examples=examples,
                                  explain={"prompts": cfg.explain_prompts, "consensus": len(cfg.explain_prompts) > 1},
                                  score={"scorers": cfg.scorers}, **sub), loaded=loaded, progress=progress)
    t4 = time.perf_counter()
    pages: dict[str, str] = {}
    if cfg.dashboard:
        from saelab.experiments.dashboard import DashboardConfig, build_dashboard

        pages["dashboard"] = str(build_dashboard(DashboardConfig(run=str(run.path), device=cfg.device,
                                                                 examples=examples), loaded=loaded,
                                                 progress=progress)[0])
    t5 = time.perf_counter()
    s = TrainResult.read(run.summary_file)
    path = run.path / QuickstartResult.FILE
    now = {"harvest": t1 - t0, "train": t2 - t1, "eval": t3 - t2, "interpret": t4 - t3, "dashboard": t5 - t4}
    seconds = stage_seconds(now, QuickstartResult.read(path).seconds if path.is_file() else None)
    result = QuickstartResult(model=cfg.model, hook=cfg.hook, store=str(store.path), run_dir=str(run.path),
                              dtype=cfg.dtype, architecture=s.architecture, width=s.width, k=s.k, d_in=s.d_in, train_tokens=s.tokens,
                              train_seconds=s.wall_seconds, tokens_per_second=s.tokens_per_second, seed=cfg.seed,
                              eval=core.headline(), seconds=seconds, pages=pages)
    if not path.is_file() or QuickstartResult.read(path) != result:
        result.write(path)
    record(result, run.path, cfg)
    if cfg.report and (ledger := ledger_path(cfg.ledger)) is not None:
        from saelab.report.build import build_report, write_report

        html_path, _ = write_report(build_report(Ledger(ledger)), Path(cfg.runs_dir) / "report.html")
        result.pages["report"] = str(html_path)  # not in quickstart.json: the report changes with every ledger row
    return result
