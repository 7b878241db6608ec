"""Hook points: names -> modules per architecture; capture, patch, stop early.

A hook point is `KIND.LAYER`, e.g. `resid_post.10` (SAELens-style `blocks.10.hook_resid_post`
is accepted too). Semantics, for block L (TransformerLens names and meanings):

- `resid_pre.L`:  the block's input (the residual stream before it)
- `attn_out.L`:   the attention sublayer's contribution to the residual (after Gemma's post-attention norm)
- `resid_mid.L`:  the residual stream after attention, before the MLP (resid_pre + attn_out in
                  pre-norm blocks; BERT's post-norm attention output)
- `mlp_in.L`:     the MLP's input: the normalised residual (the output of ln2 / post_attention_layernorm)
- `mlp_out.L`:    the MLP sublayer's contribution to the residual (after Gemma's post-feedforward norm)
- `resid_post.L`: the block's output, which is `hidden_states[L + 1]` except after the last block:
                  `hidden_states[-1]` has the final norm applied (decoders), this does not.

Hooks are plain PyTorch forward hooks on the Hugging Face modules, resolved by the small
per-family table ARCHS. Capturing raises `StopForward` once every requested point is
captured, so the layers after the deepest hook never run. Patching `resid_mid` changes both
what the MLP reads and the residual the block adds the MLP's output to, as in the model.

The public patch API (steering, ablation and circuits build on it; all run with gradients):
`capture` (activations, stopped early), `replace(model, hook, fn)` and `add(model, hook, v,
mask)` (context managers changing every forward inside them), `record(model, hooks)` (a
context manager keeping the activations as graph nodes), `forward` (logits), and
`forward_from(model, hook, resid, ...)` (logits from a residual-stream activation: only the
blocks after the hook run, e.g. to re-run many edits of cached activations).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from saelab.hookpoints import KINDS, HookPoint


@dataclass(frozen=True)
class Arch:
    """Where a family keeps its blocks and sublayers (module paths)."""

    layers: str  # the block list, on the base model
    attn_out: str  # on a block: its output is the attention contribution to the residual
    mlp: tuple[str, ...]  # on a block: applied in turn they map mlp_in -> mlp_out
    mid: str  # on a block: its input is resid_mid (pre-norm: the MLP's norm) ...
    mid_is_output: bool = False  # ... or its output is (post-norm BERT: the attention block)
    parallel: str | None = None  # config flag: attention and MLP both read resid_pre (no resid_mid)
    final_norm: str | None = "norm"  # on the base model: the norm before the unembedding (None: none)


_PRE_NORM = Arch("layers", "self_attn", ("mlp",), "post_attention_layernorm")
_GEMMA2 = Arch("layers", "post_attention_layernorm", ("mlp", "post_feedforward_layernorm"),
               "pre_feedforward_layernorm")
ARCHS: dict[str, Arch] = {
    **{t: _PRE_NORM for t in ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")},
    **{t: _GEMMA2 for t in ("gemma2", "gemma3_text")},
    "gpt2": Arch("h", "attn", ("mlp",), "ln_2", final_norm="ln_f"),
    "gpt_neox": Arch("layers", "attention", ("mlp",), "post_attention_layernorm",
                     parallel="use_parallel_residual", final_norm="final_layer_norm"),
    "bert": Arch("encoder.layer", "attention.output.dense", ("intermediate", "output.dense"),
                 "attention", mid_is_output=True, final_norm=None),
}


class StopForward(Exception):
    """Raised inside a hook to end the forward pass after the deepest hook point."""


def arch_of(model: nn.Module) -> Arch:
    mtype = getattr(model.config, "model_type", "?")
    if mtype not in ARCHS:
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        where = ""
        if lists:
            name, blocks = max(lists, key=lambda nm: len(nm[1]))
            subs = [n for n, _ in blocks[0].named_modules() if n]
            where = f" Its blocks look like `{name}` ({len(blocks)} of them); a block's modules are: {subs}."
        raise NotImplementedError(
            f"no hook-point table for architecture {mtype!r} (supported: {', '.join(sorted(ARCHS))}). "
            f"Add an Arch entry to saelab.models.hooks.ARCHS naming the block list, the attention "
            f"output, the MLP modules and the MLP's norm.{where}"
        )
    return ARCHS[mtype]


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.base_model.get_submodule(arch_of(model).layers)


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
    arch = arch_of(model)
    if hp.kind == "resid_mid" and arch.parallel and getattr(model.config, arch.parallel, False):
        raise ValueError(f"hook point {hp} does not exist in {model.config.model_type}: its blocks are "
                         "parallel (attention and MLP both read resid_pre), so there is no residual "
                         "between them; use resid_pre, attn_out, mlp_in, mlp_out or resid_post")
    return hp


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last residual before the unembedding (e.g. Llama's `model.norm`)."""
    name = arch_of(model).final_norm
    if name is None:
        raise ValueError(f"{model.config.model_type} has no final norm before an unembedding (an encoder)")
    return model.base_model.get_submodule(name)


def mlp_fn(model: nn.Module, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The block's real MLP as a function mlp_in -> mlp_out ([..., d] -> [..., d])."""
    block = _blocks(model)[layer]
    mods = [block.get_submodule(p) for p in arch_of(model).mlp]

    def f(x: torch.Tensor) -> torch.Tensor:
        for m in mods:
            x = _first(m(x))
        return x
    return f


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _on_input(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Forward pre-hook calling fn(first input) and substituting its result if not None."""
    def pre(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        new = fn(x)
        if new is None:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}
    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _on_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Forward hook calling fn(first output) and substituting its result if not None."""
    def post(mod, args, output):
        new = fn(_first(output))
        return None if new is None else _replace_first(output, new)
    return module.register_forward_hook(post)


@contextlib.contextmanager
def _hook(model: nn.Module, hp: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Register `fn(activation) -> replacement or None` at a hook point for the context."""
    arch = arch_of(model)
    block = _blocks(model)[hp.layer]
    handles = []
    if hp.kind == "resid_pre":
        handles.append(_on_input(block, fn))
    elif hp.kind == "resid_post":
        handles.append(_on_output(block, fn))
    elif hp.kind == "attn_out":
        handles.append(_on_output(block.get_submodule(arch.attn_out), fn))
    elif hp.kind == "mlp_in":
        handles.append(_on_input(block.get_submodule(arch.mlp[0]), fn))
    elif hp.kind == "mlp_out":
        handles.append(_on_output(block.get_submodule(arch.mlp[-1]), fn))
    elif arch.mid_is_output:  # resid_mid of a post-norm block
        handles.append(_on_output(block.get_submodule(arch.mid), fn))
    else:  # resid_mid of a pre-norm block: the MLP norm's input, and the residual the block keeps
        delta: list[torch.Tensor] = []

        def at_norm(x):
            new = fn(x)
            if new is not None:
                delta.append(new - x)
            return new

        def at_block_out(y):  # block output = resid_mid + mlp_out: move it by what the patch moved
            return y + delta.pop() if delta else None

        handles.append(_on_input(block.get_submodule(arch.mid), at_norm))
        handles.append(_on_output(block, at_block_out))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, logits: bool):
    if logits:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state  # encoders without a head
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


# --- the public patch API: capture, replace, add, record; each also runs with gradients -------------


def forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [batch, seq, vocab] (encoders: the last hidden state), with whatever patches are active.
    Gradients follow the ambient mode: call under torch.enable_grad() to differentiate."""
    return _forward(model, input_ids, attention_mask, logits=True)


@contextlib.contextmanager
def replace(model: nn.Module, hook: str | HookPoint,
            fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[HookPoint]:
    """Within the block, the activation at `hook` ([batch, seq, d]) is replaced by fn(activation)
    in every forward pass. Nothing is detached, so gradients flow through fn and the model."""
    hp = resolve(model, hook)
    with _hook(model, hp, fn):
        yield hp


@contextlib.contextmanager
def add(model: nn.Module, hook: str | HookPoint, vector: torch.Tensor,
        mask: torch.Tensor | None = None) -> Iterator[HookPoint]:
    """Within the block, `vector` ([d], or [batch, seq, d]) is added to the activation at `hook`,
    at every position or where mask [batch, seq] is True (steering). Differentiable in vector."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        v = vector.to(device=x.device, dtype=x.dtype)
        if mask is None:
            return x + v
        return x + v * mask.to(x.device)[..., None].to(x.dtype)
    with replace(model, hook, fn) as hp:
        yield hp


@contextlib.contextmanager
def record(model: nn.Module, hooks: list[str | HookPoint]) -> Iterator[dict[HookPoint, torch.Tensor]]:
    """Within the block, the dict it yields holds the latest activation [batch, seq, d] at each hook,
    not detached: with gradients on, they are nodes of the graph (e.g. for attribution). Hooks run
    in the order they were entered: a `replace`/`add` entered before `record` is seen by it."""
    hps = [resolve(model, h) for h in hooks]
    out: dict[HookPoint, torch.Tensor] = {}

    def grab(hp):
        def fn(x):
            out[hp] = x
        return fn

    with contextlib.ExitStack() as stack:
        for hp in hps:
            stack.enter_context(_hook(model, hp, grab(hp)))
        yield out


def capture(
    model: nn.Module,
    hooks: list[HookPoint],
    input_ids: torch.Tensor,  # [batch, seq]
    attention_mask: torch.Tensor | None = None,  # [batch, seq]
    grad: bool = False,
) -> dict[HookPoint, torch.Tensor]:
    """Activations [batch, seq, d] at each hook point, in one pass that stops after the deepest.
    grad=False (default): detached, no graph; grad=True: differentiable (w.r.t. the model's inputs
    embeddings and weights up to the hook)."""
    hooks = [resolve(model, h) for h in hooks]
    out: dict[HookPoint, torch.Tensor] = {}

    def grab(hp):
        def fn(x):
            out[hp] = x if grad else x.detach()
            if len(out) == len(hooks):
                raise StopForward
        return fn

    with torch.set_grad_enabled(grad), contextlib.ExitStack() as stack:
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


class _Skip(nn.Module):
    """Stands in for a block that need not run: passes its input through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def _skipping(model: nn.Module, n: int) -> Iterator[None]:
    """The first n blocks replaced by pass-throughs (indices kept, so per-layer tables still line up)."""
    blocks = _blocks(model)
    saved = [blocks[i] for i in range(n)]
    try:
        for i in range(n):
            blocks[i] = _Skip()
        yield
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """The last residual after the final norm [batch, seq, d] (what the unembedding reads), with
    whatever patches are active: the logits without their [batch, seq, vocab] tensor."""
    return _forward(model, input_ids, attention_mask, logits=False).last_hidden_state


def unembed(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Logits [..., vocab] from final hidden states h [..., d], as the model's head makes them
    (Gemma-2's final logit soft-capping included). `unembed(final_hidden(...))` equals `forward`
    for every family in ARCHS (tests/test_hooks.py)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{model.config.model_type} has no LM head to unembed with (an encoder)")
    logits = head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def forward_from(model: nn.Module, hook: str | HookPoint, resid: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the model given the residual stream `resid` [batch, seq, d] at
    `hook` (resid_pre.L or resid_post.L): the blocks before the hook do not run (they are replaced
    by pass-throughs and `resid` is put where their output would be), the rest run as usual, with
    any patches active. input_ids and attention_mask still set the positions and the masks (the
    token embedding is computed and discarded). Equals `forward` when `resid` is the clean
    activation (tests/test_hooks.py). hidden=True: the final hidden states [batch, seq, d] instead
    (see `final_hidden`). Gradients follow the ambient mode."""
    hp = resolve(model, hook)
    if hp.kind not in ("resid_pre", "resid_post"):
        raise ValueError(f"forward_from needs a residual-stream hook (resid_pre.L or resid_post.L), not {hp}: "
                         "other hook points are not a block's input; patch them with `replace` and a full pass")
    if arch_of(model).final_norm is None:
        raise ValueError(f"forward_from runs decoders with an LM head; {model.config.model_type} has none")
    with _skipping(model, hp.layer + (hp.kind == "resid_post")), _hook(model, hp, lambda x: resid.to(x.dtype)):
        return (final_hidden if hidden else forward)(model, input_ids, attention_mask)


@torch.no_grad()
def run_with_patch(
    model: nn.Module,
    hook: HookPoint,
    fn: Callable[[torch.Tensor], torch.Tensor] | None,
    input_ids: torch.Tensor,  # [batch, seq]
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [batch, seq, vocab] with the activation at `hook` replaced by fn(activation), no
    gradients (evals). Models without an LM head (encoders) return their last hidden state."""
    if fn is None:
        return forward(model, input_ids, attention_mask)
    with replace(model, hook, fn):
        return forward(model, input_ids, attention_mask)


def prefix_point(hp: HookPoint) -> HookPoint:
    """The residual-stream point a pass patched at hp can start from (`hidden_patched_from`): hp
    itself for resid_pre / resid_post, else the input of hp's block."""
    return hp if hp.kind in ("resid_pre", "resid_post") else HookPoint(hp.layer, "resid_pre")


@torch.no_grad()
def hidden_patched_from(model: nn.Module, hp: HookPoint, prefix: torch.Tensor,
                        fn: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states [batch, seq, d] with the activation at hp replaced by fn(activation),
    computed from `prefix` [batch, seq, d], the clean activation at prefix_point(hp): the blocks
    below it do not run. Several patches of one batch thus share one run of the lower layers
    (the core eval's spliced and ablated passes). Equals `final_hidden` under `replace(model, hp,
    fn)` (tests/test_hooks.py)."""
    base = prefix_point(hp)
    if base == hp:
        return forward_from(model, hp, fn(prefix), input_ids, attention_mask, hidden=True)
    with replace(model, hp, fn):
        return forward_from(model, base, prefix, input_ids, attention_mask, hidden=True)


@torch.no_grad()
def position_only_hidden(model: nn.Module, hp: HookPoint, value: torch.Tensor, seq: int,
                         first: torch.Tensor | None = None, first_id: int = 0) -> torch.Tensor:
    """Final hidden states [seq, d] of one context whose residual at hp (resid_pre / resid_post) is
    `value` [d] at every position, except `first` [d] at position 0 if given (a first token left
    clean, as the core eval's ablations leave BOS). A decoder's tokens enter below hp and position
    t sees only positions <= t, so any context whose residual at hp is set so along its first t + 1
    positions ends position t in the state computed here, whatever its tokens: one context stands
    for every row of an ablation. Models whose tokens also enter above hp exist (per-layer token
    embeddings), so a caller checks it against a full pass (saelab.evals.core.AblatedCE does). The
    token ids run are all `first_id` (their embedding is discarded)."""
    resid = value.reshape(1, 1, -1).expand(1, seq, -1).clone()  # [1, seq, d]
    if first is not None:
        resid[0, 0] = first.to(resid.dtype)
    ids = torch.full((1, seq), first_id, dtype=torch.long, device=value.device)
    return forward_from(model, hp, resid, ids, None, hidden=True)[0]
