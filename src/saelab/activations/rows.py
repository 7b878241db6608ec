"""Capture -> keep -> select rows: the one path from a batch of contexts to the activation
rows a coder reads. Harvest, on-the-fly training, the core eval, probing and the controls all
call `kept_rows`, so a coder is always evaluated on the positions it was trained on (BOS,
padding, special tokens and the user's `exclude_tokens` dropped exactly as at harvest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from saelab.data.tokens import Batch, Positions, keep_mask
from saelab.hookpoints import HookPoint
from saelab.models.hooks import capture


@dataclass
class Kept:
    full: dict[HookPoint, torch.Tensor]  # [batch, seq, d] per hook point, every position
    keep: torch.Tensor  # [batch, seq] bool: the positions the coder reads
    counts: dict[str, int]  # dropped positions by reason: pad, bos, special, listed
    ctx: torch.Tensor  # [rows] context (batch row) of each kept position
    pos: torch.Tensor  # [rows] position within its context

    def rows(self, hp: HookPoint) -> torch.Tensor:
        """Kept activations [rows, d] at one hook point, in (context, position) order."""
        return self.full[hp][self.ctx, self.pos]


def kept_rows(model: nn.Module, hooks: list[HookPoint], batch: Batch, tokenizer: PreTrainedTokenizerBase,
              positions: Positions) -> Kept:
    """One forward pass (stopped after the deepest hook) and the positions `positions` keeps."""
    full = capture(model, hooks, batch.input_ids.to(_device(model)), batch.attention_mask.to(_device(model)))
    keep, counts = keep_mask(batch, tokenizer, positions)
    keep = keep.to(next(iter(full.values())).device)
    ctx, pos = keep.nonzero(as_tuple=True)
    return Kept(full, keep, counts, ctx, pos)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
