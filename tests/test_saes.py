import pytest
import torch

from saelab.device import select_dtype
from saelab.saes import ARCHITECTURES, build_sae, load_sae
from saelab.saes.base import LossContext, geometric_median
from saelab.saes.config import ARCHITECTURE_NAMES, SAEConfig
from saelab.saes.matryoshka import group_bounds
from saelab.saes.panneal import p_at
from saelab.saes.sparse_ops import (
    batch_topk_encode,
    entry_decode,
    ragged_decode,
    topk_encode,
    topk_indices,
)

ARCHS = sorted(ARCHITECTURES)


def synthetic(n=2048, d=16, m_true=48, k_true=3, seed=0):
    """Sparse ground truth: each row a nonnegative mix of k_true of m_true unit directions, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m_true, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(m_true, generator=g)[:k_true] for _ in range(n)])
    coef = torch.rand(n, k_true, generator=g) * 2 + 0.5
    return (coef[:, :, None] * D[idx]).sum(1) + 0.3


def ctx_for(y, **kw):
    return LossContext((y - y.mean(0)).pow(2).sum(), y.shape[0], **kw)


def _cfg(arch, **kw):
    base = dict(architecture=arch, d_in=16, width=64, k=4, sparsity_coef={"relu": 0.05, "panneal": 0.05,
                "gated": 0.05, "jumprelu": 0.02}.get(arch))
    return SAEConfig(**{**base, **kw})


def test_registry_matches_config_names():
    assert set(ARCHITECTURES) == set(ARCHITECTURE_NAMES)
    with pytest.raises(ValueError, match="valid: relu, topk, batchtopk"):
        SAEConfig(architecture="sparse-magic")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_learns_a_sparse_code(arch):
    torch.manual_seed(0)
    x = synthetic()
    sae = build_sae(_cfg(arch), seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = None
    for step in range(300):
        b = x[(step * 256) % 2048:(step * 256) % 2048 + 256]
        out = sae(b, b, ctx_for(b, progress=step / 300))
        first = first if first is not None else out.fvu.item()
        opt.zero_grad()
        out.loss.backward()
        if sae.unit_norm_decoder:
            sae.remove_parallel_decoder_grad()
        opt.step()
        if sae.unit_norm_decoder:
            sae.set_decoder_unit_norm()
    sae.eval()
    z = sae.encode(x)
    fvu = ((x - sae.decode(z, x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    l0 = (z != 0).float().sum(1).mean().item()
    assert fvu < 0.5 * first and fvu < 0.35, (arch, first, fvu)
    assert 0.5 < l0 < 40, (arch, l0)
    assert torch.allclose(sae.reconstruct(x), sae.decode(z, x), atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_is_exact_and_fold_matches_scaled_training(arch, tmp_path):
    sae = build_sae(_cfg(arch), seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        if hasattr(sae, "threshold") and isinstance(sae.threshold, torch.Tensor) and sae.threshold.ndim == 0:
            sae.threshold.fill_(0.05)
    x = synthetic(n=64) * 7.0
    s = 0.3
    scaled_out = sae.reconstruct(x * s) / s  # what the SAE trained on x*s predicts, in raw units
    sae.fold_input_scale(s, s)
    assert torch.allclose(sae.reconstruct(x), scaled_out, rtol=1e-4, atol=1e-4), arch
    sae.save(tmp_path / "ck", {"hook": "resid_post.1"})
    loaded, meta = load_sae(tmp_path / "ck")
    assert type(loaded) is type(sae) and meta["hook"] == "resid_post.1"
    assert torch.equal(loaded.reconstruct(x), sae.eval().reconstruct(x))


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_transcoder_with_skip_learns_a_map(arch):
    torch.manual_seed(0)
    x = synthetic(d=16)
    M = torch.randn(16, 12) / 4
    y = torch.relu(x @ M) + x[:, :12] * 0.5  # a nonlinear map plus a linear part the skip can take
    cfg = _cfg(arch, transcoder=True, skip=True, d_out=12, width=96)
    sae = build_sae(cfg, seed=0)
    assert sae.W_skip.shape == (16, 12) and sae.W_enc.shape == (16, 96) and sae.W_dec.shape == (96, 12)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for step in range(300):
        b, t = x[(step * 256) % 2048:][:256], y[(step * 256) % 2048:][:256]
        out = sae(b, t, ctx_for(t, progress=step / 300))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.fvu < 0.3 and sae.W_skip.abs().sum() > 0
    # a transcoder does not subtract b_dec (it lives in the output space)
    assert torch.equal(sae.centered(x), x)


@pytest.mark.parametrize("shifted", [False, True])
def test_sparse_topk_kernel_matches_dense_autograd(shifted):
    """The sparse kernel's gradients equal dense autograd's, also with the input shifted by b_dec
    outside autograd (the shift's gradient then comes from the per-latent sums, not the input's)."""
    torch.manual_seed(0)
    x = torch.randn(300, 24)
    W = torch.randn(24, 80, requires_grad=True)
    b = torch.randn(80, requires_grad=True)
    W_dec = torch.randn(80, 24, requires_grad=True)
    b_dec = torch.randn(24, requires_grad=True)
    params = (W, b, W_dec, b_dec)
    if shifted:
        vals, idx, ent = topk_encode((x - b_dec).detach(), W, b, 6, shift=b_dec)
    else:
        vals, idx, ent = topk_encode(x - b_dec, W, b, 6)
    (entry_decode(vals.reshape(-1), W_dec, ent) + b_dec).pow(2).sum().backward()
    grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    dv, di = torch.relu((x - b_dec) @ W + b).topk(6, dim=-1, sorted=False)
    assert torch.equal(di.sort(-1).values, idx.sort(-1).values)
    dense = torch.zeros(300, 80).scatter(-1, di, dv)
    (dense @ W_dec + b_dec).pow(2).sum().backward()
    for g, t in zip(grads, params, strict=True):
        assert torch.allclose(g, t.grad, rtol=1e-4, atol=1e-6 * t.grad.abs().max())  # float32 sum order


def test_bf16_selection_recomputes_exact_values():
    torch.manual_seed(0)
    x, W, b = torch.randn(100, 32), torch.randn(32, 128), torch.randn(128)
    vals, idx, _ = topk_encode(x, W, b, 8, torch.bfloat16)
    exact = torch.relu(x @ W + b).gather(1, idx)
    assert torch.allclose(vals, exact, atol=1e-5)
    ref = torch.relu(x @ W + b).topk(8, dim=-1).indices
    overlap = sum(len(set(a.tolist()) & set(r.tolist())) for a, r in zip(idx, ref, strict=True)) / ref.numel()
    assert overlap > 0.9


def test_fused_row_blocks_select_what_the_whole_batch_selects(monkeypatch):
    """bf16 selection runs the encoder matmul and top-k in row blocks (the [B, m] pre-activations
    never written whole): the same indices as over the whole batch, also across a short last block."""
    from saelab.saes import sparse_ops

    g = torch.Generator().manual_seed(0)
    x, W_t, b = torch.randn(300, 48, generator=g), torch.randn(512, 48, generator=g), torch.randn(512, generator=g)
    whole = topk_indices(sparse_ops.encoder_pre(x, W_t, b, torch.bfloat16), 8)
    monkeypatch.setattr(sparse_ops, "ROW_BLOCK_BYTES", 64 * 512 * 2 + 100)  # blocks of 64 rows: 4 whole, 1 of 44
    idx, vals = sparse_ops.topk_blocks(x, W_t, b, 8, torch.bfloat16)
    assert vals is None and torch.equal(idx, whole)
    idx32, vals32 = sparse_ops.topk_blocks(x, W_t, b, 8, torch.float32)  # float32: in one piece, with its values
    assert torch.equal(vals32, sparse_ops.encoder_pre(x, W_t, b, torch.float32).gather(1, idx32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape_k", [((64, 4096), 8), ((50, 1000), 5), ((30, 96), 4), ((16, 2048), 64)])
def test_grouped_topk_finds_the_same_values_as_topk(dtype, shape_k):
    (B, m), k = shape_k
    g = torch.Generator().manual_seed(0)
    for pre in (torch.randn(B, m, generator=g), torch.randint(-20, 20, (B, m), generator=g).float()):  # ties
        pre = pre.to(dtype)
        idx = topk_indices(pre, k)
        assert idx.shape == (B, k) and all(len(set(r.tolist())) == k for r in idx)  # k distinct latents
        got = pre.gather(1, idx).sort(-1, descending=True).values
        assert torch.equal(got, pre.topk(k, dim=-1).values)


def test_auto_select_dtype_follows_the_cpu():
    native = torch.cpu._is_avx512_bf16_supported()
    assert select_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert select_dtype("float32") == torch.float32 and select_dtype("bfloat16") == torch.bfloat16


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [4, 10, 60])  # aux_k = all dead, dense decode, sparse decode
def test_auxk_uses_only_dead_latents_and_matches_the_dense_definition(arch, n_dead):
    torch.manual_seed(0)
    sae = build_sae(_cfg(arch, width=64, k=4, aux_k=6, topk_select_dtype="float32"), seed=0)
    x = synthetic(n=256)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    out = sae(x, x, ctx_for(x, dead_mask=dead))
    out.loss.backward()
    # reference (Gao et al. 2024): top aux_k of the dead latents' pre-activations reconstruct y - y_hat
    with torch.no_grad():
        pre = torch.relu(sae.pre_acts(x)).masked_fill(~dead, float("-inf"))
        vals, idx = pre.topk(min(6, n_dead), dim=-1)
        e_hat = torch.zeros(256, 64).scatter(-1, idx, vals) @ sae.W_dec
        ref = (e_hat - (x - out.y_hat)).pow(2).sum() / ctx_for(x).total_variance * min(n_dead / 6, 1.0)
    assert torch.allclose(out.terms["auxk"], ref, rtol=1e-5)
    assert sae.W_enc.grad[:, dead].abs().sum() > 0  # the aux gradient reaches the dead encoders
    alive = sae(x, x, ctx_for(x, dead_mask=torch.zeros(64, dtype=torch.bool)))
    assert alive.terms["auxk"] == 0


def test_batch_topk_kernel_matches_dense_autograd():
    torch.manual_seed(0)
    x = torch.randn(300, 24, requires_grad=True)  # the input gradient reaches b_dec in an SAE
    W = torch.randn(24, 80, requires_grad=True)
    b = (torch.randn(80) - 8).requires_grad_()  # many pre-activations < 0: fewer than k*B kept
    W_dec = torch.randn(80, 24, requires_grad=True)
    rows, cols, vals = batch_topk_encode(x, W, b, 6)
    assert torch.equal(rows, rows.sort().values) and (vals > 0).all()
    (ragged_decode(rows, cols, vals, W_dec, 300).pow(2).sum()).backward()
    grads = [t.grad.clone() for t in (x, W, b, W_dec)]
    for t in (x, W, b, W_dec):
        t.grad = None
    # the definition (Bussmann et al. 2024): the k*B largest ReLU'd pre-activations of the batch
    pre = torch.relu(x @ W + b)
    v, flat = pre.reshape(-1).topk(6 * 300)
    flat = flat[v > 0]
    assert torch.equal(flat.sort().values, (rows * 80 + cols).sort().values) and len(flat) < 6 * 300
    dense = torch.zeros(300 * 80).index_put((flat,), pre.reshape(-1)[flat]).view(300, 80)
    (dense @ W_dec).pow(2).sum().backward()
    for g, t in zip(grads, (x, W, b, W_dec), strict=True):
        assert torch.allclose(g, t.grad, rtol=1e-4, atol=1e-6 * t.grad.abs().max())


def test_batch_topk_shifted_input_matches_dense_autograd():
    """With x - b_dec computed outside autograd and b_dec passed as the shift (the training path),
    b_dec's gradient equals dense autograd's through the centred input."""
    torch.manual_seed(1)
    x = torch.randn(300, 24)
    W, b = torch.randn(24, 80, requires_grad=True), torch.randn(80, requires_grad=True)
    W_dec, b_dec = torch.randn(80, 24, requires_grad=True), torch.randn(24, requires_grad=True)
    params = (W, b, W_dec, b_dec)
    rows, cols, vals = batch_topk_encode((x - b_dec).detach(), W, b, 6, shift=b_dec)
    (ragged_decode(rows, cols, vals, W_dec, 300) + b_dec).pow(2).sum().backward()
    grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    pre = torch.relu((x - b_dec) @ W + b)
    flat = rows * 80 + cols
    dense = torch.zeros(300 * 80).index_put((flat,), pre.reshape(-1)[flat]).view(300, 80)
    (dense @ W_dec + b_dec).pow(2).sum().backward()
    for g, t in zip(grads, params, strict=True):
        assert torch.allclose(g, t.grad, rtol=1e-4, atol=1e-6 * t.grad.abs().max())


def test_batch_topk_bf16_selection_recomputes_exact_values():
    torch.manual_seed(0)
    x, W, b = torch.randn(100, 32), torch.randn(32, 128), torch.randn(128)
    rows, cols, vals = batch_topk_encode(x, W, b, 8, torch.bfloat16)
    pre = torch.relu(x @ W + b)
    assert torch.allclose(vals, pre[rows, cols], atol=1e-5)
    # the bf16 candidates are re-ranked in float32: the same set as float32 selection, so the
    # kept minimum (the inference threshold's input) is unbiased
    ref = set(pre.reshape(-1).topk(800).indices.tolist())
    assert ref == set((rows * 128 + cols).tolist())
    assert torch.allclose(vals.min(), pre.reshape(-1).topk(800).values.min())  # up to sum order


def test_ragged_decode():
    W = torch.eye(3)
    out = ragged_decode(torch.tensor([1, 1]), torch.tensor([1, 2]), torch.tensor([4.0, 3.0]), W, batch=3)
    assert out.tolist() == [[0, 0, 0], [0, 4, 3], [0, 0, 0]]


def test_batchtopk_threshold_gives_per_token_inference():
    sae = build_sae(_cfg("batchtopk"), seed=0)
    x = synthetic(n=512)
    with pytest.raises(RuntimeError, match="never estimated"):
        sae.encode(x)
    sae(x, x, ctx_for(x))
    assert sae.threshold > 0
    l0 = (sae.encode(x) != 0).float().sum(1).mean()
    assert 1 <= l0 <= 12  # the threshold is the smallest kept value, so per-token L0 is near k=4


def test_matryoshka_groups_and_panneal_schedule():
    assert group_bounds(64, [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2]) == [4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="empty group"):
        group_bounds(8, [0.01, 0.99])
    assert p_at(0.1, 0.5) == 1.0 and p_at(0.95, 0.5) == 0.5 and 0.5 < p_at(0.5, 0.5) < 1.0


def test_config_errors():
    with pytest.raises(ValueError, match="k .* must be smaller than width"):
        SAEConfig(width=8, k=8)
    with pytest.raises(ValueError, match="skip=True needs transcoder"):
        SAEConfig(skip=True)
    with pytest.raises(ValueError, match="sparsity_coef"):
        SAEConfig(sparsity_coef=-1)
    with pytest.raises(ValueError, match="sum to 1"):
        SAEConfig(architecture="matryoshka", group_fractions=[0.5, 0.2])


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.randn(200, 3) * 0.1, torch.full((20, 3), 100.0)])
    assert geometric_median(x).norm() < 1.0 < x.mean(0).norm()


def test_decoder_projection_removes_the_parallel_component():
    """remove_parallel_decoder_grad: g - <g_i, w_i> w_i per unit decoder row (the one-pass row dots
    agree with the plain formula; the result is orthogonal to every row)."""
    sae = build_sae(_cfg("topk"), seed=0)
    g = torch.randn_like(sae.W_dec)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_decoder_grad()
    w = sae.W_dec.data
    ref = g - (g * w).sum(1, keepdim=True) * w
    assert torch.allclose(sae.W_dec.grad, ref, atol=1e-5)
    assert (sae.W_dec.grad * w).sum(1).abs().max() < 1e-4


@pytest.mark.parametrize(("arch", "select"), [("topk", "float32"), ("batchtopk", "float32"), ("jumprelu", "float32"),
                                             ("jumprelu", "bfloat16")])
def test_plain_kernels_match_the_cpu_fused_ones(arch, select, monkeypatch):
    """The kernels a GPU runs (chunked gathers, vecdot, plain top-k; CI has no GPU) give the CPU-fused
    kernels' loss and gradients, the decoder-row projection included. (A bf16 top-k may break ties
    differently in the two; JumpReLU's bf16 preselection is exact after the float32 recheck.)"""
    from saelab.saes import sparse_ops

    x = synthetic(n=512, d=16) * 3
    got = {}
    for fused in (True, False):
        monkeypatch.setattr(sparse_ops, "fused_kernels", lambda t, f=fused: f)
        sae = build_sae(_cfg(arch, topk_select_dtype=select, threshold_init=3.0), seed=0)
        sae(x, x, ctx_for(x))  # a threshold coder measures its density on a first batch, then goes sparse
        out = sae(x, x, ctx_for(x))
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        got[fused] = [out.loss.detach()] + [p.grad for p in sae.parameters()]
        assert arch != "jumprelu" or sae.last_path == "sparse"
    for a, b in zip(got[True], got[False], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max())
