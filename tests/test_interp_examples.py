"""The examples pass: its heaps, reservoir, pool and counts equal a brute-force pass over the
dense activations of a tiny model; a killed pass resumes to the same state; windows hold the
latent's per-token activations."""

from __future__ import annotations

import random

import pytest
import torch

from saelab.activations.rows import kept_rows
from saelab.data.tokens import Positions
from saelab.hookpoints import HookPoint
from saelab.interp.examples import (
    ExamplesConfig,
    ExampleState,
    band_sample,
    collect_examples,
    context_batches,
    documents,
    first_max,
    quantile_bands,
    read_windows,
    sparse_codes,
    unit_hash,
    window_bounds,
)
from saelab.saes.base import build_sae
from saelab.saes.config import SAEConfig

HP = HookPoint(1, "resid_post")
CTX = 64


def _cfg(text, **kw):
    base = dict(text=str(text), split="train", tokens=3000, batch_size=4, n_top=5, reservoir=7, pool=9,
                checkpoint_every=2, window=16, lead=12)
    return ExamplesConfig(**{**base, **kw})


def _sae(arch="topk"):
    sae = build_sae(SAEConfig(architecture=arch, d_in=32, width=48, k=4), seed=1)
    if arch == "relu":
        with torch.no_grad():
            sae.b_enc.fill_(-0.6)  # sparse-ish: a few latents per token
    return sae.eval()


@torch.no_grad()
def brute_force(cfg, sae, loaded):
    """Dense activations of every kept token, then the same selections by plain Python."""
    entries = {}  # (latent, ctx) -> (max value, first position of it)
    tokens, pool_cands = 0, []
    fire = torch.zeros(sae.cfg.width, dtype=torch.long)
    ctx0 = 0
    for batch in context_batches(cfg, documents(cfg), loaded, Positions(), CTX):
        kept = kept_rows(loaded.model, [HP], batch, loaded.tokenizer, Positions())
        z = sae.encode(kept.rows(HP).float())
        tokens += z.shape[0]
        fire += (z > 0).sum(0)
        for r in range(z.shape[0]):
            c, p = int(kept.ctx[r]) + ctx0, int(kept.pos[r])
            pool_cands.append((c, p))
            for j in (z[r] > 0).nonzero().squeeze(1).tolist():
                v = float(z[r, j])
                if (j, c) not in entries or v > entries[(j, c)][0]:
                    entries[(j, c)] = (v, p)
        ctx0 += batch.input_ids.shape[0]
    return entries, tokens, fire, pool_cands


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_heaps_equal_a_brute_force_pass(tiny_loaded, text_jsonl, arch):
    cfg = _cfg(text_jsonl)
    sae = _sae(arch)
    state = collect_examples(cfg, sae, tiny_loaded, HP, Positions(), CTX, progress=False)
    entries, tokens, fire, pool_cands = brute_force(cfg, sae, tiny_loaded)
    assert state.complete and state.tokens == tokens == 3000
    assert torch.equal(state.fire_tokens, fire)
    for j in range(sae.cfg.width):
        mine = [(c, v, p) for (jj, c), (v, p) in entries.items() if jj == j]
        assert int(state.fire_contexts[j]) == len(mine)
        want_top = sorted(mine, key=lambda e: (-e[1], e[0]))[: cfg.n_top]
        got_top = state.top(j)
        assert [(c, p) for _, c, p in got_top] == [(c, p) for c, _, p in want_top], j
        assert [v for v, _, _ in got_top] == pytest.approx([v for _, v, _ in want_top], rel=1e-6)
        # the reservoir: the contexts with the highest hash priority, whatever the batching
        pri = {c: float(unit_hash(torch.tensor([j]), torch.tensor([c]), cfg.seed)[0]) for c, _, _ in mine}
        want_res = sorted(mine, key=lambda e: -pri[e[0]])[: cfg.reservoir]
        assert sorted((c, p) for _, c, p in state.sample(j)) == sorted((c, p) for c, _, p in want_res)
        if mine:
            assert float(state.act_max[j]) == pytest.approx(max(v for _, v, _ in mine), rel=1e-6)
    pp = {cp: float(unit_hash(torch.tensor([cp[0]]), torch.tensor([cp[1]]), cfg.seed + 0x5BD1E995)[0])
          for cp in pool_cands}
    assert sorted(state.random_positions()) == sorted(sorted(pool_cands, key=lambda cp: -pp[cp])[: cfg.pool])


def test_sample_does_not_depend_on_batching(tiny_loaded, text_jsonl):
    sae = _sae()
    a = collect_examples(_cfg(text_jsonl, batch_size=3), sae, tiny_loaded, HP, Positions(), CTX, progress=False)
    b = collect_examples(_cfg(text_jsonl, batch_size=8), sae, tiny_loaded, HP, Positions(), CTX, progress=False)
    for j in range(sae.cfg.width):
        assert sorted(x[1:] for x in a.sample(j)) == sorted(x[1:] for x in b.sample(j))
        assert [x[1:] for x in a.top(j)] == [x[1:] for x in b.top(j)]


def test_a_killed_pass_resumes_to_the_same_state(tiny_loaded, text_jsonl, tmp_path):
    cfg, sae = _cfg(text_jsonl), _sae()
    whole = collect_examples(cfg, sae, tiny_loaded, HP, Positions(), CTX, progress=False)
    path = tmp_path / "state.safetensors"
    part = collect_examples(cfg, sae, tiny_loaded, HP, Positions(), CTX, path, "fp", progress=False, stop_after=3)
    assert not part.complete and ExampleState.load(path, "fp").batches_done == 3
    assert ExampleState.load(path, "other work") is None  # a state made for other work is not resumed
    calls = []
    handle = tiny_loaded.model.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        resumed = collect_examples(cfg, sae, tiny_loaded, HP, Positions(), CTX, path, "fp", progress=False)
    finally:
        handle.remove()
    n_batches = whole.batches_done
    assert len(calls) == n_batches - 3  # the first three batches were not run again
    for k in ExampleState.TENSORS:
        assert torch.equal(getattr(resumed, k), getattr(whole, k)), k
    assert resumed.ctx_doc == whole.ctx_doc and resumed.tokens == whole.tokens
    again = collect_examples(cfg, sae, tiny_loaded, HP, Positions(), CTX, path, "fp", progress=False)
    assert again.complete and torch.equal(again.top_val, whole.top_val)  # complete: reused as is


def test_windows_hold_the_latents_activations(tiny_loaded, text_jsonl):
    cfg, sae = _cfg(text_jsonl), _sae()
    state = collect_examples(cfg, sae, tiny_loaded, HP, Positions(), CTX, progress=False)
    j = int(torch.argmax(state.fire_contexts))
    reqs = [(j, c, p) for _, c, p in state.top(j)] + [(j, c, p) for c, p in state.random_positions()[:3]]
    wins = read_windows(cfg, sae, tiny_loaded, HP, Positions(), CTX, reqs, progress=False)
    for (v, c, p), w in zip(state.top(j), wins, strict=False):
        assert (w.latent, w.ctx, w.center) == (j, c, p)
        assert len(w.ids) == len(w.acts) <= cfg.window and w.start <= p < w.start + len(w.ids)
        assert w.acts[w.offset] == pytest.approx(v, rel=1e-4)  # the maximum sits at the centre
        assert w.max_act == pytest.approx(v, rel=1e-4)
        assert w.source == "" and w.doc == state.ctx_doc[c]
        assert w.ids[0] != tiny_loaded.tokenizer.bos_token_id  # BOS (not read by the coder) is not shown


def test_helpers():
    key = torch.tensor([1, 0, 1, 1, 0, 3, 3])  # key 2 absent; key 3 has two equal maxima
    assert first_max(key, torch.tensor([3.0, 1.0, 5.0, 3.0, 2.0, 4.0, 4.0]), 4).tolist() == [4, 2, 5]
    assert window_bounds(30, 1, 64, 16, 12) == (18, 34)
    assert window_bounds(3, 1, 64, 16, 12) == (1, 17)
    assert window_bounds(62, 1, 64, 16, 12) == (48, 64)
    assert window_bounds(5, 1, 9, 16, 12) == (1, 9)
    assert [len(b) for b in quantile_bands(23, 10)] == [2] * 10
    items = list(range(100))
    picks = band_sample(items, 10, 2, random.Random(0))
    assert len(picks) == 20 and all(b * 10 <= x < b * 10 + 10 for b, x in picks)
    h = unit_hash(torch.arange(10000), 7, 0)
    assert 0 <= float(h.min()) and float(h.max()) < 1 and abs(float(h.mean()) - 0.5) < 0.02


def test_sparse_codes_match_dense_encode():
    x = torch.randn(50, 32)
    for arch in ("topk", "relu"):
        sae = _sae(arch)
        r, c, v = sparse_codes(sae, x, chunk=7)
        dense = torch.zeros(50, 48)
        dense[r, c] = v
        assert torch.allclose(dense, sae.encode(x), atol=1e-6)
