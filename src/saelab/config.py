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


ARCHITECTURE_NAMES = ("relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka", "panneal")


class SAEConfig(Config):
    """One sparse coder. Fields an architecture does not use are ignored by it."""

    architecture: str = Field("topk", description=f"one of {', '.join(ARCHITECTURE_NAMES)}")
    d_in: int | None = Field(None, description="input width; taken from the store when unset")
    d_out: int | None = Field(None, description="output width (transcoders); default d_in")
    transcoder: bool = Field(False, description="map an input hook to another output hook (b_dec is not subtracted)")
    skip: bool = Field(False, description="add a linear skip connection x @ W_skip (skip-transcoder)")
    width: int = Field(4608, gt=0, description="number of latents")
    encoder_init_norm: float = Field(
        0.5774, gt=0, description="row norm of the initial encoder (the decoder's transpose, rescaled); 1/sqrt(3) is "
        "the norm of PyTorch's default Linear init, as sparsify has: measured FVU 0.550 vs 0.637 at norm 1 after "
        "127k tokens (benchmarks/train.py data). relu ignores it (April-2024 init)")
    k: int = Field(32, gt=0, description="active latents per token (topk, batchtopk, matryoshka)")
    aux_k: int | None = Field(None, gt=0, description="AuxK latents (default d_in // 2)")
    aux_coef: float = Field(1 / 32, ge=0, description="AuxK weight (topk, batchtopk, matryoshka)")
    dead_tokens: int = Field(200_000, gt=0, description="a latent silent this many tokens is dead")
    sparsity_coef: float | None = Field(None, ge=0, description="L1 / L0 / Lp weight (relu, jumprelu, gated, panneal); default per architecture")
    sparsity_warmup: float = Field(0.05, ge=0, le=1, description="fraction of training over which the sparsity weight ramps up from 0")
    bandwidth: float = Field(0.001, gt=0, description="JumpReLU straight-through kernel width")
    threshold_init: float = Field(0.001, gt=0, description="JumpReLU initial threshold")
    group_fractions: list[float] | None = Field(None, description="Matryoshka nested group sizes as fractions of width (sum 1)")
    p_end: float = Field(0.5, gt=0, le=1, description="p-annealing: final p of the Lp penalty (starts at 1)")
    topk_select_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the encoder matmul that selects the top k in training (topk, batchtopk, matryoshka; the selected values are "
                            "recomputed in float32); auto: bfloat16 where the CPU multiplies it natively (AVX512-BF16), else float32")

    @model_validator(mode="after")
    def _check(self) -> SAEConfig:
        if self.architecture not in ARCHITECTURE_NAMES:
            raise ValueError(f"unknown architecture {self.architecture!r}; valid: {', '.join(ARCHITECTURE_NAMES)}")
        if self.k >= self.width:
            raise ValueError(f"k ({self.k}) must be smaller than width ({self.width})")
        if self.skip and not self.transcoder:
            raise ValueError("skip=True needs transcoder=True (a skip connection on an SAE is the identity)")
        if self.group_fractions is not None:
            if any(f <= 0 for f in self.group_fractions) or abs(sum(self.group_fractions) - 1) > 1e-6:
                raise ValueError(f"group_fractions must be positive and sum to 1, got {self.group_fractions}")
        return self


class OptimFields(Config):
    """Optimisation settings shared by store-fed and on-the-fly training."""

    batch_size: int = Field(4096, gt=0, description="global batch (split across ranks under torchrun)")
    lr: float | None = Field(None, gt=0, description="lr (default 2e-4 / sqrt(width / 2**14))")
    optimizer: Literal["adam", "signum"] = Field("adam", description="Adam(0.9, 0.999) or signum (sign of momentum 0.9)")
    warmup_steps: int = Field(20, ge=0)
    decay_start: float = Field(0.8, ge=0, le=1, description="fraction of training after which lr decays linearly to 0")
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = "geometric_median"
    normalize: bool = Field(True, description="scale inputs (and targets) so E||x||^2 = d during training; folded into the weights at save")
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(200, gt=0, description="steps between resumable checkpoints")
    wandb: bool = Field(False, description="also log to Weights & Biases (respects WANDB_MODE=offline)")
    wandb_project: str = "saelab"
    seed: int = 0
    smoke: bool = Field(False, description="a smoke run: labelled so, claims nothing")


class TrainConfig(OptimFields):
    """Train one sparse coder from an activation store (two row-aligned stores for a transcoder)."""

    store: str = Field(..., description="activation store directory (from `saelab harvest`)")
    store_out: str | None = Field(None, description="target store for a transcoder, row-aligned with `store`")
    name: str = Field("sae", description="run name: the run directory is <runs_dir>/<name>")
    runs_dir: str = "runs"
    sae: SAEConfig = SAEConfig()
    tokens: int | None = Field(None, gt=0, description="training tokens (default: one pass over the store)")
    val_store: str | None = Field(None, description="store of held-out activations for validation FVU")
    val_every: int = Field(100, gt=0, description="steps between validation metrics")
    val_tokens: int = Field(16_384, gt=0)


class FlySAE(Config):
    """One of several sparse coders trained on the fly from one pass of the model."""

    name: str
    hook: str = Field(..., description="input hook point")
    hook_out: str | None = Field(None, description="output hook point (a transcoder) or None")
    sae: SAEConfig = SAEConfig()
    lr: float | None = None


class FlyTrainConfig(OptimFields):
    """Train several sparse coders on the fly from the model (no store), one forward pass feeding all."""

    model: str = "smollm2"
    text: str = "embedded"
    text_field: str = "text"
    ctx_len: int = Field(128, ge=2)
    model_batch_size: int = Field(16, gt=0, description="contexts per forward pass")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    prepend_bos: bool = True
    buffer_tokens: int = Field(65_536, gt=0, description="activations shuffled together before batching")
    tokens: int = Field(1_000_000, gt=0, description="training tokens for every SAE")
    runs_dir: str = "runs"
    saes: list[FlySAE] = Field(..., min_length=1)


class TaskSpec(Config):
    """A labelled probing task: rows of a local .jsonl/.csv (or `builtin:NAME`) with text and label."""

    name: str
    source: str = Field(..., description="'builtin:NAME' or a local .jsonl / .csv file")
    text_field: str = "text"
    label_field: str = "label"
    group_field: str | None = Field(None, description="rows sharing a group (lemma, document) stay in one split")
    test_fraction: float = Field(0.3, gt=0, lt=1, description="fraction of each class's groups held out")
    max_per_class: int = Field(400, gt=1, description="examples kept per class (seeded subsample)")
    min_train: int = Field(20, gt=0, description="fewest train examples a class may have")
    min_test: int = Field(10, gt=0, description="fewest test examples a class may have")
    seed: int = 0


class ProbingConfig(Config):
    """Sparse probing (SAEBench): top-k latents by class-mean difference, then logistic regression."""

    tasks: list[str | TaskSpec] = Field(
        default_factory=lambda: ["sentiment", "pos", "code_vs_prose", "stage_direction", "play_genre",
                                 "text_source", "language_id"],
        description="built-in task names or TaskSpec mappings (a built-in whose source is not fetched is skipped)")
    ks: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 20])
    max_tokens: int = Field(32, ge=2, description="tokens per example (longer texts are cut)")
    batch_size: int = Field(32, gt=0)
    max_per_class: int | None = Field(200, description="override every task's max_per_class (None: each task's own)")
    bootstrap: int = Field(1000, gt=0, description="bootstrap resamples for CIs")


class AbsorptionConfig(Config):
    """First-letter feature absorption (Chanin et al. 2024; SAEBench)."""

    words: int = Field(1500, gt=0, description="single-token words from the tokenizer vocabulary")
    word_list: str | None = Field(None, description="a local file of words (one per line) instead of the vocabulary")
    min_letter_words: int = Field(10, gt=0, description="letters with fewer train words are skipped")
    max_k: int = Field(5, gt=0, description="largest k-sparse probe tried when looking for split latents")
    split_f1_gain: float = Field(0.03, ge=0, description="F1 gain from k to k+1 that counts a feature split")
    cos_threshold: float = Field(0.025, ge=0, description="absorbing latent: decoder cosine with the probe")
    batch_size: int = Field(64, gt=0)
    bootstrap: int = Field(1000, gt=0)


class ControlConfig(Config):
    """Randomized-model control: harvest -> train -> eval on a copy with re-initialised weights."""

    harvest_tokens: int = Field(60_000, gt=0)
    train_tokens: int = Field(240_000, gt=0)
    tokens: int = Field(8192, gt=0, description="validation tokens for reconstruction metrics (both models)")
    ce_tokens: int = Field(2048, gt=0, description="validation tokens for the random SAE's CE / KL")
    probing_tasks: list[str | TaskSpec] = Field(default_factory=lambda: ["sentiment", "code_vs_prose"],
                                                description="tasks for the real-vs-random sparse-probing gap")
    probing_k: int = Field(5, gt=0, description="k of the sparse probe compared")
    seed: int = 0
    out: str = Field("", description="where the control's store and run go (default <run>/control)")


class EvalConfig(Config):
    run: str = Field(..., description="run directory holding checkpoint/")
    suite: list[Literal["core", "probing", "absorption", "control"]] = Field(
        default_factory=lambda: ["core"], description="evals to run")
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
    dense_thresholds: list[float] = Field(default_factory=lambda: [0.1, 0.01],
                                          description="a latent firing on more than this fraction of tokens is dense")
    similar_pairs: int = Field(10, ge=0, description="most similar decoder pairs to report")
    probing: ProbingConfig = ProbingConfig()
    absorption: AbsorptionConfig = AbsorptionConfig()
    control: ControlConfig = ControlConfig()


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
