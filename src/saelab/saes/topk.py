"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders"). Loss = FVU + aux_coef * AuxK, where AuxK reconstructs the residual
y - y_hat from the top `aux_k` dead latents, normalised by the same total variance.
The training path is sparse end to end (saes/sparse_ops.py: with bf16 selection on the CPU the
encoder matmul and top-k run fused in row blocks; then the selected entries only, one latent-sorted
order for both weight gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.device import select_dtype
from saelab.saes.base import ForwardOutput, LossContext, SparseCoder, fvu_of, register
from saelab.saes.sparse_ops import entry_decode, sparse_decode, topk_encode

DENSE_AUX_RATIO = 6  # up to this many dead latents per aux_k slot, decode AuxK densely. Measured
# (d 576, batch 4096, aux_k 288; AuxK forward + backward): 300 dead 77 vs 201 ms sparse, 1000 dead
# 171 vs 251 ms, 2000 dead 332 vs 338 ms, 5000 dead 928 vs 654 ms.


def dead_latents(sae: SparseCoder, ctx: LossContext) -> torch.Tensor | None:
    """Ids [n_dead] of the latents AuxK should revive, or None when it has nothing to do."""
    if ctx.dead_mask is None or sae.cfg.aux_coef == 0 or not ctx.dead_mask.any():
        return None
    return ctx.dead_mask.nonzero().squeeze(1)


def dead_pre_acts(sae: SparseCoder, x_c: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """ReLU'd pre-activations [batch, n_dead] of the dead latents only: their encoder columns are
    gathered as rows of W_enc's [width, d_in] storage (the gradient then keeps W_enc's layout)."""
    return F.relu(x_c @ sae.W_enc.t()[dead].t() + sae.b_enc[dead])


def auxk_loss(sae: SparseCoder, pre_dead: torch.Tensor, dead: torch.Tensor, y_hat: torch.Tensor, y: torch.Tensor,
              ctx: LossContext) -> torch.Tensor:
    """AuxK: reconstruct the (detached) error from the top aux_k dead latents' pre-activations.

    pre_dead: [batch, n_dead] ReLU'd pre-activations of the dead latents `dead` [n_dead];
    the error to reconstruct: y - y_hat [batch, d_out]. Weighed down while fewer latents are dead than aux_k asks
    for (as sparsify does).
    """
    aux_k_cfg = sae.cfg.aux_k or sae.cfg.d_in // 2
    n_dead = dead.numel()
    aux_k = min(aux_k_cfg, n_dead)
    if n_dead > DENSE_AUX_RATIO * aux_k:  # few of the dead fire: k-sparse decode
        vals, j = pre_dead.topk(aux_k, dim=-1, sorted=False)
        e_hat = sparse_decode(vals, dead[j], sae.W_dec)
    else:  # most of the dead fire: a dense [batch, n_dead] x [n_dead, d_out] matmul is cheaper
        z = pre_dead
        if aux_k < n_dead:
            vals, j = pre_dead.topk(aux_k, dim=-1, sorted=False)
            z = torch.zeros_like(pre_dead).scatter(-1, j, vals)
        e_hat = z @ sae.W_dec[dead]
    return min(n_dead / aux_k_cfg, 1.0) * fvu_of(e_hat, (y - y_hat).detach(), ctx.total_variance)


@register("topk")
class TopKSAE(SparseCoder):
    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (values [batch, k], indices [batch, k]) of the ReLU'd top k, float32."""
        vals, idx = F.relu(self.pre_acts(x)).topk(self.cfg.k, dim=-1, sorted=False)
        return vals, idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.topk(x)
        return torch.zeros(x.shape[0], self.cfg.width, dtype=vals.dtype, device=x.device).scatter_(-1, idx, vals)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.topk(x)
        return self.decoder_out(sparse_decode(vals, idx, self.W_dec), x)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        x_c, shift = self.sparse_input(x)
        vals, idx, ent = topk_encode(x_c, self.W_enc, self.b_enc, self.cfg.k,
                                     select_dtype(self.cfg.topk_select_dtype, x.device), shift)
        y_hat = self.decoder_out(entry_decode(vals.reshape(-1), self.W_dec, ent), x)
        fvu = fvu_of(y_hat, y, ctx.total_variance)
        aux = x.new_zeros(())
        if (dead := dead_latents(self, ctx)) is not None:
            aux = auxk_loss(self, dead_pre_acts(self, self.centered(x), dead), dead, y_hat, y, ctx)
        loss = fvu + self.cfg.aux_coef * aux
        return ForwardOutput(y_hat, loss, fvu.detach(), idx, float(self.cfg.k),
                             {"fvu": fvu.detach(), "auxk": aux.detach()})
