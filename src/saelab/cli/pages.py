"""`saelab report` and `saelab compare`: pages from the ledger and run directories."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import ConfigOpt, SetOpt, build, ledger_line, stage_command, user_errors
from saelab.experiments.compare import CompareConfig

app = typer.Typer()


@app.command()
@user_errors
def report(out: Path = typer.Option(Path("runs/report.html"), help="the HTML file to write (a markdown twin and "
                                    "its figures go beside it)"),
           check: Path | None = typer.Option(None, "--check", help="validate this page (or every .html under a "
                                             "folder) instead of building one; exit 1 on any problem"),
           ledger: str | None = typer.Option(None, "--ledger", help="ledger file (default $SAELAB_LEDGER, else "
                                             "runs/ledger.sqlite)"),
           title: str = typer.Option("saelab results", help="the page title")) -> None:
    """One self-contained HTML results report (and a markdown twin) from the ledger and its run
    directories: the EXPERIMENTS table with verdicts, predictions vs outcomes, training curves,
    density histograms, probing bars and every comparison with its 95% CI."""
    if check is not None:
        from saelab.report.check import check as run_check

        problems = run_check(check)
        for p in problems:
            typer.echo(p)
        if problems:
            raise typer.Exit(1)
        typer.echo(f"{check}: ok")
        return
    from saelab.report.build import build_report, write_report
    from saelab.runs.ledger import Ledger, LedgerError, ledger_path

    path = ledger_path(ledger)
    if path is None:
        raise LedgerError("the ledger is turned off; pass --ledger FILE")
    html_path, md_path = write_report(build_report(Ledger(path, create=False), title), out)
    typer.echo(f"written: {html_path} and {md_path}")


@app.command()
@user_errors
@stage_command(CompareConfig)
def compare(run_a: str = typer.Argument(..., help="run directory of SAE A"),
            run_b: str = typer.Argument(..., help="run directory of SAE B"),
            config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt, *, stage: dict) -> None:
    """Two SAEs on the same hook side by side: L0, explained variance on the same tokens with a
    paired 95% CI, decoder-norm and density distributions, matched decoder directions."""
    from saelab.experiments.compare import compare_runs

    cfg = build(CompareConfig, config, {"run_a": run_a, "run_b": run_b, **stage}, set_)
    r, out = compare_runs(cfg)
    c = r.explained_variance
    typer.echo(f"explained variance A {c.a:.4f} B {c.b:.4f} A-B {c.diff:+.4f} [{c.diff_ci95[0]:+.4f}, "
               f"{c.diff_ci95[1]:+.4f}] over {c.n_units} contexts; L0 {r.a['l0']:.1f} vs {r.b['l0']:.1f}; "
               f"A matched in B {r.matches['a_in_b']:.3f}, B in A {r.matches['b_in_a']:.3f}")
    typer.echo(f"written: {out / 'compare.html'}, {out / 'compare.json'}")
    from saelab.runs.ledger import record

    typer.echo(ledger_line(record(r, out, cfg)))
