"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders").

A gate path decides which latents fire, a magnitude path how much, sharing directions:
  pi_gate = x_c W_enc + b_enc          (W_enc is W_gate, b_enc is b_gate)
  pi_mag  = x_c (W_enc * exp(r_mag)) + b_mag
  z = 1[pi_gate > 0] * ReLU(pi_mag)
Folding an input scale into W_enc scales both paths (W_mag = W_enc e^r_mag), so the base fold serves.
Loss = ||y - y_hat||^2 / n + lambda * sum ReLU(pi_gate) ||W_dec_i|| / n
       + ||y - (ReLU(pi_gate) W_dec' + b_dec')||^2 / n  (primes: frozen copies, the paper's L_aux).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.saes.base import ForwardOutput, LossContext, SparseCoder, fvu_of, register
from saelab.saes.config import SAEConfig

DEFAULT_L1 = 1.0  # for inputs normalised to E||x||^2 = d


@register("gated")
class GatedSAE(SparseCoder):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.r_mag = torch.nn.Parameter(torch.zeros(cfg.width))
        self.b_mag = torch.nn.Parameter(torch.zeros(cfg.width))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_c = self.centered(x)
        pi_gate = x_c @ self.W_enc + self.b_enc
        pi_mag = x_c @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return pi_gate, pi_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, pi_mag = self.gates(x)
        return (pi_gate > 0) * F.relu(pi_mag)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        pi_gate, pi_mag = self.gates(x)
        z = (pi_gate > 0) * F.relu(pi_mag)
        y_hat = self.decode(z, x)
        err = y - y_hat
        gate_act = F.relu(pi_gate)
        l1 = (gate_act * self.W_dec.norm(dim=1)).sum() / ctx.n_tokens
        y_gate = gate_act @ self.W_dec.detach() + self.b_dec.detach() + self.skip_out(x)
        aux = (y - y_gate).pow(2).sum() / ctx.n_tokens
        coef = DEFAULT_L1 if self.cfg.sparsity_coef is None else self.cfg.sparsity_coef
        mse = err.pow(2).sum() / ctx.n_tokens
        loss = mse + ctx.sparsity_scale * coef * l1 + aux
        active = z.nonzero()[:, 1]
        return ForwardOutput(y_hat, loss, fvu_of(err, ctx.total_variance).detach(), active,
                             active.numel() / x.shape[0], {"mse": mse.detach(), "l1": l1.detach(),
                                                           "aux_gate": aux.detach()})
