"""The sparse training paths of the threshold coders (relu, jumprelu, gated, panneal) against
their dense reference paths: same loss, y_hat, terms, active latents and every parameter's
gradient, on random data at a realistic sparsity, and the fallback to dense on a dense batch."""

import copy
import math

import pytest
import torch

from saelab.saes import build_sae
from saelab.saes.base import LossContext
from saelab.saes.config import SAEConfig

SPARSE_ARCHS = ["gated", "jumprelu", "panneal", "relu"]
D, M, B = 24, 192, 96


def _sae(arch: str, transcoder: bool = False, seed: int = 0, select: str = "float32"):
    cfg = SAEConfig(architecture=arch, d_in=D, d_out=D + 8 if transcoder else None, transcoder=transcoder,
                    skip=transcoder, width=M, k=4, bandwidth=0.3, threshold_init=0.5, topk_select_dtype=select)
    sae = build_sae(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():  # trained-looking weights: no parameter at its special init value
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.log(0.1 + 0.2 * torch.rand(M, generator=g)))
    return sae


def _level(s, q):
    """Per column, a level midway between two consecutive values near the q quantile, at the widest
    such gap: no entry within rounding of it (a tie would flip with the summation order, and with
    it that entry's gradient), and no active value so small that z^p's gradient (p < 1) is
    ill-conditioned."""
    sv = s.sort(dim=0).values
    k0 = int(q * (s.shape[0] - 1))
    ks = torch.arange(max(0, k0 - 3), min(s.shape[0] - 1, k0 + 4))
    gaps = sv[ks + 1] - sv[ks]  # [len(ks), m]
    k = ks[gaps.argmax(0)]
    cols = torch.arange(s.shape[1])
    return (sv[k, cols] + sv[k + 1, cols]) / 2


def _sparsify(sae, x, q=0.97):
    """Shift b_enc so that each latent is active on about 1 - q of the rows (the gate, for gated)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        s = sae.centered(x) @ sae.W_enc
        at = sae.threshold if sae.cfg.architecture == "jumprelu" else 0.0
        sae.b_enc.copy_(at - _level(s, q))
        if sae.cfg.architecture == "gated":  # some open gates with a closed magnitude path: G != active
            s_mag = s * sae.r_mag.exp()
            sae.b_mag.copy_(-_level(s_mag, q) + 0.3 * s_mag.std(0) * torch.randn(M, generator=g))


def _data(transcoder: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * 1.5 + 0.2
    y = torch.randn(B, D + 8, generator=g) if transcoder else x
    return x, y


def _ctx(y, progress=0.5):
    return LossContext((y - y.mean(0)).pow(2).sum(), y.shape[0], sparsity_scale=0.7, progress=progress)


def _run(sae, x, y, ctx):
    sae.zero_grad(set_to_none=True)
    out = sae(x, y, ctx)
    out.loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in sae.named_parameters()}
    return out, grads


def _compare(a, b, ga, gb):
    assert torch.allclose(a.loss, b.loss, rtol=1e-5, atol=1e-6), (a.loss, b.loss)
    assert torch.allclose(a.y_hat, b.y_hat, rtol=1e-5, atol=1e-5)
    assert torch.allclose(a.fvu, b.fvu, rtol=1e-5, atol=1e-6)
    assert a.l0 == b.l0
    assert torch.equal(a.active.flatten().sort().values, b.active.flatten().sort().values)
    assert a.terms.keys() == b.terms.keys()
    for k in a.terms:
        assert torch.allclose(a.terms[k], b.terms[k], rtol=1e-5, atol=1e-6), k
    assert ga.keys() == gb.keys()
    for n in ga:
        scale = gb[n].abs().max().clamp_min(1e-3)
        assert (ga[n] - gb[n]).abs().max() <= 1e-5 * scale + 1e-7, (n, (ga[n] - gb[n]).abs().max(), scale)


# bf16: the dense matmul preselects candidates; "bfloat16-blocks": in row blocks of 64 rows sorted by norm (a short
# last block of 32), each with its own margin
@pytest.mark.parametrize("select", ["float32", "bfloat16", "bfloat16-blocks"])
@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("arch", SPARSE_ARCHS)
def test_sparse_path_equals_dense_path(arch, transcoder, select, monkeypatch):
    if select == "bfloat16-blocks":
        from saelab.saes import sparse_ops

        select = "bfloat16"
        monkeypatch.setattr(sparse_ops, "ROW_BLOCK_BYTES", 64 * M * 2 + 100)
        assert sparse_ops.block_rows(M, torch.bfloat16) == 64
    x, y = _data(transcoder)
    sparse = _sae(arch, transcoder, select=select)
    _sparsify(sparse, x)
    sparse.sparse_max_density = math.inf  # always sparse
    dense = copy.deepcopy(sparse)
    dense.sparse_max_density = 0.0  # the reference
    progress = 0.95 if arch == "panneal" else 0.5  # panneal: p moves from 1 to its end, coef rescaled
    a, ga = _run(sparse, x, y, _ctx(y, progress))
    b, gb = _run(dense, x, y, _ctx(y, progress))
    assert sparse.last_path == "sparse" and dense.last_path == "dense"
    assert 0.005 < sparse.density < 0.12, sparse.density  # realistic sparsity, measured on the same entries
    assert sparse.density == pytest.approx(dense.density)
    assert 0 < a.l0 < 0.1 * M
    if arch == "jumprelu":  # the band holds entries below the threshold (gradient to theta only)
        theta = sparse.threshold
        pre = sparse.pre_acts(x)
        assert ((pre < theta) & (pre > theta - 0.15)).any()
    if arch == "gated":
        pi_gate, pi_mag = sparse.gates(x)
        assert ((pi_gate > 0) & (pi_mag <= 0)).any()  # open gates that decode nothing still train the gate
    if arch == "panneal":
        assert torch.equal(sparse.p, dense.p) and float(sparse.p) < 1
        assert torch.allclose(sparse.coef, dense.coef, rtol=1e-5)
    _compare(a, b, ga, gb)


@pytest.mark.parametrize("select", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", SPARSE_ARCHS)
def test_dense_batches_fall_back_and_sparse_ones_switch_back(arch, select):
    x, y = _data(False)
    sae = _sae(arch, select=select)  # b_enc at ~0: about half the entries active
    ref = copy.deepcopy(sae)
    ref.sparse_max_density = 0.0
    sae.density = 0.0  # as if the last batch had been sparse: this step tries the sparse path
    a, ga = _run(sae, x, y, _ctx(y))
    b, gb = _run(ref, x, y, _ctx(y))
    assert sae.last_path == "dense" and sae.density > sae.sparse_max_density  # measured, fell back
    _compare(a, b, ga, gb)
    # a sparse batch after a dense one: the dense step measures it, the next goes sparse
    _sparsify(sae, x, q=0.99)  # sparse enough that bf16's candidates stay below the threshold too
    _sparsify(ref, x, q=0.99)
    sae(x, y, _ctx(y))
    assert sae.last_path == "dense" and sae.density <= sae.sparse_max_density
    a, ga = _run(sae, x, y, _ctx(y))
    b, gb = _run(ref, x, y, _ctx(y))
    assert sae.last_path == "sparse"
    _compare(a, b, ga, gb)


def test_bf16_margin_bounds_the_bf16_matmul_error():
    from saelab.saes.sparse_ops import bf16_margin, encoder_pre

    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 576, generator=g) * 3 + 0.5
    W_t = torch.randn(1024, 576, generator=g) * 0.05
    b = torch.randn(1024, generator=g)
    exact = x.double() @ W_t.double().t() + b.double()
    approx = encoder_pre(x, W_t, b, torch.bfloat16).double()
    t = exact.quantile(0.99, dim=0).float()  # levels near which selection happens
    err = (approx - exact).abs()
    near = (exact - t.double()).abs() < 1.0
    margin = bf16_margin(x.norm(dim=1).max(), W_t.norm(dim=1), x.shape[1], b, t)
    bound = margin.double() / 2  # the undoubled bound
    assert near.any() and (err[near] <= bound.expand_as(err)[near]).all()
    # and the doubled margin selects a superset of the exact set
    assert not ((exact > t.double()) & ~(approx > (t - margin).double())).any()


def test_round_down_is_the_largest_bf16_not_above():
    """The bf16 preselection compares against levels rounded toward -inf, so its candidates stay a
    superset of the float32 ones: the result is <= v and the next bf16 up is > v."""
    from saelab.saes.sparse_ops import round_down

    v = torch.cat([torch.randn(10_000) * 10.0 ** torch.randint(-4, 4, (10_000,)), torch.tensor([0.0, 1.0, -1.0])])
    r = round_down(v, torch.bfloat16)
    assert r.dtype == torch.bfloat16 and (r.float() <= v).all()
    assert (torch.nextafter(r, torch.full_like(r, torch.inf)).float() > v).all()
