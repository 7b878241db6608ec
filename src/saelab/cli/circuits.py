"""`saelab circuit`: feature-set circuits and causal attribution graphs over SAEs at several layers."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import ConfigOpt, SetOpt, build, ledger_line, opt, stage_command, user_errors
from saelab.experiments.circuit import CircuitConfig

app = typer.Typer()


@app.command()
@user_errors
@stage_command(CircuitConfig)
def circuit(runs: list[str] = typer.Argument(None, help="run directories of the SAEs (one hook each, same model)"),
            kind: str | None = opt(CircuitConfig, "kind"),
            task: str | None = opt(CircuitConfig, "task"),
            out: str | None = opt(CircuitConfig, "out"),
            config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt, *, stage: dict) -> None:
    """Feature circuits: --kind set (top-K latents per layer for a labelled task vs random sets and
    the all-latent ceiling, and the build-up over layers) or --kind graph (nodes and edges by
    attribution patching / integrated gradients on contrastive prompt pairs, faithfulness and
    completeness against random circuits, the linear estimate checked by real patching)."""
    from saelab.experiments.circuit import run_circuit
    from saelab.runs.ledger import record

    cfg = build(CircuitConfig, config, {"runs": runs or None, "kind": kind, "task": task, "out": out, **stage}, set_)
    r, where = run_circuit(cfg)
    c = r.primary_comparison
    typer.echo(f"{r.kind} circuit, {r.task}: circuit {c.a:.4f} vs random {c.b:.4f}, diff {c.diff:+.4f} "
               f"[{c.diff_ci95[0]:+.4f}, {c.diff_ci95[1]:+.4f}] over {c.n_units} {c.unit}s ({r.wall_seconds:.0f} s)")
    typer.echo(f"written: {where}/{r.kind}-{r.task}.json and .html")
    typer.echo(ledger_line(record(r, where, cfg, result_file=where / f"{r.kind}-{r.task}.json")))
