"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates - April
2024": training SAEs with an unconstrained decoder).

Loss = sum_b ||y_b - y_hat_b||^2 / n + lambda * sum_b sum_i z_bi ||W_dec_i|| / n, with the
inputs normalised so that E||x||^2 = d (the trainer does that and folds it back at save),
no decoder norm constraint, decoder rows initialised at norm 0.1 and lambda warmed up
from 0 over the first `sparsity_warmup` of training.

Sparse path (while the batch is sparse, base.SparseCoder.sparse_max_density): only the
active entries z_bi > 0 carry a value or a gradient (ReLU), so the decoder runs on them and
the penalty's W_dec gradient involves ||W_dec_i|| of active i only.
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
from saelab.saes.sparse_ops import entry_decode, pre_at, take

DEFAULT_L1 = 5.0
DECODER_INIT_NORM = 0.1


@register("relu")
class ReluSAE(ThresholdCoder):
    unit_norm_decoder = False

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        with torch.no_grad():
            self.W_dec.mul_(DECODER_INIT_NORM)
            if cfg.d_in == (cfg.d_out or cfg.d_in):
                self.W_enc.copy_(self.W_dec.T)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_acts(x))

    def penalty(self, z: torch.Tensor, ctx: LossContext) -> torch.Tensor:
        """Per-token sparsity penalty summed over this batch, divided by the global token count."""
        return (z * self.W_dec.norm(dim=1)).sum() / ctx.n_tokens

    def coef(self) -> float:
        return DEFAULT_L1 if self.cfg.sparsity_coef is None else self.cfg.sparsity_coef

    def forward_sparse(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput | None:
        """The same loss on the active entries only; None (after measuring) when the batch is too dense."""
        x_c, shift = self.sparse_input(x)
        if (got := self.sparse_entries(x_c, self.b_enc, torch.zeros_like(self.b_enc.detach()))) is None:
            return None
        ent, vals = got
        z = pre_at(x_c, self.W_enc, self.b_enc, vals, ent, shift)  # [nnz], all > 0
        y_hat = self.decoder_out(entry_decode(z, self.W_dec, ent), x)
        return self._loss(x, y, y_hat, (z * take(self.W_dec.norm(dim=1), ent)).sum() / ctx.n_tokens, ent.cols, ctx)

    def forward_dense(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        """The reference path: dense [batch, width] activations."""
        z = self.encode(x)
        active = z.nonzero()[:, 1]
        self.note_dense(active.numel(), x.shape[0])
        return self._loss(x, y, self.decode(z, x), self.penalty(z, ctx), active, ctx)

    def _loss(self, x, y, y_hat, pen, active, ctx: LossContext) -> ForwardOutput:
        sq = sq_err(y_hat, y)
        recon = sq / ctx.n_tokens
        loss = recon + ctx.sparsity_scale * self.coef() * pen
        return ForwardOutput(y_hat, loss, sq.detach() / ctx.total_variance, active,
                             active.numel() / x.shape[0], {"mse": recon.detach(), "l1": pen.detach()})
