"""`saelab convert` and `saelab inspect`: sparse coders in the formats users already have."""

from __future__ import annotations

import json

import typer

from saelab.cli.common import user_errors

app = typer.Typer()


@app.command()
@user_errors
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
@user_errors
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
