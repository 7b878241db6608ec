import pytest
import torch

from saelab.config import SAEConfig
from saelab.saes import TopKSAE, build_sae, load_sae
from saelab.saes.base import geometric_median
from saelab.saes.topk import sparse_decode


def _sae(d=16, width=64, k=4, **kw):
    return build_sae(SAEConfig(d_in=d, width=width, k=k, **kw), seed=0)


def test_exactly_k_active_and_decode_paths_agree():
    sae = _sae()
    x = torch.randn(50, 16)
    z = sae.encode(x)
    assert ((z != 0).sum(-1) <= 4).all() and (z >= 0).all()
    assert torch.allclose(sae.decode(z), sae.reconstruct(x), atol=1e-5)
    vals, idx, _ = sae.topk(x)
    dense = torch.zeros(50, 64).scatter_(-1, idx, vals)
    assert torch.allclose(sparse_decode(vals, idx, sae.W_dec), dense @ sae.W_dec, atol=1e-5)


def test_b_dec_is_subtracted_before_encoding():
    sae = _sae()
    x = torch.randn(8, 16)
    with torch.no_grad():
        sae.b_dec.add_(3.0)
    assert torch.allclose(sae.pre_acts(x), torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc))
    assert not torch.allclose(sae.pre_acts(x), torch.relu(x @ sae.W_enc + sae.b_enc))


def test_init_unit_decoder_and_tied_encoder():
    sae = _sae()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_auxk_sends_gradient_to_dead_latents_only():
    sae = _sae()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    out = sae(x, dead_mask=dead)
    assert out.aux_loss > 0
    sae.zero_grad()
    sae(x, dead_mask=dead).loss.backward()
    with_aux = sae.W_enc.grad[:, :10].abs().sum()
    sae.zero_grad()
    sae(x, dead_mask=None).loss.backward()
    active = set(sae.topk(x)[1].flatten().tolist())
    without_aux = sae.W_enc.grad[:, [i for i in range(10) if i not in active]].abs().sum()
    assert with_aux > 0 and without_aux == 0


def test_parallel_grad_removed_and_norm_restored():
    sae = _sae()
    sae(torch.randn(32, 16)).loss.backward()
    sae.remove_parallel_decoder_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(64), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(2.5)
    sae.set_decoder_unit_norm()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


def test_save_load_round_trip_is_exact(tmp_path):
    sae = _sae()
    with torch.no_grad():
        sae.b_dec.normal_()
    sae.save(tmp_path / "ck", {"hook": "resid_post.1", "model": "m"})
    loaded, meta = load_sae(tmp_path / "ck")
    assert isinstance(loaded, TopKSAE) and meta["hook"] == "resid_post.1"
    x = torch.randn(20, 16)
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        load_sae(tmp_path)


def test_unknown_architecture():
    with pytest.raises(ValueError):
        SAEConfig(d_in=4, architecture="nope")


def test_geometric_median_resists_outliers():
    x = torch.cat([torch.randn(200, 3) * 0.1, torch.full((20, 3), 100.0)])
    gm = geometric_median(x)
    assert gm.norm() < 1.0 < x.mean(0).norm()
