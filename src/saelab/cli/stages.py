"""The pipeline's stage commands: harvest, train, train-fly, eval, quickstart. Each builds the
stage's config (--config, flags, --set) and calls the same Python function a user would."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.activations.harvest import HarvestConfig
from saelab.cli.common import ConfigOpt, SetOpt, build, ledger_line, opt, stage_command, user_errors
from saelab.experiments.evaluate import EvalConfig
from saelab.experiments.interpret import InterpretConfig
from saelab.experiments.quickstart import QuickstartConfig
from saelab.train.fly import FlyTrainConfig
from saelab.train.trainer import TrainConfig


def register(app: typer.Typer) -> None:
    for fn, name in ((harvest, "harvest"), (train, "train"), (train_fly, "train-fly"), (eval_cmd, "eval"),
                     (interpret, "interpret"), (quickstart, "quickstart")):
        app.command(name)(fn)


@user_errors
@stage_command(HarvestConfig)
def harvest(
    config: Path | None = ConfigOpt,
    model: str | None = opt(HarvestConfig, "model"),
    hook: str | None = typer.Option(None, help=HarvestConfig.model_fields["hook"].description +
                                    "; several, comma-separated (mlp_in.3,mlp_out.3)"),
    text: str | None = opt(HarvestConfig, "text"),
    tokens: int | None = opt(HarvestConfig, "tokens"),
    out: str | None = opt(HarvestConfig, "out"),
    list_hooks: bool = typer.Option(False, "--list-hooks", help="print the model's hook points and exit"),
    set_: list[str] | None = SetOpt,
    *, stage: dict,
) -> None:
    """Run a model over text and store activations at one or more hook points in one pass
    (resumes if interrupted; under torchrun each process takes a share of the documents)."""
    from saelab.activations.harvest import harvest as run_harvest

    hooks = hook.split(",") if hook and "," in hook else hook
    cfg = build(HarvestConfig, config, {"model": model, "hook": hooks, "text": text, "tokens": tokens, "out": out,
                                        **stage}, set_)
    if list_hooks:
        from saelab.models.hooks import valid_hook_points
        from saelab.models.load import load_model
        typer.echo("\n".join(valid_hook_points(load_model(cfg.model).model)))
        return
    result = run_harvest(cfg)
    for store in result.values() if isinstance(result, dict) else [result]:
        m = store.manifest
        typer.echo(f"store: {store.path}  ({m['n_tokens']:,} tokens x {m['d_in']}, {m['dtype']}, "
                   f"{len(m['shards'])} shards; excluded {m['excluded']})")


@user_errors
@stage_command(TrainConfig)
def train(
    store: str | None = typer.Argument(None, help=TrainConfig.model_fields["store"].description),
    config: Path | None = ConfigOpt,
    name: str | None = opt(TrainConfig, "name"),
    runs_dir: str | None = opt(TrainConfig, "runs_dir"),
    width: int | None = opt(TrainConfig, "sae.width"),
    k: int | None = opt(TrainConfig, "sae.k"),
    tokens: int | None = opt(TrainConfig, "tokens"),
    lr: float | None = opt(TrainConfig, "lr"),
    architecture: str | None = opt(TrainConfig, "sae.architecture", "--arch"),
    store_out: str | None = opt(TrainConfig, "store_out"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last checkpoint"),
    set_: list[str] | None = SetOpt,
    *, stage: dict,
) -> None:
    """Train a sparse coder on a store. Under torchrun, data-parallel over the ranks."""
    from saelab.runs.results import TrainResult
    from saelab.train.trainer import train as run_train

    cfg = build(TrainConfig, config, {"store": store, "name": name, "runs_dir": runs_dir, "sae.width": width,
                                      "sae.k": k, "tokens": tokens, "lr": lr, "sae.architecture": architecture,
                                      "store_out": store_out, **stage}, set_)
    run = run_train(cfg, resume=resume)
    if run.complete:  # rank 0
        s = TrainResult.read(run.summary_file)
        typer.echo(f"run: {run.path}  ({s.architecture}, train FVU {s.train_fvu_last:.3f}, L0 {s.train_l0_last:.1f}, "
                   f"dead {s.dead_fraction:.3f}, {s.tokens:,} tokens in {s.wall_seconds:.0f} s on {s.device})")


@user_errors
@stage_command(FlyTrainConfig)
def train_fly(
    config: Path = typer.Option(..., "--config", "-c", help="YAML FlyTrainConfig listing the SAEs (see "
                                "`saelab config train-fly`)"),
    set_: list[str] | None = SetOpt,
    *, stage: dict,
) -> None:
    """Train several SAEs/transcoders on the fly from one pass of the model (no store)."""
    from saelab.runs.results import TrainResult
    from saelab.train.fly import train_on_the_fly

    cfg = build(FlyTrainConfig, config, stage, set_)
    for run in train_on_the_fly(cfg):
        s = TrainResult.read(run.summary_file)
        typer.echo(f"run: {run.path}  ({s.architecture} on {s.hook}, train FVU {s.train_fvu_last:.3f}, "
                   f"L0 {s.train_l0_last:.1f})")


@user_errors
@stage_command(EvalConfig)
def eval_cmd(
    run: str | None = typer.Argument(None, help=EvalConfig.model_fields["run"].description),
    config: Path | None = ConfigOpt,
    suite: str | None = typer.Option(None, help="comma-separated evals: core,probing,absorption,control"),
    tokens: int | None = opt(EvalConfig, "tokens"),
    ce_tokens: int | None = opt(EvalConfig, "ce_tokens"),
    set_: list[str] | None = SetOpt,
    *, stage: dict,
) -> None:
    """Evaluate an SAE: core metrics, sparse probing, absorption, randomized-model control.

    Results go into the run directory (eval.json, eval_<name>.json, eval_suite.json) and the ledger."""
    from saelab.experiments.evaluate import run_suite

    suite_list = [s.strip() for s in suite.split(",") if s.strip()] if suite else None
    cfg = build(EvalConfig, config, {"run": run, "suite": suite_list, "tokens": tokens, "ce_tokens": ce_tokens,
                                     **stage}, set_)
    out = run_suite(cfg)
    typer.echo(out.table())
    typer.echo(f"written: {', '.join(str(Path(cfg.run) / r.FILE) for r in out.results.values())}, "
               f"{Path(cfg.run) / 'eval_suite.json'}")


@user_errors
@stage_command(InterpretConfig)
def interpret(
    run: str | None = typer.Argument(None, help=InterpretConfig.model_fields["run"].description),
    config: Path | None = ConfigOpt,
    latents: int | None = opt(InterpretConfig, "latents"),
    latent_ids: str | None = typer.Option(None, help="comma-separated latent ids to interpret instead of drawing "
                                          "--latents"),
    tokens: int | None = opt(InterpretConfig, "examples.tokens"),
    backend: str | None = opt(InterpretConfig, "explainer.backend", "--backend"),
    llm_model: str | None = opt(InterpretConfig, "explainer.model", "--llm-model"),
    base_url: str | None = opt(InterpretConfig, "explainer.base_url"),
    randomized_control: bool = typer.Option(False, "--randomized-control",
                                            help=InterpretConfig.model_fields["randomized_control"].description),
    compare: str | None = opt(InterpretConfig, "compare"),
    set_: list[str] | None = SetOpt,
    *, stage: dict,
) -> None:
    """Explain and score an SAE's latents with an LLM (the embedded model by default), with the controls:
    shuffled explanations, a token-list explainer, and optionally the randomized model.

    Results go into RUN/interp/ (interp.json, windows.json, the LLM call cache) and the ledger."""
    from saelab.experiments.interpret import interpret as run_interpret

    ids = [int(x) for x in latent_ids.split(",") if x.strip()] if latent_ids else None
    cfg = build(InterpretConfig, config, {"run": run, "latents": latents, "latent_ids": ids, "examples.tokens": tokens,
                                          "explainer.backend": backend, "explainer.model": llm_model,
                                          "explainer.base_url": base_url,
                                          "randomized_control": randomized_control or None, "compare": compare,
                                          **stage}, set_)
    result = run_interpret(cfg)
    typer.echo(result.table())
    typer.echo(f"written: {Path(result.run or cfg.run) / result.FILE}")


@user_errors
@stage_command(QuickstartConfig)
def quickstart(
    config: Path | None = ConfigOpt,
    runs_dir: str | None = opt(QuickstartConfig, "runs_dir"),
    harvest_tokens: int | None = opt(QuickstartConfig, "harvest_tokens"),
    train_tokens: int | None = opt(QuickstartConfig, "train_tokens"),
    set_: list[str] | None = SetOpt,
    *, stage: dict,
) -> None:
    """harvest -> train -> eval on the embedded model and corpus; prints a summary table."""
    from saelab.experiments.quickstart import quickstart as run_quickstart
    from saelab.runs.ledger import record

    cfg = build(QuickstartConfig, config, {"runs_dir": runs_dir, "harvest_tokens": harvest_tokens,
                                           "train_tokens": train_tokens, **stage}, set_)
    result = run_quickstart(cfg)
    typer.echo("")
    typer.echo(result.table())
    typer.echo(ledger_line(record(result, result.run_dir, cfg)))
