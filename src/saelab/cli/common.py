"""What every command shares: options whose help is the config field's description (one source
of truth), building a stage's config from --config, flags and --set, and turning expected
failures into one clear message (exit 2) instead of a traceback."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel

from saelab.config import Config, StageConfig, read_yaml

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (see `saelab config STAGE`)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config field: KEY=VALUE, e.g. sae.k=64 (repeatable)")


def field_help(cls: type[BaseModel], path: str) -> str:
    """The description of a (dotted) config field, e.g. field_help(TrainConfig, "sae.width")."""
    *parents, leaf = path.split(".")
    for p in parents:
        cls = cls.model_fields[p].annotation  # a nested Config
    f = cls.model_fields[leaf]
    text = f.description or ""
    default = f.get_default(call_default_factory=True)
    if default not in (None, "", [], {}) and not isinstance(default, BaseModel):
        text += f" [default: {default}]"
    return text


def opt(cls: type[BaseModel], path: str, *flags: str) -> Any:
    """A typer option for config field `path`, None unless given, its help from the field."""
    flags = flags or ("--" + path.split(".")[-1].replace("_", "-"),)
    return typer.Option(None, *flags, help=field_help(cls, path), show_default=False)


STAGE_FIELDS = ("device", "ledger", "ledger_id", "notes")


def stage_command(cls: type[StageConfig]):
    """Give a command the options every stage takes (--device, --ledger, --ledger-id, --notes, help
    from StageConfig's fields); the command receives them as one dict `stage` of config fields."""
    def deco(fn):
        sig = inspect.signature(fn)
        extra = [inspect.Parameter(f, inspect.Parameter.KEYWORD_ONLY, default=opt(cls, f), annotation=str | None)
                 for f in STAGE_FIELDS]
        params = [p for p in sig.parameters.values() if p.name != "stage"]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            stage = {f: kwargs.pop(f) for f in STAGE_FIELDS}
            return fn(*args, stage=stage, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params + extra)
        return wrapper
    return deco


def user_errors(fn):
    """Show expected failures (bad input) as one clear message and exit 2, not a traceback."""
    from saelab.activations.store import StoreError
    from saelab.runs.ledger import LedgerError
    from saelab.runs.rundir import RunExistsError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotImplementedError, StoreError, RunExistsError, LedgerError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    return wrapper


def build(cls: type[Config], config: Path | None, flags: dict[str, Any], sets: list[str] | None) -> Config:
    """--config YAML, then the flags given, then --set overrides (in that order of precedence)."""
    data: dict[str, Any] = read_yaml(config) if config is not None else {}
    for key, value in flags.items():
        if value is not None:
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    return cls.from_dict(data, sets, origin=str(config) if config else "command line")


def ledger_line(recorded) -> str:
    return f"ledger: {recorded.id} ({recorded.verdict})" if recorded is not None else "ledger: off"
