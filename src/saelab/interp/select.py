"""From the examples pass to each interpreted latent's example sets, read in one second pass.

Every context goes to one side by a hash of its index (`is_heldout`): the explanation side
(what explainers see) or the held-out side (what scorers see), so a held-out example is never
one shown to an explainer. Per latent (defaults after delphi's SamplerConfig, scaled down for
a small local scorer; docs/interp.md says where they differ):

- explain: `explain_per_band` contexts from each of `n_bands` equal-count activation quantile
  bands of the latent's explanation-side reservoir (delphi `train_type="quantiles"`);
- test: `test_per_band` per band of its held-out reservoir (delphi `test_type="quantiles"`);
- negatives: held-out random pool windows where the latent is silent (delphi
  `non_activating_source="random"`);
- hard negatives: held-out windows where one of its decoder-nearest latents fires and it is
  silent (delphi `"neighbours"` with `neighbours_type="decoder_similarity"`);
- similar negatives: held-out silent pool windows nearest in sentence-embedding space to its
  strongest explanation examples (delphi `non_activating_source="FAISS"`,
  `latents/constructors.py::faiss_non_activation_windows`: for each of the first 10 activating
  examples in turn, its nearest non-activating windows until enough are collected), disjoint
  from the random negatives;
- contrast: its neighbours' strongest explanation-side examples (for the contrastive prompt);
- SAEBench's sets (evals/autointerp/main.py, `gather_data`): generation = 10 top + 5
  importance-sampled, scoring = 2 top + 2 importance-sampled + 10 random (here: random
  non-activating) windows, top from the top heap, importance-sampled from the reservoir with
  probability proportional to activation among values below the chosen top ones.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field

from saelab.config import Config
from saelab.interp.examples import ExampleState, Window, band_sample, is_heldout


class SamplingConfig(Config):
    """How many examples of each kind every interpreted latent gets."""

    n_bands: int = Field(10, gt=0, description="equal-count activation quantile bands (delphi: 10)")
    explain_per_band: int = Field(2, gt=0, description="explanation examples per band (delphi: 40 in all, 4 per "
                                  "band)")
    test_per_band: int = Field(1, gt=0, description="held-out activating examples per band (delphi: 50 in all)")
    negatives: int = Field(10, ge=0, description="held-out random non-activating examples (delphi: 50)")
    hard_negatives: int = Field(5, ge=0, description="held-out examples where a decoder-nearest latent fires and "
                                "this one is silent")
    similar_negatives: int = Field(5, ge=0, description="held-out silent contexts nearest in sentence-embedding "
                                   "space to the latent's strongest examples (delphi's FAISS negatives)")
    neighbours: int = Field(3, ge=1, description="decoder-nearest latents used for contrast and hard negatives")
    contrast_examples: int = Field(3, ge=0, description="examples of each neighbour shown by the contrastive prompt")
    heldout_fraction: float = Field(0.5, gt=0, lt=1, description="fraction of contexts on the held-out side")
    saebench_top_gen: int = 10
    saebench_iw_gen: int = 5
    saebench_top_score: int = 2
    saebench_iw_score: int = 2
    saebench_random: int = 10


@dataclass
class LatentSet:
    """One latent's windows (each window's activations are this latent's, unless named otherwise)."""

    latent: int
    explain: list[Window]
    explain_band: list[int]
    test: list[Window]
    test_band: list[int]
    negatives: list[Window]
    hard: list[Window]  # this latent's (zero) activations on a neighbour's activating window
    hard_from: list[int]  # which neighbour fired there
    contrast: dict[int, list[Window]]  # neighbour -> its own windows with its own activations
    sb_gen: list[Window]
    sb_score: list[Window]
    sb_active: list[bool]  # which sb_score windows are activating (SAEBench's is_active)
    neighbours: list[int]
    neighbour_cos: list[float]
    top: list[Window] = field(default_factory=list)
    similar: list[Window] = field(default_factory=list)  # silent windows that read like its activating ones

    @property
    def max_act(self) -> float:
        return max([w.max_act for w in self.explain + self.test + self.sb_gen] + [1e-9])



@torch.no_grad()
def nearest_latents(W_dec: torch.Tensor, latents: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, cosines) [len(latents), n] of each latent's n nearest other latents by decoder cosine
    (the candidates for descriptive collision; rows of W_dec zeroed out, e.g. dead latents, are never nearest)."""
    norms = W_dec.float().norm(dim=1, keepdim=True)
    unit = W_dec.float() / norms.clamp_min(1e-12)
    cos = unit[latents] @ unit.t()  # [latents, width]
    cos[:, norms[:, 0] == 0] = -2.0
    cos[torch.arange(len(latents)), latents] = -2.0  # not itself
    v, i = cos.topk(n, dim=-1)
    return i, v


def sides(entries: list[tuple[float, int, int]], seed: int, fraction: float) -> tuple[list, list]:
    """(explanation side, held-out side) of (value, ctx, pos) entries, order kept."""
    ex, ho = [], []
    for e in entries:
        (ho if is_heldout(e[1], seed, fraction) else ex).append(e)
    return ex, ho


def eligible(state: ExampleState, cfg: SamplingConfig, seed: int) -> torch.Tensor:
    """Latents with enough activating contexts on both sides to fill every band."""
    need_ex, need_ho = cfg.n_bands * cfg.explain_per_band, cfg.n_bands * cfg.test_per_band
    ok = []
    for j in (state.fire_contexts >= need_ex + need_ho).nonzero().squeeze(1).tolist():
        ex, ho = sides(state.sample(j), seed, cfg.heldout_fraction)
        if len(ex) >= need_ex and len(ho) >= need_ho:
            ok.append(j)
    return torch.tensor(ok, dtype=torch.long)


def _iw(entries: list, below: float, n: int, rng: np.random.Generator) -> list:
    """n entries drawn without replacement with probability proportional to activation, among those
    with activation below `below` (SAEBench's importance-weighted sample, disjoint from its top)."""
    pool = [e for e in entries if e[0] < below]
    if not pool or n == 0:
        return []
    w = np.array([e[0] for e in pool], dtype=np.float64)
    pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False, p=w / w.sum())
    return [pool[i] for i in sorted(pick)]


@dataclass
class Plan:
    """The windows to read (latent, ctx, centre) and, per latent, which request is which."""

    requests: list[tuple[int, int, int]] = field(default_factory=list)
    slots: dict[int, dict[str, list]] = field(default_factory=dict)

    def add(self, latent: int, slot: str, lat: int, ctx: int, pos: int, extra=None) -> None:
        self.slots.setdefault(latent, {}).setdefault(slot, []).append((len(self.requests), extra))
        self.requests.append((lat, ctx, pos))


def plan(state: ExampleState, latents: list[int], neighbours: dict[int, list[int]], cfg: SamplingConfig,
         seed: int) -> Plan:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    p = Plan()
    pool_ho = [cp for cp in state.random_positions() if is_heldout(cp[0], seed, cfg.heldout_fraction)]
    for j in latents:
        ex, ho = sides(state.sample(j), seed, cfg.heldout_fraction)
        for b, (_, c, pos) in band_sample(ex, cfg.n_bands, cfg.explain_per_band, rng):
            p.add(j, "explain", j, c, pos, b)
        for b, (_, c, pos) in band_sample(ho, cfg.n_bands, cfg.test_per_band, rng):
            p.add(j, "test", j, c, pos, b)
        for c, pos in pool_ho:
            p.add(j, "pool", j, c, pos)
        top_ex, top_ho = sides(state.top(j), seed, cfg.heldout_fraction)
        for _, c, pos in top_ex[:5]:
            p.add(j, "top", j, c, pos)
        gen_top = top_ex[:cfg.saebench_top_gen]
        score_top = top_ho[:cfg.saebench_top_score]
        for _, c, pos in gen_top:
            p.add(j, "sb_gen", j, c, pos)
        for _, c, pos in _iw(ex, min([e[0] for e in gen_top], default=np.inf), cfg.saebench_iw_gen, nrng):
            p.add(j, "sb_gen", j, c, pos)
        for _, c, pos in score_top:
            p.add(j, "sb_score", j, c, pos)
        for _, c, pos in _iw(ho, min([e[0] for e in score_top], default=np.inf), cfg.saebench_iw_score, nrng):
            p.add(j, "sb_score", j, c, pos)
        for b in neighbours.get(j, []):
            bex, bho = sides(state.sample(b), seed, cfg.heldout_fraction)
            for _, c, pos in sorted(bex, key=lambda e: -e[0])[:cfg.contrast_examples]:
                p.add(j, "contrast", b, c, pos, b)
            # a few more candidates than needed: those where this latent also fires are dropped
            per = -(-2 * cfg.hard_negatives // max(len(neighbours[j]), 1))
            for _, c, pos in rng.sample(bho, min(per, len(bho))):
                p.add(j, "hard", j, c, pos, b)
    return p


def similar_windows(queries: list[Window], candidates: list[Window], n: int,
                    embed: Callable[[list[Window]], torch.Tensor]) -> list[Window]:
    """n candidates nearest (cosine of unit embeddings) to the queries, taken query by query in
    order (each query's nearest first, skipping ones already taken), as delphi's FAISS negatives."""
    if n == 0 or not queries or not candidates:
        return []
    e = embed(queries + candidates)
    sim = e[: len(queries)] @ e[len(queries):].t()  # [queries, candidates]
    taken: list[int] = []
    for row in sim:
        for c in torch.argsort(row, descending=True, stable=True)[:n].tolist():
            if c not in taken and len(taken) < n:
                taken.append(c)
        if len(taken) >= n:
            break
    return [candidates[c] for c in taken]


def assemble(p: Plan, windows: list[Window], neighbours: dict[int, list[int]], neighbour_cos: dict[int, list[float]],
             cfg: SamplingConfig, seed: int, embed: Callable[[list[Window]], torch.Tensor] | None = None
             ) -> dict[int, LatentSet]:
    """Each latent's LatentSet from the second pass's windows. embed (windows -> unit embeddings)
    is needed for the similar negatives (none without it)."""
    out = {}
    for j, slots in p.slots.items():
        rng = random.Random(seed * 1_000_003 + j)

        def get(slot, slots=slots):
            return [(windows[i], extra) for i, extra in slots.get(slot, [])]

        silent_pool = [w for w, _ in get("pool") if w.max_act == 0]
        rng.shuffle(silent_pool)
        hard = [(w, b) for w, b in get("hard") if w.max_act == 0]
        rng.shuffle(hard)
        hard = hard[:cfg.hard_negatives]
        contrast: dict[int, list[Window]] = {}
        for w, b in get("contrast"):
            contrast.setdefault(b, []).append(w)
        negatives = silent_pool[:cfg.negatives]
        # SAEBench's random windows: other silent pool windows where there are enough, else the same ones
        rest = silent_pool[cfg.negatives:]
        strongest = sorted((w for w, _ in get("explain")), key=lambda w: -w.max_act)[:10]
        similar = similar_windows(strongest, rest, cfg.similar_negatives, embed) if embed else []
        sb_random = (rest if len(rest) >= cfg.saebench_random else silent_pool)[:cfg.saebench_random]
        out[j] = LatentSet(
            latent=j, explain=[w for w, _ in get("explain")], explain_band=[b for _, b in get("explain")],
            test=[w for w, _ in get("test")], test_band=[b for _, b in get("test")], negatives=negatives,
            hard=[w for w, _ in hard], hard_from=[b for _, b in hard], contrast=contrast,
            sb_gen=[w for w, _ in get("sb_gen")],
            sb_score=[w for w, _ in get("sb_score")] + sb_random,
            sb_active=[True] * len(get("sb_score")) + [False] * len(sb_random),
            neighbours=neighbours.get(j, []), neighbour_cos=neighbour_cos.get(j, []),
            top=[w for w, _ in get("top")], similar=similar)
    return out
