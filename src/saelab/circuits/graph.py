"""Causal feature circuits (Marks et al. 2024, "Sparse Feature Circuits"; repo
saprmarks/feature-circuits, `attribution.py`: `_pe_attrib_all_folded_sparseact`, `_pe_ig_sparseact`,
`jvp`): SAEs spliced into the model at several hooks with their error terms, node and edge
attributions on contrastive prompt pairs, and faithfulness / completeness with mean ablation.

Nodes: every latent of every spliced SAE and one error node per hook (the SAE's residual
x - x_hat), each summed over positions. With `x = decode(f) + err` at each hook the model's
output is unchanged (tested bit for bit).

- Attribution patching (AP): one clean forward and backward; a node's effect on the metric m is
  grad . (patched - clean), the gradients taken with every hook's f and err as leaves and the
  residual passed through (d out / d x = identity), so a node's gradient holds every path to m.
- Integrated gradients (IG, the paper's 10 steps): per hook, f and err interpolated from clean to
  patched, the gradient averaged over the steps, times (patched - clean); other hooks clean.
- Edges between consecutive hooks U -> D, by the same rule (the paper's `jvp`): for each
  downstream node d kept, backpropagate (dm/dd) . d to U's leaves and take . (patched - clean) at
  U. Only the model's layers between U and D carry the gradient: intermediate SAEs are not
  spliced (a stop-gradient on them).
- Faithfulness of a node set C = (m(C) - m(empty)) / (m(M) - m(empty)) with every node outside C
  mean-ablated (its mean over the clean prompts, per position); completeness = the same for
  M minus C. Aggregated over prompts as a ratio of sums, with bootstrap CIs over prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from saelab.hookpoints import HookPoint
from saelab.models.hooks import forward, replace
from saelab.saes.base import SparseCoder

ERR = -1  # the latent index of a hook's error node

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [B, T, V] -> per prompt [B]


@dataclass
class State:
    """Every node's value on a batch of prompts: per hook f [B, T, width] and err [B, T, d]."""

    f: dict[HookPoint, torch.Tensor]
    err: dict[HookPoint, torch.Tensor]


def _encode(sae: SparseCoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f [B, T, width], err [B, T, d]) of activations x [B, T, d], float32."""
    B, T, d = x.shape
    flat = x.reshape(-1, d).float()
    f = sae.encode(flat)
    return f.view(B, T, -1), (flat - sae.decode(f, flat)).view(B, T, d)


def _decode(sae: SparseCoder, f: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    B, T, _ = f.shape
    return (sae.decode(f.reshape(B * T, -1)) + err.reshape(B * T, -1)).view(B, T, -1)


@contextlib.contextmanager
def spliced(model, saes: dict[HookPoint, SparseCoder],
            edit: Callable[[HookPoint, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
            store: State | None = None, leaves: bool = False) -> Iterator[None]:
    """Within the block every forward runs with x = decode(f) + err at each hook.

    edit(hp, f, err) -> (f, err): replace node values (ablation, patching, interpolation).
    store: filled with each hook's f and err. leaves: f and err become gradient leaves and the
    residual is passed through unchanged in value (out = x + (y - y.detach())), so each leaf's
    gradient is the metric's total derivative with respect to that node."""
    def at(hp: HookPoint):
        sae = saes[hp]

        def fn(x: torch.Tensor) -> torch.Tensor:
            f, err = _encode(sae, x.detach() if leaves else x)
            if edit is not None:
                f, err = edit(hp, f, err)
            if leaves:
                f, err = f.detach().requires_grad_(True), err.detach().requires_grad_(True)
            if store is not None:
                store.f[hp], store.err[hp] = f, err
            y = _decode(sae, f, err)
            out = x + (y - y.detach()) if leaves and edit is None else y
            return out.to(x.dtype)
        return fn

    with contextlib.ExitStack() as stack:
        for hp in saes:
            stack.enter_context(replace(model, hp, at(hp)))
        yield


@torch.no_grad()
def node_values(model, saes, ids: torch.Tensor, metric: Metric) -> tuple[State, torch.Tensor]:
    """Every node's value and the metric [B] on prompts ids [B, T]."""
    s = State({}, {})
    with spliced(model, saes, store=s):
        m = metric(forward(model, ids))
    return s, m


def attribution_patching(model, saes, clean: torch.Tensor, patch: torch.Tensor, metric: Metric
                         ) -> tuple[dict[HookPoint, torch.Tensor], dict[HookPoint, torch.Tensor], torch.Tensor,
                                    torch.Tensor, State, State]:
    """AP node effects per prompt: latents {hp: [B, width]} and error nodes {hp: [B]} (summed over
    positions), the clean and patched metric [B], and both states."""
    pat, m_patch = node_values(model, saes, patch, metric)
    cl = State({}, {})
    with torch.enable_grad(), spliced(model, saes, store=cl, leaves=True):
        m_clean = metric(forward(model, clean))
        m_clean.sum().backward()
    lat = {hp: ((pat.f[hp] - cl.f[hp].detach()) * cl.f[hp].grad).sum(1) for hp in saes}
    err = {hp: ((pat.err[hp] - cl.err[hp].detach()) * cl.err[hp].grad).sum((1, 2)) for hp in saes}
    clean_state = State({hp: t.detach() for hp, t in cl.f.items()}, {hp: t.detach() for hp, t in cl.err.items()})
    return lat, err, m_clean.detach(), m_patch, clean_state, pat


def integrated_gradients(model, saes, clean_state: State, patch_state: State, clean: torch.Tensor, metric: Metric,
                         steps: int = 10) -> tuple[dict[HookPoint, torch.Tensor], dict[HookPoint, torch.Tensor]]:
    """IG node effects per prompt, as the paper's `_pe_ig_sparseact`: for each hook alone, its f and
    err at alpha = 0, 1/steps, ..., (steps-1)/steps of the way from clean to patched."""
    lat, err = {}, {}
    for hp in saes:
        g_f = torch.zeros_like(clean_state.f[hp])
        g_e = torch.zeros_like(clean_state.err[hp])
        for s in range(steps):
            alpha = s / steps
            f = ((1 - alpha) * clean_state.f[hp] + alpha * patch_state.f[hp]).requires_grad_(True)
            e = ((1 - alpha) * clean_state.err[hp] + alpha * patch_state.err[hp]).requires_grad_(True)

            def edit(h, f0, e0, f=f, e=e, hp=hp):
                return (f, e) if h == hp else (f0, e0)

            with torch.enable_grad(), spliced(model, {hp: saes[hp]}, edit=edit):
                metric(forward(model, clean)).sum().backward()
            g_f += f.grad
            g_e += e.grad
        lat[hp] = ((patch_state.f[hp] - clean_state.f[hp]) * g_f / steps).sum(1)
        err[hp] = ((patch_state.err[hp] - clean_state.err[hp]) * g_e / steps).sum((1, 2))
    return lat, err


def edges(model, saes, up: HookPoint, down: HookPoint, down_nodes: list[int], clean: torch.Tensor,
          clean_state: State, patch_state: State, metric: Metric) -> dict[tuple[int, int], float]:
    """Edge effects u -> d summed over prompts, for every upstream node u at `up` (latents and the
    error node ERR) and each downstream node d in down_nodes (latent ids or ERR) at `down`:
    (dm/d node_d) . d backpropagated through the model's layers between the hooks to up's leaves,
    times (patched - clean) at `up`."""
    # dm/d(downstream node): from an all-leaves pass restricted to the downstream hook
    g = State({}, {})
    with torch.enable_grad(), spliced(model, {down: saes[down]}, store=g, leaves=True):
        metric(forward(model, clean)).sum().backward()
    w_f, w_e = g.f[down].grad, g.err[down].grad
    out: dict[tuple[int, int], float] = {}
    d_f = patch_state.f[up] - clean_state.f[up]
    d_e = patch_state.err[up] - clean_state.err[up]
    for d in down_nodes:
        held = State({}, {})
        captured: dict[str, torch.Tensor] = {}

        def at_down(x: torch.Tensor, d=d, captured=captured) -> torch.Tensor:
            f, err = _encode(saes[down], x)  # with the gradient to up's leaves
            captured["s"] = (w_e * err).sum() if d == ERR else (w_f[..., d] * f[..., d]).sum()
            return x

        with torch.enable_grad(), spliced(model, {up: saes[up]}, store=held, leaves=True), replace(model, down, at_down):
            forward(model, clean)
            captured["s"].backward()
        out.update({(int(u), d): float(v) for u, v in enumerate((held.f[up].grad * d_f).sum((0, 1)).tolist())
                    if v != 0})
        out[(ERR, d)] = float((held.err[up].grad * d_e).sum())
    return out


@torch.no_grad()
def ablated_metric(model, saes, ids: torch.Tensor, keep: dict[HookPoint, torch.Tensor], keep_err: dict[HookPoint, bool],
                   means: State, metric: Metric) -> torch.Tensor:
    """The metric [B] with every node outside the kept set mean-ablated: keep[hp] is a bool [width]
    of latents kept at that hook, keep_err[hp] whether its error node is kept."""
    def edit(hp, f, e):
        f = torch.where(keep[hp].to(f.device), f, means.f[hp].expand_as(f))
        return f, (e if keep_err[hp] else means.err[hp].expand_as(e))

    with spliced(model, saes, edit=edit):
        return metric(forward(model, ids))


def mean_state(state: State) -> State:
    """Per position means over the prompts [1, T, ...] (the values nodes are ablated to)."""
    return State({hp: t.mean(0, keepdim=True) for hp, t in state.f.items()},
                 {hp: t.mean(0, keepdim=True) for hp, t in state.err.items()})


def faithfulness_units(m_c: torch.Tensor, m_empty: torch.Tensor, m_full: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt (numerator, denominator) of (m(C) - m(empty)) / (m(M) - m(empty)): the ratio of
    sums over prompts is the aggregated faithfulness (evals.stats.compare resamples prompts)."""
    return (m_c - m_empty).double().cpu().numpy(), (m_full - m_empty).double().cpu().numpy()
