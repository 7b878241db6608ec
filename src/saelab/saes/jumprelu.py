"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
Fidelity with JumpReLU Sparse Autoencoders"; the architecture of Gemma Scope).

z_i = pre_i * H(pre_i - theta_i) with a learned per-latent threshold theta = exp(log_threshold).
Loss = ||y - y_hat||^2 / n + lambda * L0 / n. H has zero gradient almost everywhere, so theta
learns through straight-through estimators with a rectangle kernel of width epsilon
(the paper's pseudo-derivatives):
  d/dtheta JumpReLU(pre) := -(theta / eps) K((pre - theta) / eps)
  d/dtheta H(pre - theta) := -(1 / eps) K((pre - theta) / eps),   K(u) = 1[|u| < 1/2].
"""

from __future__ import annotations

import math

import torch

from saelab.saes.base import ForwardOutput, LossContext, SparseCoder, fvu_of, register
from saelab.saes.config import SAEConfig

DEFAULT_L0_COEF = 0.1  # for inputs normalised to E||x||^2 = d


def _kernel(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


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
        g_theta = (-(theta / ctx.eps) * _kernel(pre, theta, ctx.eps) * g).sum(0)
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
        return None, (-(1 / ctx.eps) * _kernel(pre, theta, ctx.eps) * g).sum(0), None


@register("jumprelu")
class JumpReluSAE(SparseCoder):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.log_threshold = torch.nn.Parameter(torch.full((cfg.width,), math.log(cfg.threshold_init)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        pre = self.pre_acts(x)
        theta = self.threshold
        z = _JumpReLU.apply(pre, theta, self.cfg.bandwidth)
        y_hat = self.decode(z, x)
        err = y - y_hat
        l0 = _Step.apply(pre, theta, self.cfg.bandwidth).sum() / ctx.n_tokens
        coef = DEFAULT_L0_COEF if self.cfg.sparsity_coef is None else self.cfg.sparsity_coef
        mse = err.pow(2).sum() / ctx.n_tokens
        loss = mse + ctx.sparsity_scale * coef * l0
        active = z.nonzero()[:, 1]
        return ForwardOutput(y_hat, loss, fvu_of(err, ctx.total_variance).detach(), active,
                             active.numel() / x.shape[0], {"mse": mse.detach(), "l0": l0.detach()})
