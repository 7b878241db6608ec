"""`saelab rivalry`: do SAE latents compete when the model is uncertain (feature rivalry per layer)."""

from __future__ import annotations

from pathlib import Path

import typer

from saelab.cli.common import ConfigOpt, SetOpt, build, ledger_line, opt, stage_command, user_errors
from saelab.experiments.rivalry import RivalryConfig

app = typer.Typer()


@app.command()
@user_errors
@stage_command(RivalryConfig)
def rivalry(runs: list[str] = typer.Argument(None, help="run directories of the SAEs (one hook each, same model)"),
            sae: list[str] = typer.Option(None, "--sae", help="an SAE run directory (repeatable; added to RUNS)"),
            questions: str | None = opt(RivalryConfig, "questions"),
            n_per_kind: int | None = opt(RivalryConfig, "n_per_kind"),
            n_samples: int | None = opt(RivalryConfig, "n_samples"),
            out: str | None = opt(RivalryConfig, "out"),
            config: Path | None = ConfigOpt, set_: list[str] | None = SetOpt, *, stage: dict) -> None:
    """Feature rivalry: sample answers, split questions by answer entropy, compare the rivalry of SAE
    latents (5th percentile of pairwise r) between ambiguous and unambiguous questions at every
    layer with a prompt-level permutation test, predict correctness (AUROC vs max softmax and
    entropy), find hub latents, steer along the rivalry direction vs a random one."""
    from saelab.experiments.rivalry import run_rivalry
    from saelab.runs.ledger import record

    all_runs = [*(runs or []), *(sae or [])] or None
    cfg = build(RivalryConfig, config, {"runs": all_runs, "questions": questions, "n_per_kind": n_per_kind,
                                        "n_samples": n_samples, "out": out, **stage}, set_)
    r = run_rivalry(cfg)
    c, h = r.primary_comparison, r.headline_layer
    typer.echo(f"{r.conditions['n_ambiguous']} ambiguous / {r.conditions['n_unambiguous']} unambiguous questions "
               f"({r.conditions['method']})")
    for x in r.layers:
        rc = x["rivalry"]
        typer.echo(f"  {x['hook']:<16} rivalry amb {rc.a:+.3f} unamb {rc.b:+.3f} diff {rc.diff:+.3f} "
                   f"[{rc.diff_ci95[0]:+.3f}, {rc.diff_ci95[1]:+.3f}]  perm p {x['perm']['p']:.3g} "
                   f"(Holm {x['adjusted']['perm']['holm']:.3g})  pooled-pair p {x['mann_whitney']['p']:.3g}  "
                   f"AUROC {x['auroc_decoder'].mean:.3f}")
    typer.echo(f"headline {h['hook']} (chosen on the choose half): AUROC rivalry {c.a:.3f} vs max softmax {c.b:.3f}, "
               f"diff {c.diff:+.3f} [{c.diff_ci95[0]:+.3f}, {c.diff_ci95[1]:+.3f}] over {c.n_units} {c.unit}s")
    where = cfg.out_dir()
    typer.echo(f"written: {where}/rivalry.json, plots {', '.join(r.plots)} ({r.wall_seconds['total']:.0f} s)")
    typer.echo(ledger_line(record(r, where, cfg, result_file=where / "rivalry.json")))
