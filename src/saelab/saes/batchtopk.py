"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * batch largest ReLU'd pre-activations across the whole batch (so
tokens get a variable number of latents, k on average). For per-token use it learns a
global threshold theta: an exponential moving average of the smallest value kept in each
training batch; at inference a latent fires iff its pre-activation exceeds theta
(a JumpReLU with one shared threshold). AuxK as in TopK.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saelab.device import select_dtype
from saelab.saes.base import ForwardOutput, LossContext, SparseCoder, fvu_of, register
from saelab.saes.config import SAEConfig
from saelab.saes.sparse_ops import batch_topk_encode, ragged_decode
from saelab.saes.topk import auxk_loss, dead_latents, dead_pre_acts

THRESHOLD_EMA = 0.99


@register("batchtopk")
class BatchTopKSAE(SparseCoder):
    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token inference: JumpReLU with the learned global threshold."""
        pre = F.relu(self.pre_acts(x))
        if self.threshold < 0:
            raise RuntimeError("BatchTopK threshold was never estimated: train the SAE first")
        return pre * (pre > self.threshold)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's k*B largest positive pre-activations as row-sorted (rows, cols, values) [nnz]."""
        x_c, shift = self.sparse_input(x)
        return batch_topk_encode(x_c, self.W_enc, self.b_enc, self.cfg.k,
                                 select_dtype(self.cfg.topk_select_dtype, x.device), shift)

    @torch.no_grad()
    def update_threshold(self, vals: torch.Tensor) -> None:
        if vals.numel() == 0:
            return
        low = vals.min()
        self.threshold.copy_(low if self.threshold < 0 else THRESHOLD_EMA * self.threshold + (1 - THRESHOLD_EMA) * low)

    def forward(self, x: torch.Tensor, y: torch.Tensor, ctx: LossContext) -> ForwardOutput:
        rows, cols, vals = self.select(x)
        self.update_threshold(vals.detach())
        y_hat = self.decode_selected(rows, cols, vals, x)
        fvu = fvu_of(y_hat, y, ctx.total_variance)
        dead = dead_latents(self, ctx)
        aux = x.new_zeros(()) if dead is None else auxk_loss(self, dead_pre_acts(self, self.centered(x), dead), dead, y_hat, y, ctx)
        loss = fvu + self.cfg.aux_coef * aux
        return ForwardOutput(y_hat, loss, fvu.detach(), cols, rows.numel() / x.shape[0],
                             {"fvu": fvu.detach(), "auxk": aux.detach()})

    def decode_selected(self, rows, cols, vals, x) -> torch.Tensor:
        return self.decoder_out(ragged_decode(rows, cols, vals, self.W_dec, x.shape[0]), x)
