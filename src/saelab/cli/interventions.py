"""The intervention commands: `saelab steer RUN [--quick]` and `saelab ablate RUN --latents ...`.
Each builds its stage's config (--config, flags, --set) and calls the same Python function a user would."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import ConfigOpt, SetOpt, build, ledger_line, opt, stage_command, user_errors
from saelab.experiments.ablate import AblateConfig
from saelab.experiments.steer import QUICK, SteerConfig


def register(app: typer.Typer) -> None:
    app.command("steer")(steer)
    app.command("ablate")(ablate)


@user_errors
@stage_command(SteerConfig)
def steer(
    run: str | None = typer.Argument(None, help=SteerConfig.model_fields["run"].description),
    config: Path | None = ConfigOpt,
    quick: bool = typer.Option(False, "--quick", help="a few prompts and coefficients (minutes on a laptop CPU): "
                               + ", ".join(f"{k}={v}" for k, v in QUICK.items())),
    name: str | None = opt(SteerConfig, "name"),
    latent: int | None = opt(SteerConfig, "latent"),
    judge: str | None = opt(SteerConfig, "judge"),
    alphas: str | None = typer.Option(None, help=SteerConfig.model_fields["alphas"].description +
                                      "; comma-separated, e.g. 0.5,1,2"),
    set_: list[str] | None = SetOpt,
    *, stage: dict,
) -> None:
    """Steer toward a concept with an SAE latent vs a difference-of-means vs a random direction.

    With no other arguments: toward positive sentiment (VADER judge), the latent and the DoM direction
    chosen on the VADER-word task's train split; alphas chosen under a fluency cap on half the prompts and
    reported on the other half. Results in RUN/steer/<name>.json (+ .png, .generations.jsonl) and the ledger."""
    from saelab.experiments.steer import run_steer

    alpha_list = [float(a) for a in alphas.split(",") if a.strip()] if alphas else None
    flags = {"run": run, "name": name, "latent": latent, "judge": judge, "alphas": alpha_list, **stage}
    preset = dict(QUICK) if quick else {}  # flags given override the preset, --set overrides both
    cfg = build(SteerConfig, config, {**preset, **{k: v for k, v in flags.items() if v is not None}}, set_)
    result = run_steer(cfg)
    typer.echo(result.table())
    typer.echo(f"written: {cfg.result_file()}" + (f", {result.plot}" if result.plot else f" ({result.plot_note})"))
    typer.echo(ledger_line(record_line(result, cfg)))


@user_errors
@stage_command(AblateConfig)
def ablate(
    run: str | None = typer.Argument(None, help=AblateConfig.model_fields["run"].description),
    config: Path | None = ConfigOpt,
    latents: str | None = typer.Option(None, help=AblateConfig.model_fields["latents"].description +
                                       "; comma-separated, e.g. 12,40,311"),
    top: int | None = opt(AblateConfig, "top"),
    mode: str | None = opt(AblateConfig, "mode"),
    tokens: int | None = opt(AblateConfig, "tokens"),
    name: str | None = opt(AblateConfig, "name"),
    set_: list[str] | None = SetOpt,
    *, stage: dict,
) -> None:
    """Zero- or mean-ablate SAE latents with the SAE spliced in and its error kept.

    Delta CE per latent (and for the set at once) with a 95% CI over contexts, the tokens each latent
    moves, its logit lens. Results in RUN/ablate/<name>.json and the ledger."""
    from saelab.experiments.ablate import run_ablate

    ids = [int(x) for x in latents.split(",") if x.strip()] if latents else None
    cfg = build(AblateConfig, config, {"run": run, "latents": ids, "top": top, "mode": mode, "tokens": tokens,
                                       "name": name, **stage}, set_)
    result = run_ablate(cfg)
    typer.echo(result.table())
    typer.echo(f"written: {cfg.result_file()}")
    typer.echo(ledger_line(record_line(result, cfg)))


def record_line(result, cfg):
    from saelab.runs.ledger import record
    return record(result, cfg.run, cfg, result_file=cfg.result_file())
