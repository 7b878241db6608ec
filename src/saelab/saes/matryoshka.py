"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"; Nabeshima 2024).

Latents are split into nested groups; the loss is the mean, over the nested prefixes
(group 1, groups 1-2, ..., all), of the FVU of the reconstruction that uses only that
prefix's latents. Early latents must reconstruct on their own, so they learn general
features and later ones specialise. Selection and the inference threshold are BatchTopK's.
"""

from __future__ import annotations

import torch

from saelab.saes.base import ForwardOutput, LossContext, fvu_of, register
from saelab.saes.batchtopk import BatchTopKSAE
from saelab.saes.config import SAEConfig
from saelab.saes.sparse_ops import ragged_decode
from saelab.saes.topk import auxk_loss, dead_latents, dead_pre_acts

DEFAULT_GROUPS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def group_bounds(width: int, fractions: list[float] | tuple[float, ...]) -> list[int]:
    """Cumulative latent counts ending each group, e.g. width 64 -> [4, 8, 16, 32, 64]."""
    ends, acc = [], 0.0
    for f in fractions:
        acc += f
        ends.append(round(acc * width))
    ends[-1] = width
    if any(b <= a for a, b in zip([0, *ends], ends, strict=False)):
        raise ValueError(f"group_fractions {list(fractions)} give an empty group at width {width}")
    return ends


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.ends = group_bounds(cfg.width, cfg.group_fractions or DEFAULT_GROUPS)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        rows, cols, vals = self.select(x)
        self.update_threshold(vals.detach())
        B = x.shape[0]
        y_hat = None
        fvus = []
        start = 0
        for end in self.ends:  # add one group at a time: y_hat is the prefix's reconstruction
            in_group = (cols >= start) & (cols < end)
            part = ragged_decode(rows[in_group], cols[in_group], vals[in_group], self.W_dec, B)
            y_hat = self.decoder_out(part, x) if y_hat is None else y_hat + part
            fvus.append(fvu_of(y_hat, y, ctx.total_variance))
            start = end
        dead = dead_latents(self, ctx)
        aux = x.new_zeros(()) if dead is None else auxk_loss(self, dead_pre_acts(self, self.centered(x), dead), dead, y_hat, y, ctx)
        prefix_fvu = torch.stack(fvus).mean()
        loss = prefix_fvu + self.cfg.aux_coef * aux
        return ForwardOutput(y_hat, loss, fvus[-1].detach(), cols, rows.numel() / B,
                             {"fvu_prefix_mean": prefix_fvu.detach(), "auxk": aux.detach()})
