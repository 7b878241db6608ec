"""`saelab report`, `saelab compare`, `saelab dashboard` and `saelab serve`: pages from the ledger
and run directories."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import ConfigOpt, SetOpt, build, ledger_line, opt, stage_command, user_errors
from saelab.experiments.compare import CompareConfig
from saelab.experiments.dashboard import DashboardConfig

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


@app.command()
@user_errors
def dashboard(run: str = typer.Argument(..., help="run directory holding checkpoint/"),
              out: str | None = opt(DashboardConfig, "out"),
              tokens: int | None = opt(DashboardConfig, "examples.tokens", "--tokens"),
              device: str | None = opt(DashboardConfig, "device"),
              config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt) -> None:
    """The feature dashboard of a run: a static site (open DIR/index.html from disk, nothing is
    fetched) with every latent's density, histogram, logit lens, highlighted top contexts and
    quantile bands, nearest latents, and whatever else the run holds (explanations and scores,
    probing, absorption, ablation, steering) in one sortable join table."""
    from saelab.experiments.dashboard import build_dashboard

    cfg = build(DashboardConfig, config, {"run": run, "out": out, "examples.tokens": tokens, "device": device}, set_)
    index, wall = build_dashboard(cfg)
    typer.echo(f"written: {index}  ({wall['total']:.0f} s: examples {wall['examples']:.0f}, windows "
               f"{wall['windows']:.0f}, weights {wall['weights']:.0f}, pages {wall['assemble'] + wall['write']:.0f})")


@app.command()
@user_errors
def serve(run: str = typer.Argument(..., help="run directory (its dashboard/ is served) or a dashboard folder"),
          host: str = typer.Option("127.0.0.1", help="address to listen on; anything but 127.0.0.1 exposes the "
                                   "pages to your network"),
          port: int = typer.Option(8765, help="port (0: any free one)")) -> None:
    """Serve a built dashboard on a local address (only its files; build it with `saelab dashboard`)."""
    from saelab.dashboard.serve import start_server

    root = Path(run)
    if not (root / "index.html").is_file():
        root = root / "dashboard"
    server, thread = start_server(root, host, port, verbose=True)
    h, p = server.server_address[:2]
    typer.echo(f"serving {root} at http://{h}:{p}/  (Ctrl-C stops)")
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()
        server.server_close()
