"""Configs, one pydantic model per stage; YAML in, YAML out.

Every CLI command builds one of these and calls the stage function with it, so
`saelab train --config x.yaml` and `saelab.train.trainer.train(TrainConfig(...))` are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from saelab.io import stable_hash, write_text

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> None:
        write_text(path, self.to_yaml())

    def hash(self, exclude: set[str] | None = None) -> str:
        return stable_hash(self.model_dump(mode="json", exclude=exclude))

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


class HarvestConfig(Config):
    """Model + hook point + text -> an activation store on disk."""

    model: str = Field("smollm2", description="'smollm2' (embedded), local dir or .gguf, or hub id")
    hook: str | list[str] = Field("resid_post.10", description="hook point KIND.LAYER, or a list captured in "
                                  "one pass: one store each under out/<hook>/, all with the same rows")
    text: str = Field("embedded", description="'embedded' corpus, a .txt/.jsonl/.parquet/.csv/.npy file, "
                      "a folder of .txt, or hf:NAME[:CONFIG]")
    text_field: str = Field("text", description="column holding the text (or token-id lists) in jsonl/parquet/csv")
    split: Literal["train", "validation"] = "train"
    out: str = Field("", description="store directory (default: stores/<model>-<hook>-<split>-<hash>)")
    tokens: int = Field(200_000, gt=0, description="activation rows to collect (after exclusions)")
    ctx_len: int = Field(128, ge=2)
    batch_size: int = Field(16, gt=0, description="contexts per forward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="model dtype")
    store_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    prepend_bos: bool = Field(True, description="start every context with the BOS token (then excluded)")
    exclude_special: bool = Field(True, description="drop BOS, padding and other special tokens")
    exclude_tokens: list[str | int] = Field([], description="more tokens to drop (as the tokenizer spells "
                                            "them, or ids); counted as 'listed' in the manifest")
    long_docs: Literal["chunk", "truncate"] = Field("chunk", description="a document longer than ctx_len: "
                                                    "chunk it into contexts, or keep its first context only")
    shard_tokens: int = Field(32_768, gt=0)
    seed: int = 0

    @property
    def hooks(self) -> list[str]:
        return [self.hook] if isinstance(self.hook, str) else list(self.hook)

    def store_name(self) -> str:
        model = Path(self.model).name or self.model
        return f"{model}-{'+'.join(self.hooks)}-{self.split}-{self.hash(exclude={'out'})[:8]}"


class SAEConfig(Config):
    architecture: Literal["topk"] = "topk"
    d_in: int | None = Field(None, description="input width; taken from the store when unset")
    width: int = Field(4608, gt=0, description="number of latents")
    k: int = Field(32, gt=0, description="active latents per token")
    aux_k: int | None = Field(None, description="AuxK latents (default d_in // 2)")
    aux_coef: float = Field(1 / 32, ge=0)
    dead_tokens: int = Field(200_000, gt=0, description="a latent silent this many tokens is dead")

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        if self.k >= self.width:
            raise ValueError(f"k ({self.k}) must be smaller than width ({self.width})")
        return self


class TrainConfig(Config):
    store: str = Field(..., description="activation store directory (from `saelab harvest`)")
    name: str = Field("sae", description="run name: the run directory is <runs_dir>/<name>")
    runs_dir: str = "runs"
    sae: SAEConfig = SAEConfig()
    tokens: int | None = Field(None, gt=0, description="training tokens (default: one pass over the store)")
    batch_size: int = Field(4096, gt=0)
    lr: float | None = Field(None, gt=0, description="Adam lr (default 2e-4 / sqrt(width / 2**14))")
    warmup_steps: int = Field(20, ge=0)
    decay_start: float = Field(0.8, ge=0, le=1, description="fraction of training after which lr decays linearly to 0")
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = "geometric_median"
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0, description="steps between resumable checkpoints")
    seed: int = 0
    smoke: bool = Field(False, description="a smoke run: labelled so, claims nothing")


class EvalConfig(Config):
    run: str = Field(..., description="run directory holding checkpoint/")
    text: str = "embedded"
    text_field: str = "text"
    split: Literal["train", "validation"] = "validation"
    model: str | None = Field(None, description="model override (default: the one the SAE was trained on)")
    tokens: int = Field(32_768, gt=0, description="validation tokens for reconstruction metrics")
    ce_tokens: int = Field(16_384, gt=0, description="validation tokens for CE / KL (3 full forwards each)")
    ctx_len: int = Field(128, ge=2)
    batch_size: int = Field(16, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0


class QuickstartConfig(Config):
    """harvest -> train -> eval on the embedded model and corpus."""

    model: str = "smollm2"
    hook: str = "resid_post.10"
    runs_dir: str = "runs"
    name: str = "quickstart"
    harvest_tokens: int = Field(400_000, gt=0)
    train_tokens: int = Field(1_200_000, gt=0)
    eval_tokens: int = Field(32_768, gt=0)
    ce_tokens: int = Field(16_384, gt=0)
    width: int = 4608
    k: int = 32
    batch_size: int = 4096
    lr: float = Field(1e-3, gt=0, description="higher than the long-run default: measured better for this short budget")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
