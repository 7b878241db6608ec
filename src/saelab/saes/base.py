"""The SparseCoder interface, the architecture registry, native save/load.

Native checkpoint format (a directory):
  sae.safetensors  W_enc [d_in, width], b_enc [width], W_dec [width, d_out], b_dec [d_out],
                   plus per-architecture tensors (threshold, r_mag, b_mag, W_skip [d_in, d_out])
  cfg.json         {"format": "saelab.sae/1", "sae": SAEConfig, "hook": ..., "model": ...}

An SAE encodes `x - b_dec` (b_dec is subtracted from the input: the convention whose
omission broke a published sparsify -> SAELens adapter). A transcoder maps an input hook to
a different output hook, so b_dec lives in the output space and is not subtracted; an
optional skip connection adds `x @ W_skip`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from saelab.device import select_dtype
from saelab.io import atomic_write, read_json, write_json
from saelab.saes.config import SAEConfig
from saelab.saes.sparse_ops import SPARSE_MAX_DENSITY, row_dots, threshold_entries

FORMAT = "saelab.sae/1"


@dataclass
class ForwardOutput:
    y_hat: torch.Tensor  # [batch, d_out]
    loss: torch.Tensor  # scalar: what the optimizer minimises
    fvu: torch.Tensor  # scalar, detached: fraction of variance unexplained on this batch
    active: torch.Tensor  # indices of the latents that fired in this batch (any shape)
    l0: float  # mean active latents per token
    terms: dict[str, torch.Tensor]  # the loss's named terms, detached, before their coefficients
    # (topk: fvu, auxk; relu: mse, l1; jumprelu: mse, l0; ...): metrics.jsonl logs them as loss_<name>


@dataclass
class LossContext:
    """What the trainer tells a loss beyond the batch."""

    total_variance: torch.Tensor  # scalar: sum ||y - mean(y)||^2 over the (global) batch
    n_tokens: int  # tokens in the (global) batch, for per-token penalties
    dead_mask: torch.Tensor | None = None  # [width] bool, for AuxK
    sparsity_scale: float = 1.0  # sparsity-coefficient warmup factor in [0, 1]
    progress: float = 0.0  # fraction of training done, for schedules (p-annealing)


class SparseCoder(nn.Module):
    """encode / decode / loss; decoder rows are latent directions."""

    unit_norm_decoder: ClassVar[bool] = True  # trainer keeps decoder rows at unit norm
    # threshold coders (relu, jumprelu, gated, panneal) train on their active entries only while
    # the batch is sparse enough: `density` is the last measured fraction of (token, latent)
    # entries the sparse path would carry, and a step goes sparse while it is <= sparse_max_density
    # (set it to 0 on an instance for the dense reference path, to inf to force the sparse one)
    sparse_max_density: float = SPARSE_MAX_DENSITY

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.d_in is None:
            raise ValueError("SAEConfig.d_in must be set to build an SAE")
        self.cfg = cfg
        d_in, d_out, m = cfg.d_in, cfg.d_out or cfg.d_in, cfg.width
        W_dec = torch.randn(m, d_out)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # encoder init = decoder transpose (or a scaled random matrix when the sizes differ).
        # Stored as the transposed view of a contiguous [width, d_in] tensor: the public layout is
        # [d_in, width], while gathers of latent rows and sparse row gradients need no copies.
        W_enc_rows = W_dec.clone() if d_in == d_out else torch.randn(m, d_in) / d_in**0.5
        W_enc_rows *= cfg.encoder_init_norm / W_enc_rows.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_enc_rows.t())
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_out)) if cfg.skip else None
        self.density = 1.0  # dense until a step measures otherwise
        self.last_path = "dense"  # which path the last training forward took: "dense" or "sparse"

    # --- shared pieces -------------------------------------------------------------------
    @property
    def transcoder(self) -> bool:
        return self.cfg.transcoder

    def centered(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input: x - b_dec for an SAE, x itself for a transcoder."""
        return x if self.transcoder else x - self.b_dec

    def sparse_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x_c, shift) for the sparse training paths: x_c = x - b_dec computed without autograd
        and shift = b_dec, whose gradient `pre_at` then forms as a [d_in, m] matvec instead of
        summing a [batch, d_in] input gradient over rows; (centered(x), None) for a transcoder
        or an x that needs its own gradient."""
        if self.transcoder or x.requires_grad:
            return self.centered(x), None
        with torch.no_grad():
            return x - self.b_dec, self.b_dec

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [batch, width] (before any nonlinearity)."""
        return self.centered(x) @ self.W_enc + self.b_enc

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Output [batch, d_out] from dense latents [batch, width] (x needed for the skip)."""
        return self.decoder_out(z @ self.W_dec, x)

    def decoder_out(self, y: torch.Tensor, x: torch.Tensor | None, b_dec: torch.Tensor | None = None) -> torch.Tensor:
        """The latents' part of the output y [batch, d_out] plus the decoder bias (b_dec unless one
        is given, e.g. detached) and, given x, the skip x W_skip (no pass over y for a skip that
        is not there)."""
        y = y + (self.b_dec if b_dec is None else b_dec)
        return y + x @ self.W_skip if self.W_skip is not None and x is not None else y

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def try_sparse(self) -> bool:
        """Whether this training step attempts the sparse path (the last batch was sparse enough)."""
        return self.density <= self.sparse_max_density

    def sparse_entries(self, x_c: torch.Tensor, b: torch.Tensor | None, t: torch.Tensor):
        """(Entries, float32 values) where x_c W_enc (+ b) > t [width], recording the density; None
        when the batch is too dense for the sparse path (the caller then runs the dense one)."""
        dtype = select_dtype(self.cfg.topk_select_dtype, x_c.device)
        got = threshold_entries(x_c, self.W_enc, b, t, dtype, self.sparse_max_density)
        if isinstance(got, float):
            self.density, self.last_path = got, "dense"
            return None
        self.density, self.last_path = got[0].nnz / max(1, x_c.shape[0] * self.cfg.width), "sparse"
        return got

    def note_dense(self, nnz: int | torch.Tensor, batch: int) -> None:
        """Record the density a dense step measured (so a later step can go sparse)."""
        self.density = int(nnz) / max(1, batch * self.cfg.width)
        self.last_path = "dense"

    # --- per architecture ----------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latent activations [batch, width], as used at inference (per token)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        """Training forward: x [batch, d_in] -> loss against target y [batch, d_out]."""
        raise NotImplementedError

    # --- constraints and folding ---------------------------------------------------------
    @torch.no_grad()
    def set_decoder_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        parallel = row_dots(self.W_dec.grad, self.W_dec.data)  # [m]: no [m, d_out] temporary
        self.W_dec.grad.addcmul_(parallel[:, None], self.W_dec.data, value=-1)

    @torch.no_grad()
    def fold_input_scale(self, s_in: float, s_out: float) -> None:
        """Fold a training-time normalisation (x_n = s_in x, y_n = s_out y) into the weights,
        so the saved SAE takes and returns raw activations. Pre-activations are unchanged,
        so thresholds need no change."""
        self.W_enc.mul_(s_in)
        if not self.transcoder:
            self.b_dec.div_(s_in)  # (s x - b) W = (x - b / s)(s W)
            self.W_dec.div_(s_out)  # with s_in == s_out, b_dec/s serves both sides
        else:
            self.W_dec.div_(s_out)
            self.b_dec.div_(s_out)
        if self.W_skip is not None:
            self.W_skip.mul_(s_in / s_out)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write the native checkpoint directory (atomic per file; cfg.json last)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_write(path / "sae.safetensors") as f:
            f.write(save(tensors))
        write_json(path / "cfg.json", {"format": FORMAT, "sae": self.cfg.model_dump(mode="json"),
                                       **(meta or {})})


class ThresholdCoder(SparseCoder):
    """A coder whose activations are thresholded (ReLU, JumpReLU, Gated, p-annealing): each
    training step takes the sparse path while the last batch was sparse enough, else the dense
    reference path (which measures the density for the next step)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        if self.try_sparse() and (out := self.forward_sparse(x, y, ctx)) is not None:
            return out
        return self.forward_dense(x, y, ctx)

    def forward_sparse(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput | None:
        raise NotImplementedError

    def forward_dense(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        raise NotImplementedError


def sq_err(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum ||y - y_hat||^2 over the batch []: mse_loss's fused kernels, one pass each way (the
    same value and gradient as (y - y_hat).pow(2).sum(), whose backward takes three passes)."""
    return F.mse_loss(y_hat, y, reduction="sum")


def fvu_of(y_hat: torch.Tensor, y: torch.Tensor, total_variance: torch.Tensor) -> torch.Tensor:
    """sum ||y - y_hat||^2 / total variance (variance around the batch mean, summed over dims)."""
    return sq_err(y_hat, y) / total_variance


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
    """Load a native checkpoint directory; returns the SAE (eval mode) and its cfg.json."""
    path = Path(path)
    cfg_path, weights = path / "cfg.json", path / "sae.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{path} is not a saelab SAE checkpoint: {p.name} is missing")
    meta = read_json(cfg_path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    sae = build_sae(SAEConfig.model_validate(meta["sae"]))
    sae.load_state_dict(load_file(weights))
    return sae.eval(), meta


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
