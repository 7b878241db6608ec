"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders"). Loss = FVU + aux_coef * AuxK, where AuxK reconstructs the residual
y - y_hat from the top `aux_k` dead latents, normalised by the same total variance.
The training path is sparse end to end (saes/sparse_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.saes.base import ForwardOutput, LossContext, SparseCoder, fvu_of, register
from saelab.saes.sparse_ops import sparse_decode, topk_encode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def auxk_loss(sae: SparseCoder, pre: torch.Tensor, err: torch.Tensor, ctx: LossContext) -> torch.Tensor:
    """AuxK: reconstruct the (detached) error from the top aux_k dead latents' pre-activations.

    pre: [batch, width] pre-activations (ReLU'd); err: [batch, d_out] = y - y_hat. Weighed
    down while fewer latents are dead than aux_k asks for (as sparsify does).
    """
    if ctx.dead_mask is None or sae.cfg.aux_coef == 0 or (n_dead := int(ctx.dead_mask.sum())) == 0:
        return torch.zeros(())
    aux_k_cfg = sae.cfg.aux_k or sae.cfg.d_in // 2
    aux_k = min(aux_k_cfg, n_dead)
    vals, idx = pre.masked_fill(~ctx.dead_mask, float("-inf")).topk(aux_k, dim=-1, sorted=False)
    e_hat = sparse_decode(vals.clamp_min(0), idx, sae.W_dec)
    return min(n_dead / aux_k_cfg, 1.0) * fvu_of(e_hat - err.detach(), ctx.total_variance)


@register("topk")
class TopKSAE(SparseCoder):
    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (values [batch, k], indices [batch, k]) of the ReLU'd top k, float32."""
        vals, idx = F.relu(self.pre_acts(x)).topk(self.cfg.k, dim=-1, sorted=False)
        return vals, idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.topk(x)
        return torch.zeros(x.shape[0], self.cfg.width, dtype=vals.dtype).scatter_(-1, idx, vals)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.topk(x)
        return sparse_decode(vals, idx, self.W_dec) + self.b_dec + self.skip_out(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        x_c = self.centered(x)
        vals, idx = topk_encode(x_c, self.W_enc, self.b_enc, self.cfg.k, DTYPES[self.cfg.topk_select_dtype])
        y_hat = sparse_decode(vals, idx, self.W_dec) + self.b_dec + self.skip_out(x)
        err = y - y_hat
        fvu = fvu_of(err, ctx.total_variance)
        aux = torch.zeros(())
        if ctx.dead_mask is not None and ctx.dead_mask.any() and self.cfg.aux_coef > 0:
            pre = F.relu(x_c @ self.W_enc + self.b_enc)  # dense, only while latents are dead
            aux = auxk_loss(self, pre, err, ctx)
        loss = fvu + self.cfg.aux_coef * aux
        return ForwardOutput(y_hat, loss, fvu.detach(), aux.detach(), idx, float(self.cfg.k))
