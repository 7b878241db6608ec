"""SAEConfig: one sparse coder's architecture and sizes. Fields an architecture does not use
are ignored by it (each architecture's file says which it reads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from saelab.config import Config

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
                            "recomputed in float32), and that preselects the active entries of relu, jumprelu, gated and panneal on their sparse "
                            "path (with a proven bf16 error margin, then exact in float32); auto: bfloat16 where the CPU multiplies it natively "
                            "(AVX512-BF16), else float32")

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
