"""p-annealing (Karvonen et al. 2024, "Measuring Progress in Dictionary Learning for
Language Model Interpretability with Board Game Models").

A ReLU SAE (unit-norm decoder) whose sparsity penalty is sum_i z_i^p with p annealed from
1 (L1, convex) towards `p_end` (closer to L0) over training. p moves in ANNEAL_STEPS equal
steps between ANNEAL_START and 90% of training; at each move the coefficient is rescaled
by the batch's ||z||_p_old^p_old / ||z||_p_new^p_new so the penalty keeps its magnitude
(as the authors' trainer does). p and the rescaled coefficient are buffers, so a resumed
run continues exactly.

Sparse path (while the batch is sparse): z^p and its gradient vanish off the active entries,
so everything after the encoder matmul runs on them (as relu.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.saes.base import (
    ForwardOutput,
    LossContext,
    ThresholdCoder,
    register,
    sq_err,
)
from saelab.saes.config import SAEConfig
from saelab.saes.sparse_ops import entry_decode, pre_at

DEFAULT_COEF = 5.0
ANNEAL_START, ANNEAL_END, ANNEAL_STEPS = 0.2, 0.9, 10


def p_at(progress: float, p_end: float) -> float:
    """The scheduled p: 1 until ANNEAL_START, then ANNEAL_STEPS equal steps down to p_end."""
    if progress < ANNEAL_START:
        return 1.0
    done = min(ANNEAL_STEPS, 1 + int((progress - ANNEAL_START) / (ANNEAL_END - ANNEAL_START) * ANNEAL_STEPS))
    return 1.0 - (1.0 - p_end) * done / ANNEAL_STEPS


@register("panneal")
class PAnnealSAE(ThresholdCoder):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("p", torch.tensor(1.0))
        coef = DEFAULT_COEF if cfg.sparsity_coef is None else cfg.sparsity_coef
        self.register_buffer("coef", torch.tensor(float(coef)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_acts(x))

    def anneal(self, z: torch.Tensor, ctx: LossContext) -> None:
        """Move p on schedule, rescaling the coefficient by this batch's ||z||_p^p ratio (z: any
        shape holding every nonzero activation of the batch)."""
        p_new = p_at(ctx.progress, self.cfg.p_end)
        if p_new != float(self.p):
            with torch.no_grad():
                zd = z.detach()
                old, new = zd.pow(float(self.p)).sum(), zd.pow(p_new).sum()
                if new > 0:
                    self.coef.mul_(old / new)
                self.p.fill_(p_new)

    def forward_sparse(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput | None:
        """The same loss on the active entries only; None (after measuring) when the batch is too dense."""
        x_c, shift = self.sparse_input(x)
        if (got := self.sparse_entries(x_c, self.b_enc, torch.zeros_like(self.b_enc.detach()))) is None:
            return None
        ent, vals = got
        z = pre_at(x_c, self.W_enc, self.b_enc, vals, ent, shift)  # [nnz], all > 0
        self.anneal(z, ctx)
        y_hat = self.decoder_out(entry_decode(z, self.W_dec, ent), x)
        return self._loss(x, y, y_hat, (z + 1e-12).pow(float(self.p)).sum() / ctx.n_tokens, ent.cols, ctx)

    def forward_dense(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        """The reference path: dense [batch, width] activations."""
        z = self.encode(x)
        self.anneal(z, ctx)
        # (z + tiny)^p keeps the gradient finite at z = 0 for p < 1; the tiny shift is negligible
        pen = ((z + 1e-12).pow(float(self.p)) * (z > 0)).sum() / ctx.n_tokens
        active = z.nonzero()[:, 1]
        self.note_dense(active.numel(), x.shape[0])
        return self._loss(x, y, self.decode(z, x), pen, active, ctx)

    def _loss(self, x, y, y_hat, pen, active, ctx: LossContext) -> ForwardOutput:
        sq = sq_err(y_hat, y)
        mse = sq / ctx.n_tokens
        loss = mse + ctx.sparsity_scale * float(self.coef) * pen
        return ForwardOutput(y_hat, loss, sq.detach() / ctx.total_variance, active,
                             active.numel() / x.shape[0], {"mse": mse.detach(), "lp": pen.detach()})
