"""Hook points: names -> modules per architecture; capture, patch, stop early.

A hook point is `KIND.LAYER`, e.g. `resid_post.10` (SAELens-style `blocks.10.hook_resid_post`
is accepted too). Semantics, for decoder block L:

- `resid_pre.L`:  the block's input (the residual stream before it)
- `attn_out.L`:   the attention sublayer's output, before it is added to the residual
- `mlp_out.L`:    the MLP sublayer's output, before it is added to the residual
- `resid_post.L`: the block's output. Not `hidden_states[-1]`, which has the final norm.

Hooks are plain PyTorch forward hooks on the Hugging Face modules. Capturing raises
`StopForward` once every requested point is captured, so the layers after the deepest
hook never run.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")


@dataclass(frozen=True)
class Arch:
    """Where a family keeps its blocks and sublayers (attribute paths)."""

    layers: str  # on the base model
    attn: str  # on a block
    mlp: str  # on a block


# Families whose blocks are pre-norm `x + attn(norm(x))`, `x + mlp(norm(x))` with these names.
ARCHS: dict[str, Arch] = {
    t: Arch("layers", "self_attn", "mlp") for t in ("llama", "mistral", "qwen2", "qwen3")
}


@dataclass(frozen=True, order=True)
class HookPoint:
    layer: int
    kind: str

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @staticmethod
    def parse(name: str) -> HookPoint:
        m = re.fullmatch(r"(\w+?)\.(\d+)", name) or None
        if m:
            kind, layer = m.group(1), int(m.group(2))
        elif m2 := re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", name):
            kind, layer = m2.group(2), int(m2.group(1))
        else:
            raise ValueError(f"hook point {name!r} is not of the form KIND.LAYER, e.g. 'resid_post.10'; "
                             f"kinds: {', '.join(KINDS)}")
        if kind not in KINDS:
            raise ValueError(f"unknown hook kind {kind!r} in {name!r}; kinds: {', '.join(KINDS)}")
        return HookPoint(layer, kind)


class StopForward(Exception):
    """Raised inside a hook to end the forward pass after the deepest hook point."""


def arch_of(model: nn.Module) -> Arch:
    mtype = getattr(model.config, "model_type", "?")
    if mtype not in ARCHS:
        base = getattr(model, "base_model", model)
        names = [n for n, _ in base.named_children()]
        raise NotImplementedError(
            f"no hook-point table for architecture {mtype!r} (supported: {', '.join(sorted(ARCHS))}). "
            f"Add an entry to saelab.models.hooks.ARCHS mapping the blocks, attention and MLP "
            f"modules; the base model's children are: {names}"
        )
    return ARCHS[mtype]


def n_layers(model: nn.Module) -> int:
    return len(_blocks(model))


def valid_hook_points(model: nn.Module) -> list[str]:
    return [f"{k}.{i}" for i in range(n_layers(model)) for k in KINDS]


def resolve(model: nn.Module, hook: str | HookPoint) -> HookPoint:
    """Parse and check a hook point against the model; errors list the valid ones."""
    hp = hook if isinstance(hook, HookPoint) else HookPoint.parse(hook)
    n = n_layers(model)
    if not 0 <= hp.layer < n:
        raise ValueError(
            f"hook point {hp} is out of range: the model has {n} layers (0..{n - 1}). "
            f"Valid hook points: {KINDS[0]}.0 .. {KINDS[-1]}.{n - 1}, kinds {', '.join(KINDS)}"
        )
    return hp


def _blocks(model: nn.Module) -> nn.ModuleList:
    arch = arch_of(model)
    return getattr(model.base_model, arch.layers)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


@contextlib.contextmanager
def _hook(model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Register `fn(activation) -> replacement or None` at a hook point for the context."""
    arch = arch_of(model)
    block = _blocks(model)[hp.layer]
    if hp.kind == "resid_pre":

        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            new = fn(x)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        module = {"attn_out": getattr(block, arch.attn), "mlp_out": getattr(block, arch.mlp),
                  "resid_post": block}[hp.kind]

        def post(module, args, output):
            new = fn(_first(output))
            return None if new is None else _replace_first(output, new)

        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def _forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, logits: bool):
    if logits:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


@torch.no_grad()
def capture(
    model: nn.Module,
    hooks: list[HookPoint],
    input_ids: torch.Tensor,  # [batch, seq]
    attention_mask: torch.Tensor | None = None,  # [batch, seq]
) -> dict[HookPoint, torch.Tensor]:
    """Activations [batch, seq, d] at each hook point; stops after the deepest one."""
    hooks = [resolve(model, h) for h in hooks]
    out: dict[HookPoint, torch.Tensor] = {}

    def grab(hp):
        def fn(x):
            out[hp] = x.detach()
            if len(out) == len(hooks):
                raise StopForward
        return fn

    with contextlib.ExitStack() as stack:
        for hp in hooks:
            stack.enter_context(_hook(model, hp, grab(hp)))
        try:
            _forward(model, input_ids, attention_mask, logits=False)
        except StopForward:
            pass
    missing = [str(h) for h in hooks if h not in out]
    if missing:
        raise RuntimeError(f"hook points {missing} never fired; the architecture table may be wrong")
    return out


@torch.no_grad()
def run_with_patch(
    model: nn.Module,
    hook: HookPoint,
    fn: Callable[[torch.Tensor], torch.Tensor] | None,
    input_ids: torch.Tensor,  # [batch, seq]
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [batch, seq, vocab] with the activation at `hook` replaced by fn(activation)."""
    if fn is None:
        return _forward(model, input_ids, attention_mask, logits=True)
    with _hook(model, resolve(model, hook), fn):
        return _forward(model, input_ids, attention_mask, logits=True)
