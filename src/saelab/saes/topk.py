"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders"). Loss = FVU + aux_coef * AuxK, where AuxK reconstructs the residual
x - x_hat from the top `aux_k` dead latents, normalised by the same total variance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from saelab.config import SAEConfig
from saelab.saes.base import ForwardOutput, SparseCoder, register


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[:, j] * W_dec[indices[:, j]] -> [batch, d_in]; values, indices: [batch, k]."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


@register("topk")
class TopKSAE(SparseCoder):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        d, m = cfg.d_in, cfg.width
        W_dec = torch.randn(m, d)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone().contiguous())  # encoder init = decoder transpose
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU pre-activations [batch, width]."""
        return F.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values [batch, k], indices [batch, k], pre-activations [batch, width])."""
        pre = self.pre_acts(x)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return vals, idx, pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx, pre = self.topk(x)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx, _ = self.topk(x)
        return sparse_decode(vals, idx, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> ForwardOutput:
        """x: [batch, d_in]; dead_mask: [width] bool, latents that count as dead for AuxK."""
        vals, idx, pre = self.topk(x)
        x_hat = sparse_decode(vals, idx, self.W_dec) + self.b_dec
        err = x - x_hat
        total_var = (x - x.mean(0)).pow(2).sum()
        fvu = err.pow(2).sum() / total_var
        aux = torch.zeros((), device=x.device)
        if dead_mask is not None and self.cfg.aux_coef > 0 and (n_dead := int(dead_mask.sum())) > 0:
            aux_k_cfg = self.cfg.aux_k or self.cfg.d_in // 2
            aux_k = min(aux_k_cfg, n_dead)
            dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
            a_vals, a_idx = dead_pre.topk(aux_k, dim=-1, sorted=False)
            a_vals = a_vals.clamp_min(0)  # -inf never selected while aux_k <= n_dead
            e_hat = sparse_decode(a_vals, a_idx, self.W_dec)
            # weigh AuxK down while fewer latents are dead than it asks for (as sparsify does)
            scale = min(n_dead / aux_k_cfg, 1.0)
            aux = scale * (e_hat - err.detach()).pow(2).sum() / total_var
        loss = fvu + self.cfg.aux_coef * aux
        return ForwardOutput(x_hat, loss, fvu.detach(), aux.detach(), idx, float(self.cfg.k))
