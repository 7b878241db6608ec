"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
Fidelity with JumpReLU Sparse Autoencoders"; the architecture of Gemma Scope).

z_i = pre_i * H(pre_i - theta_i) with a learned per-latent threshold theta = exp(log_threshold).
Loss = ||y - y_hat||^2 / n + lambda * L0 / n. H has zero gradient almost everywhere, so theta
learns through straight-through estimators with a rectangle kernel of width epsilon
(the paper's pseudo-derivatives):
  d/dtheta JumpReLU(pre) := -(theta / eps) K((pre - theta) / eps)
  d/dtheta H(pre - theta) := -(1 / eps) K((pre - theta) / eps),   K(u) = 1[|u| < 1/2].

Sparse path (while the batch is sparse): the entries that carry a value or a gradient are the
active ones (pre > theta: value, gradient to pre, W_dec) and those within the kernel's band
(|pre - theta| < eps/2: gradient to theta only, from both pseudo-derivatives; a band entry
below theta has z = 0 but dL/dz = <dL/dy_hat, W_dec_i> != 0), together pre > theta - eps/2.
They are decoded with their z (0 for the inactive ones, which then add nothing to y_hat or
to the W_dec gradient but receive dL/dz), and the same autograd functions run on them.
"""

from __future__ import annotations

import math

import torch

from saelab.saes.base import (
    ForwardOutput,
    LossContext,
    ThresholdCoder,
    register,
    sq_err,
)
from saelab.saes.config import SAEConfig
from saelab.saes.sparse_ops import entry_decode, pre_at, take

DEFAULT_L0_COEF = 0.1  # for inputs normalised to E||x||^2 = d


def _kernel(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


def _to_theta(g: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sum a per-entry gradient to theta's shape: over the batch for dense [B, m] against theta
    [m]; as it is for entries [nnz] against theta gathered per entry [nnz]."""
    return g.sum(0) if g.dim() > theta.dim() else g


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        g_pre = g * (pre > theta)
        g_theta = _to_theta(-(theta / ctx.eps) * _kernel(pre, theta, ctx.eps) * g, theta)
        return g_pre, g_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return None, _to_theta(-(1 / ctx.eps) * _kernel(pre, theta, ctx.eps) * g, theta), None


@register("jumprelu")
class JumpReluSAE(ThresholdCoder):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = torch.nn.Parameter(torch.full((cfg.width,), math.log(cfg.threshold_init)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def forward_sparse(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput | None:
        """The same loss on the active and in-band entries; None (after measuring) when too dense."""
        x_c, shift = self.sparse_input(x)
        eps = self.cfg.bandwidth
        # active or within the band: pre > theta - eps / 2
        if (got := self.sparse_entries(x_c, self.b_enc, (self.threshold - eps / 2).detach())) is None:
            return None
        ent, vals = got
        pre_e = pre_at(x_c, self.W_enc, self.b_enc, vals, ent, shift)
        theta = take(self.threshold, ent)
        z = _JumpReLU.apply(pre_e, theta, eps)
        y_hat = self.decoder_out(entry_decode(z, self.W_dec, ent), x)
        l0 = _Step.apply(pre_e, theta, eps).sum() / ctx.n_tokens
        return self._loss(x, y, y_hat, l0, ent.cols[pre_e.detach() > theta.detach()], ctx)

    def forward_dense(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        """The reference path: dense [batch, width] pre-activations."""
        pre = self.pre_acts(x)
        theta = self.threshold
        z = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        l0 = _Step.apply(pre, theta, self.cfg.bandwidth).sum() / ctx.n_tokens
        with torch.no_grad():
            self.note_dense((pre > theta - self.cfg.bandwidth / 2).sum(), x.shape[0])
        return self._loss(x, y, self.decode(z, x), l0, z.nonzero()[:, 1], ctx)

    def _loss(self, x, y, y_hat, l0, active, ctx: LossContext) -> ForwardOutput:
        sq = sq_err(y_hat, y)
        coef = DEFAULT_L0_COEF if self.cfg.sparsity_coef is None else self.cfg.sparsity_coef
        mse = sq / ctx.n_tokens
        loss = mse + ctx.sparsity_scale * coef * l0
        return ForwardOutput(y_hat, loss, sq.detach() / ctx.total_variance, active,
                             active.numel() / x.shape[0], {"mse": mse.detach(), "l0": l0.detach()})
