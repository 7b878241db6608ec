"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates - April
2024": training SAEs with an unconstrained decoder).

Loss = sum_b ||y_b - y_hat_b||^2 / n + lambda * sum_b sum_i z_bi ||W_dec_i|| / n, with the
inputs normalised so that E||x||^2 = d (the trainer does that and folds it back at save),
no decoder norm constraint, decoder rows initialised at norm 0.1 and lambda warmed up
from 0 over the first `sparsity_warmup` of training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.saes.base import ForwardOutput, LossContext, SparseCoder, fvu_of, register
from saelab.saes.config import SAEConfig

DEFAULT_L1 = 5.0
DECODER_INIT_NORM = 0.1


@register("relu")
class ReluSAE(SparseCoder):
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

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        z = self.encode(x)
        y_hat = self.decode(z, x)
        err = y - y_hat
        recon = err.pow(2).sum() / ctx.n_tokens
        pen = self.penalty(z, ctx)
        loss = recon + ctx.sparsity_scale * self.coef() * pen
        active = z.nonzero()[:, 1]
        return ForwardOutput(y_hat, loss, fvu_of(err, ctx.total_variance).detach(), active,
                             active.numel() / x.shape[0], {"mse": recon.detach(), "l1": pen.detach()})
