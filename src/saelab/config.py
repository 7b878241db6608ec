"""The Config base: pydantic models, YAML in, YAML out. Each stage's config lives beside its
stage (`HarvestConfig` in activations/harvest.py, `TrainConfig` in train/trainer.py, ...).

Every CLI command builds one of these and calls the stage function with it, so
`saelab train --config x.yaml` and `saelab.train.trainer.train(TrainConfig(...))` are the same.

Reuse is decided here, in one place: `Config.same_work(stored)` validates a config an
earlier run stored (fields added in a later version get their defaults) and compares hashes
of what the two configs ask for, leaving out the fields that only say where the work runs
or is recorded (`UNHASHED`). So a new defaulted field never locks a user out of an old run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from saelab.io import stable_hash, write_text

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # fields that change where or how a stage runs or is recorded, not its result
    UNHASHED: ClassVar[frozenset[str]] = frozenset()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_yaml())

    def hash(self, exclude: set[str] | frozenset[str] | None = None) -> str:
        """Content hash of the work this config asks for (UNHASHED and `exclude` left out)."""
        return stable_hash(self.model_dump(mode="json", exclude=set(self.UNHASHED) | set(exclude or ())))

    def same_work(self, stored: dict[str, Any] | None, exclude: set[str] | frozenset[str] | None = None) -> bool:
        """Whether `stored` (a config dict an earlier run saved) asks for the same work as self.

        The stored dict is validated by this class first, so a field added since it was written
        takes its default; a dict this class cannot read is a different config."""
        if not isinstance(stored, dict):
            return False
        try:
            old = type(self).model_validate(stored)
        except ValidationError:
            return False
        return old.hash(exclude) == self.hash(exclude)

    @classmethod
    def load(cls: type[C], path: str | Path, overrides: list[str] | None = None) -> C:
        """Read YAML, apply `a.b=value` overrides (values parsed as YAML), validate."""
        return cls.from_dict(read_yaml(path), overrides, origin=str(path))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], overrides: list[str] | None = None,
                  origin: str = "config") -> C:
        data = dict(data)
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} must be KEY=VALUE, e.g. sae.k=64")
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = yaml.safe_load(raw)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            lines = [f"{origin}: invalid {cls.__name__}:"]
            for err in e.errors():
                loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
                lines.append(f"  {loc}: {err['msg']}")
            raise ValueError("\n".join(lines)) from None


class StageConfig(Config):
    """A stage's config: what it computes, plus where it runs and where its result is recorded."""

    UNHASHED: ClassVar[frozenset[str]] = frozenset({"device", "ledger", "ledger_id", "notes"})

    device: str = Field("auto", description="where to compute: auto (cuda if available, else cpu), cpu, cuda or "
                        "cuda:N; under torchrun each rank uses cuda:LOCAL_RANK. Not part of the config hash: a run "
                        "resumes or is reused on another device")
    ledger: str | None = Field(None, description="ledger file (SQLite) to record the result in; default "
                               "$SAELAB_LEDGER, else runs/ledger.sqlite under the working directory; 'none' records "
                               "nothing")
    ledger_id: str | None = Field(None, description="id of this result's ledger row, a short slug like repro-001 "
                                  "(default: generated, e.g. train-0007); a prediction registered for this id is "
                                  "checked when the result lands")
    notes: str = Field("", description="free text kept with the ledger row")

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v.strip().lower()):
            raise ValueError(f"device {v!r} is not one of auto, cpu, cuda or cuda:N")
        return v.strip().lower()


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of fields, not {type(data).__name__}")
    return data
