"""Hook-point names: `KIND.LAYER` (e.g. `resid_post.10`; SAELens' `blocks.10.hook_resid_post` is
accepted too). Parsing needs no model, so sparse coders and format adapters can name hooks
without importing the model code; `saelab.models.hooks` resolves a name against a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")


@dataclass(frozen=True, order=True)
class HookPoint:
    layer: int
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @staticmethod
    def parse(name: str) -> HookPoint:
        if m := re.fullmatch(r"(\w+?)\.(\d+)", name):
            kind, layer = m.group(1), int(m.group(2))
        elif m := re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", name):
            kind, layer = m.group(2), int(m.group(1))
        else:
            raise ValueError(f"hook point {name!r} is not of the form KIND.LAYER, e.g. 'resid_post.10'; "
                             f"kinds: {', '.join(KINDS)}")
        if kind not in KINDS:
            raise ValueError(f"unknown hook kind {kind!r} in {name!r}; kinds: {', '.join(KINDS)}")
        return HookPoint(layer, kind)

    def to_transformer_lens(self) -> str:
        """'resid_post.10' -> 'blocks.10.hook_resid_post' (the names SAELens uses)."""
        return f"blocks.{self.layer}.hook_{self.kind}"
