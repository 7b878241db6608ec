"""The SparseCoder interface, the architecture registry, native save/load.

Native checkpoint format (a directory):
  sae.safetensors  W_enc [d_in, width], b_enc [width], W_dec [width, d_in], b_dec [d_in]
  cfg.json         {"format": "saelab.sae/1", "sae": SAEConfig, "hook": ..., "model": ...}
Encoding is always `z = act(x - b_dec) @ W_enc + b_enc)` and decoding `z @ W_dec + b_dec`:
b_dec is subtracted from the input (the convention whose omission broke a published
sparsify -> SAELens adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from saelab.config import SAEConfig
from saelab.io import atomic_write, read_json, write_json

FORMAT = "saelab.sae/1"


@dataclass
class ForwardOutput:
    x_hat: torch.Tensor  # [batch, d_in]
    loss: torch.Tensor  # scalar: what the optimizer minimises
    fvu: torch.Tensor  # scalar: fraction of variance unexplained on this batch
    aux_loss: torch.Tensor  # scalar (0 when unused)
    active: torch.Tensor  # indices of latents that fired in this batch (any shape)
    l0: float  # mean active latents per token


class SparseCoder(nn.Module):
    """encode / decode / forward-with-loss; decoder rows are latent directions."""

    cfg: SAEConfig
    W_enc: nn.Parameter  # [d_in, width]
    b_enc: nn.Parameter  # [width]
    W_dec: nn.Parameter  # [width, d_in]
    b_dec: nn.Parameter  # [d_in]

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.d_in is None:
            raise ValueError("SAEConfig.d_in must be set to build an SAE")
        self.cfg = cfg

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [batch, width]."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction [batch, d_in] from dense latents [batch, width]."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        raise NotImplementedError

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def set_decoder_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec.data).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec.data

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write the native checkpoint directory (atomic per file; cfg.json last)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_write(path / "sae.safetensors") as f:
            f.write(save(tensors))
        write_json(path / "cfg.json", {"format": FORMAT, "sae": self.cfg.model_dump(mode="json"),
                                       **(meta or {})})


ARCHITECTURES: dict[str, type[SparseCoder]] = {}


def register(name: str):
    def deco(cls: type[SparseCoder]) -> type[SparseCoder]:
        ARCHITECTURES[name] = cls
        return cls
    return deco


def build_sae(cfg: SAEConfig, seed: int = 0) -> SparseCoder:
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.architecture!r}; valid: {', '.join(sorted(ARCHITECTURES))}")
    torch.manual_seed(seed)
    return ARCHITECTURES[cfg.architecture](cfg)


def load_sae(path: str | Path) -> tuple[SparseCoder, dict[str, Any]]:
    """Load a native checkpoint directory; returns the SAE and its cfg.json."""
    path = Path(path)
    cfg_path, weights = path / "cfg.json", path / "sae.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{path} is not a saelab SAE checkpoint: {p.name} is missing")
    meta = read_json(cfg_path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    sae = build_sae(SAEConfig.model_validate(meta["sae"]))
    state = load_file(weights)
    sae.load_state_dict(state)
    return sae, meta


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances. x: [n, d]."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y
