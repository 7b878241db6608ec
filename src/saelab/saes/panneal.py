"""p-annealing (Karvonen et al. 2024, "Measuring Progress in Dictionary Learning for
Language Model Interpretability with Board Game Models").

A ReLU SAE (unit-norm decoder) whose sparsity penalty is sum_i z_i^p with p annealed from
1 (L1, convex) towards `p_end` (closer to L0) over training. p moves in ANNEAL_STEPS equal
steps between ANNEAL_START and 90% of training; at each move the coefficient is rescaled
by the batch's ||z||_p_old^p_old / ||z||_p_new^p_new so the penalty keeps its magnitude
(as the authors' trainer does). p and the rescaled coefficient are buffers, so a resumed
run continues exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.saes.base import ForwardOutput, LossContext, SparseCoder, fvu_of, register
from saelab.saes.config import SAEConfig

DEFAULT_COEF = 5.0
ANNEAL_START, ANNEAL_END, ANNEAL_STEPS = 0.2, 0.9, 10


def p_at(progress: float, p_end: float) -> float:
    """The scheduled p: 1 until ANNEAL_START, then ANNEAL_STEPS equal steps down to p_end."""
    if progress < ANNEAL_START:
        return 1.0
    done = min(ANNEAL_STEPS, 1 + int((progress - ANNEAL_START) / (ANNEAL_END - ANNEAL_START) * ANNEAL_STEPS))
    return 1.0 - (1.0 - p_end) * done / ANNEAL_STEPS


@register("panneal")
class PAnnealSAE(SparseCoder):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("p", torch.tensor(1.0))
        coef = DEFAULT_COEF if cfg.sparsity_coef is None else cfg.sparsity_coef
        self.register_buffer("coef", torch.tensor(float(coef)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_acts(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        z = self.encode(x)
        p_new = p_at(ctx.progress, self.cfg.p_end)
        if p_new != float(self.p):
            with torch.no_grad():
                zd = z.detach()
                old, new = zd.pow(float(self.p)).sum(), zd.pow(p_new).sum()
                if new > 0:
                    self.coef.mul_(old / new)
                self.p.fill_(p_new)
        y_hat = self.decode(z, x)
        err = y - y_hat
        # (z + tiny)^p keeps the gradient finite at z = 0 for p < 1; the tiny shift is negligible
        pen = ((z + 1e-12).pow(float(self.p)) * (z > 0)).sum() / ctx.n_tokens
        mse = err.pow(2).sum() / ctx.n_tokens
        loss = mse + ctx.sparsity_scale * float(self.coef) * pen
        active = z.nonzero()[:, 1]
        return ForwardOutput(y_hat, loss, fvu_of(err, ctx.total_variance).detach(), active,
                             active.numel() / x.shape[0], {"mse": mse.detach(), "lp": pen.detach()})
