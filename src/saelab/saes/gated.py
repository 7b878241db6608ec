"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders").

A gate path decides which latents fire, a magnitude path how much, sharing directions:
  pi_gate = x_c W_enc + b_enc          (W_enc is W_gate, b_enc is b_gate)
  pi_mag  = x_c (W_enc * exp(r_mag)) + b_mag
  z = 1[pi_gate > 0] * ReLU(pi_mag)
Folding an input scale into W_enc scales both paths (W_mag = W_enc e^r_mag), so the base fold serves.
Loss = ||y - y_hat||^2 / n + lambda * sum ReLU(pi_gate) ||W_dec_i|| / n
       + ||y - (ReLU(pi_gate) W_dec' + b_dec')||^2 / n  (primes: frozen copies, the paper's L_aux).

Sparse path (while the batch is sparse): pi_mag = (x_c W_enc) e^r_mag + b_mag shares the gate's
matmul, so one dense matmul serves both paths. The entries that carry a value or a gradient
are the open gates G = {pi_gate > 0}: ReLU(pi_gate) > 0 exactly there, so the L1 and the aux
reconstruction (decoded with the detached W_dec) live on G and send gradient to pi_gate there
only; z is nonzero on G ∩ {pi_mag > 0} ⊆ G, and its gradient reaches pi_mag there only (the
gate's indicator has none). G is the larger set, so the density is |G| / (batch * width).
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

DEFAULT_L1 = 1.0  # for inputs normalised to E||x||^2 = d


@register("gated")
class GatedSAE(ThresholdCoder):
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

    def forward_sparse(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput | None:
        """The same loss on the open gates only; None (after measuring) when too dense."""
        x_c, shift = self.sparse_input(x)
        # x_c W_enc, shared by both paths, where pi_gate = x_c W_enc + b_enc > 0
        if (got := self.sparse_entries(x_c, None, -self.b_enc.detach())) is None:
            return None
        ent, vals = got
        s_e = pre_at(x_c, self.W_enc, None, vals, ent, shift)
        gate_act = F.relu(s_e + take(self.b_enc, ent))  # ReLU(pi_gate) on G
        z = F.relu(s_e * take(self.r_mag.exp(), ent) + take(self.b_mag, ent))  # ReLU(pi_mag), gate open
        y_hat = self.decoder_out(entry_decode(z, self.W_dec, ent), x)
        l1 = (gate_act * take(self.W_dec.norm(dim=1), ent)).sum() / ctx.n_tokens
        y_gate = self.decoder_out(entry_decode(gate_act, self.W_dec.detach(), ent), x, self.b_dec.detach())
        return self._loss(x, y, y_hat, y_gate, l1, ent.cols[z.detach() > 0], ctx)

    def forward_dense(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        """The reference path: dense [batch, width] gate and magnitude pre-activations."""
        pi_gate, pi_mag = self.gates(x)
        z = (pi_gate > 0) * F.relu(pi_mag)
        gate_act = F.relu(pi_gate)
        l1 = (gate_act * self.W_dec.norm(dim=1)).sum() / ctx.n_tokens
        y_gate = self.decoder_out(gate_act @ self.W_dec.detach(), x, self.b_dec.detach())
        with torch.no_grad():
            self.note_dense((pi_gate > 0).sum(), x.shape[0])
        return self._loss(x, y, self.decode(z, x), y_gate, l1, z.nonzero()[:, 1], ctx)

    def _loss(self, x, y, y_hat, y_gate, l1, active, ctx: LossContext) -> ForwardOutput:
        sq = sq_err(y_hat, y)
        aux = sq_err(y_gate, y) / ctx.n_tokens
        coef = DEFAULT_L1 if self.cfg.sparsity_coef is None else self.cfg.sparsity_coef
        mse = sq / ctx.n_tokens
        loss = mse + ctx.sparsity_scale * coef * l1 + aux
        return ForwardOutput(y_hat, loss, sq.detach() / ctx.total_variance, active,
                             active.numel() / x.shape[0], {"mse": mse.detach(), "l1": l1.detach(),
                                                           "aux_gate": aux.detach()})
