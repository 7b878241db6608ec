"""`saelab probe RUN --settings ... --probes ... [--tasks ...]`: probing under four data regimes."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import ConfigOpt, SetOpt, build, opt, stage_command, user_errors
from saelab.experiments.probe import ProbeConfig


def _list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@user_errors
@stage_command(ProbeConfig)
def probe_cmd(
    run: str | None = typer.Argument(None, help=ProbeConfig.model_fields["run"].description),
    config: Path | None = ConfigOpt,
    settings: str | None = typer.Option(None, help="comma-separated: " + ProbeConfig.model_fields["settings"].description),
    probes: str | None = typer.Option(None, help="comma-separated: " + ProbeConfig.model_fields["probes"].description),
    tasks: str | None = typer.Option(None, help="comma-separated: " + ProbeConfig.model_fields["tasks"].description),
    pool: str | None = opt(ProbeConfig, "pool"),
    budget: int | None = opt(ProbeConfig, "budget"),
    n_jobs: int | None = opt(ProbeConfig, "n_jobs"),
    set_: list[str] | None = SetOpt,
    *, stage: dict,
) -> None:
    """Probe an SAE under four data regimes (normal, scarcity, imbalance, label noise): residual
    baselines vs SAE probes on every binary task, the SAE probes' win rate with CIs over tasks.

    Results go into RUN/probe/ (records.json, tasks.json, winrate_<setting>.json, plots/) and one
    ledger row per setting."""
    from saelab.experiments.probe import probe

    cfg = build(ProbeConfig, config, {"run": run, "settings": _list(settings), "probes": _list(probes),
                                      "tasks": _list(tasks), "pool": pool, "budget": budget, "n_jobs": n_jobs,
                                      **stage}, set_)
    for r in probe(cfg):
        typer.echo(r.table())
    typer.echo(f"written: {Path(cfg.run) / 'probe'}")


def register(app: typer.Typer) -> None:
    app.command("probe")(probe_cmd)
