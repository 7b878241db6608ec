"""`saelab ledger ...`: read, annotate, export, rebuild and check the experiment ledger."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from saelab.cli.common import user_errors
from saelab.runs.ledger import VERDICTS, Ledger, LedgerError, experiments_row, ledger_path, rebuild

app = typer.Typer(no_args_is_help=True, help="The experiment ledger (SQLite): one row per result, with its "
                  "provenance, comparison and verdict. Default file: $SAELAB_LEDGER, else runs/ledger.sqlite.")
LedgerOpt = typer.Option(None, "--ledger", help="ledger file (default $SAELAB_LEDGER, else runs/ledger.sqlite)")


def _open(path: str | None, create: bool = False) -> Ledger:
    p = ledger_path(path)
    if p is None:
        raise LedgerError("the ledger is turned off ($SAELAB_LEDGER or --ledger is 'none')")
    return Ledger(p, create=create)


@app.command("list")
@user_errors
def list_cmd(ledger: str | None = LedgerOpt,
             stage: str | None = typer.Option(None, help="only rows of this stage (harvest, train, eval, ...)"),
             verdict: str | None = typer.Option(None, help=f"only rows with this verdict ({', '.join(VERDICTS)})")) -> None:
    """One line per row: id, date, stage/kind, model, hook, result, verdict."""
    rows = _open(ledger).rows(stage, verdict)
    if not rows:
        typer.echo("no rows")
        return
    for r in rows:
        t = experiments_row(r)
        typer.echo(f"{t['id']:<16} {r['time_utc']:<20} {t['kind']:<22} {t['model'][:24]:<24} {t['hook']:<16} "
                   f"{t['verdict']:<14} {t['result']}")


@app.command("show")
@user_errors
def show(row_id: str = typer.Argument(..., help="row id"), ledger: str | None = LedgerOpt,
         as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Everything about one row: facts, metrics, comparisons, prediction and verdict history."""
    r = _open(ledger).row(row_id)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    skip = {"metrics", "comparisons", "prediction", "verdict_log"}
    width = max(map(len, r))
    for k, v in r.items():
        if k not in skip and v not in (None, ""):
            typer.echo(f"{k:<{width}}  {v}")
    typer.echo("metrics:")
    for k, v in r["metrics"].items():
        typer.echo(f"  {k:<40} {v:.6g}")
    if r["comparisons"]:
        typer.echo("comparisons (a, b, a - b [95% CI], n):")
        for k, c in r["comparisons"].items():
            typer.echo(f"  {k:<40} {c['a']:.4g} {c['b']:.4g} {c['diff']:+.4g} [{c['lo']:+.4g}, {c['hi']:+.4g}] "
                       f"n={c['n']} {c['unit']}s")
    if r["prediction"]:
        p = r["prediction"]
        typer.echo(f"prediction ({p['created_utc']}): {p['metric']} {p['expect']}"
                   f"{' (' + p['source'] + ')' if p['source'] else ''} -> {r['verdict']}: {r['verdict_reason']}")
    typer.echo("verdicts:")
    for v in r["verdict_log"]:
        typer.echo(f"  {v['time_utc']}  {v['verdict']:<14} {'auto' if v['auto'] else 'set'}  {v['reason'] or ''}")


@app.command("export")
@user_errors
def export(fmt: str = typer.Option("markdown", "--format", help="markdown (an EXPERIMENTS.md table), csv or json"),
           out: Path | None = typer.Option(None, help="write to this file instead of printing"),
           ledger: str | None = LedgerOpt) -> None:
    """Every row as an EXPERIMENTS.md table (id, date, commit, model, hook, kind, width, L0, data,
    tokens, seed, hardware, wall, result, verdict, notes), CSV or JSON."""
    from saelab.io import write_text

    text = _open(ledger).export(fmt)
    if out is None:
        typer.echo(text.rstrip("\n"))
    else:
        write_text(out, text)
        typer.echo(f"written: {out}")


@app.command("predict")
@user_errors
def predict(row_id: str = typer.Argument(..., help="the id the run will be recorded as (pass it to the stage "
                                          "with --ledger-id)"),
            metric: str = typer.Option(..., help="a headline metric of the result (e.g. explained_variance), or "
                                       "<comparison>.diff / .a / .b / .lo / .hi"),
            expect: str = typer.Option(..., help="'>= 0.7', '< 3', '0.81 +- 0.02' or '[0.7, 0.9]'"),
            source: str = typer.Option("", help="where the expectation comes from (a paper, an earlier row)"),
            ledger: str | None = LedgerOpt) -> None:
    """Pre-register a prediction for a run before it lands; its verdict is computed against it."""
    p = _open(ledger, create=True).predict(row_id, metric, expect, source)
    typer.echo(f"registered {p['created_utc']}: {row_id} {p['metric']} {p['expect']}")


@app.command("verdict")
@user_errors
def verdict(row_id: str = typer.Argument(...), value: str = typer.Argument(..., help=", ".join(VERDICTS)),
            reason: str = typer.Option(..., help="why (kept in the ledger)"), ledger: str | None = LedgerOpt) -> None:
    """Set a row's verdict by hand, with a reason; the earlier verdicts stay in its history."""
    _open(ledger).set_verdict(row_id, value, reason)
    typer.echo(f"{row_id}: {value}")


@app.command("supersede")
@user_errors
def supersede(old: str = typer.Argument(..., help="the row superseded"),
              by: str = typer.Option(..., help="the row that supersedes it"),
              reason: str = typer.Option(..., help="why"), ledger: str | None = LedgerOpt) -> None:
    """Mark a row superseded by another (both keep pointers to each other)."""
    _open(ledger).supersede(old, by, reason)
    typer.echo(f"{old}: superseded by {by}")


@app.command("note")
@user_errors
def note(row_id: str = typer.Argument(...), text: str = typer.Argument(...), ledger: str | None = LedgerOpt) -> None:
    """Append a note to a row."""
    _open(ledger).add_note(row_id, text)
    typer.echo(f"{row_id}: noted")


@app.command("rebuild")
@user_errors
def rebuild_cmd(root: Path = typer.Argument(..., help="a directory of run directories (e.g. runs/)"),
                out: Path | None = typer.Option(None, help="the new ledger file (default: the ledger path, which "
                                                "must not exist yet)")) -> None:
    """Recreate a ledger from run directories: each run's ledger.jsonl replayed, and results recorded
    before the ledger existed backfilled from their files."""
    target = out or ledger_path(None)
    if target is None:
        raise LedgerError("the ledger is turned off; pass --out")
    n = rebuild(root, target)
    typer.echo(f"{target}: {n['replayed']} rows replayed, {n['backfilled']} backfilled")
    if n["skipped_events"] or n["unreadable_files"]:
        typer.echo(f"  skipped: {n['skipped_events']} events about rows no log recorded, {n['unreadable_files']} "
                   "result files this saelab cannot read (written by an older version)")


@app.command("check")
@user_errors
def check(ledger: str | None = LedgerOpt) -> None:
    """SQLite's integrity check, and every row's result file against its checksum; exit 1 on a problem."""
    led = _open(ledger)
    problems = led.check()
    for p in problems:
        typer.echo(p)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{led.path}: ok (schema {led.schema_version}, {len(led.rows())} rows)")
