"""Format adapters without the peer libraries: exact round trips saelab -> X -> saelab for
every architecture a format can hold, the published encode formulas of Gemma Scope and
dictionary_learning, refusals, multi-layer sparsify folders, and the convert / inspect CLI.
(The checks against the real SAELens and sparsify are in test_formats_interop.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from saelab.cli import app
from saelab.saes import ARCHITECTURES, build_sae
from saelab.saes.config import SAEConfig
from saelab.saes.formats import FORMATS, convert, describe, detect, load, save
from saelab.saes.formats.base import weights
from saelab.saes.formats.verify import compare_codes, row_jaccard

D, W, K = 24, 80, 6
META = {"hook": "resid_post.3", "hook_out": None, "model": "tiny"}
runner = CliRunner()


def random_coder(arch: str, transcoder: bool = False, seed: int = 0):
    """A coder with every parameter random (biases, thresholds, skip) so no mapping hides behind zeros."""
    d_out = D + 8 if transcoder and arch != "topk" else None  # sparsify transcoders keep d_out == d_in
    cfg = SAEConfig(architecture=arch, d_in=D, d_out=d_out, width=W, k=K, transcoder=transcoder, skip=transcoder)
    sae = build_sae(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name != "W_enc" and name != "W_dec":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.rand(W, generator=g) - 1.5)
        if arch in ("batchtopk", "matryoshka"):
            sae.threshold.fill_(0.25)
    return sae.eval()


def inputs(sae, n=256, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sae.cfg.d_in, generator=g) * 1.5
    return x if sae.cfg.transcoder else x + sae.b_dec.detach()


def exportable(arch: str, transcoder: bool) -> list[str]:
    """Which formats can hold this coder (the others must refuse)."""
    out = ["saelab"]
    if not (transcoder and arch in ("topk", "gated")):
        out.append("saelens")
    if arch == "topk":
        out.append("sparsify")
    if not transcoder:
        out.append("dictionary_learning")
    if arch in ("jumprelu", "batchtopk", "matryoshka"):
        out.append("gemma_scope")
    return out


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("transcoder", [False, True], ids=["sae", "transcoder"])
def test_round_trip_every_format(arch, transcoder, tmp_path):
    sae = random_coder(arch, transcoder)
    x = inputs(sae)
    z, y = sae.encode(x), sae.reconstruct(x)
    ok = exportable(arch, transcoder)
    for fmt in FORMATS:
        dst = tmp_path / fmt
        if fmt not in ok:
            with pytest.raises(ValueError, match=f"cannot export a saelab {arch}"):
                save(sae, META, dst, fmt)
            continue
        save(sae, META, dst, fmt)
        assert detect(dst) == fmt
        back, meta = load(dst)
        assert meta["format"] == fmt
        w0, w1 = weights(sae), weights(back)
        # b_enc goes through b_dec @ W_enc where the target encodes raw x (Gemma Scope, dictionary_learning JumpReLU)
        folded = fmt == "gemma_scope" and not transcoder or (fmt == "dictionary_learning" and arch == "jumprelu")
        if fmt == "gemma_scope":  # JumpReLU only: batchtopk/matryoshka come back as per-latent JumpReLU
            assert back.cfg.architecture == "jumprelu"
        else:
            assert back.cfg == sae.cfg, fmt
            assert w0.keys() == w1.keys()
        for name in w0.keys() & w1.keys():
            if name == "log_threshold":  # exp() (the threshold encode uses) is bit-identical
                assert torch.equal(w0[name].exp(), w1[name].exp()), (fmt, name)
            elif name == "b_enc" and folded:
                torch.testing.assert_close(w1[name], w0[name], rtol=0, atol=1e-6)
            else:
                assert torch.equal(w0[name], w1[name]), (fmt, name)
        if fmt != "gemma_scope":
            assert meta["hook"] == "resid_post.3", fmt
        r = compare_codes(back.encode(x), z, back.reconstruct(x), y)
        assert r["passed"] and r["l0_mean"] > 0, (fmt, r)
        if not folded and fmt != "gemma_scope":
            assert torch.equal(back.encode(x), z), fmt


def test_gemma_scope_npz_follows_the_published_encode(tmp_path):
    """Gemma Scope: pre = x W_enc + b_enc (x not centred), z = ReLU(pre) * (pre > threshold)."""
    g = torch.Generator().manual_seed(3)
    p = {"W_enc": torch.randn(D, W, generator=g), "W_dec": torch.randn(W, D, generator=g),
         "b_enc": torch.randn(W, generator=g), "b_dec": torch.randn(D, generator=g) * 2,
         "threshold": torch.rand(W, generator=g) + 0.5}
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    sae, meta = load(tmp_path)
    assert meta["format"] == "gemma_scope" and sae.cfg.architecture == "jumprelu" and not sae.cfg.transcoder
    assert 0 <= meta["threshold_rel_err"] <= 3e-7  # exp(log_threshold) cannot hit every float32
    x = torch.randn(300, D, generator=g) * 3
    pre = x @ p["W_enc"] + p["b_enc"]
    z_ref = torch.relu(pre) * (pre > p["threshold"])
    r = compare_codes(sae.encode(x), z_ref, sae.reconstruct(x), z_ref @ p["W_dec"] + p["b_dec"])
    assert r["passed"] and r["l0_mean"] > 1, r


def _dl_reference(sd: dict, cls: str, x: torch.Tensor) -> torch.Tensor:
    """dictionary_learning's encode, transcribed from its source (commit 60ec6bf)."""
    relu = torch.relu
    if cls == "AutoEncoder":
        return relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
    if cls == "AutoEncoderTopK":
        post = relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
        v, i = post.topk(int(sd["k"]), dim=-1)
        return torch.zeros_like(post).scatter_(-1, i, v)
    if cls == "JumpReluAutoEncoder":
        pre = x @ sd["W_enc"] + sd["b_enc"]
        return relu(pre * (pre > sd["threshold"]))
    if cls == "GatedAutoEncoder":
        x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].T
        return (x_enc + sd["gate_bias"] > 0) * relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
    raise AssertionError(cls)


@pytest.mark.parametrize("cls,arch", [("AutoEncoder", "relu"), ("AutoEncoderTopK", "topk"),
                                      ("JumpReluAutoEncoder", "jumprelu"), ("GatedAutoEncoder", "gated")])
def test_dictionary_learning_matches_its_encode(cls, arch, tmp_path):
    """Written by saelab, read back as dictionary_learning would: the transcribed encode agrees."""
    sae = random_coder(arch)
    save(sae, META, tmp_path, "dictionary_learning")
    sd = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert json.loads((tmp_path / "config.json").read_text())["trainer"]["dict_class"] == cls
    x = inputs(sae)
    z_ref = _dl_reference(sd, cls, x)
    r = compare_codes(sae.encode(x), z_ref, sae.reconstruct(x), sae.decode(z_ref))
    assert r["passed"] and r["l0_mean"] > 0, r


def test_the_check_fails_when_b_dec_is_not_subtracted():
    """The comparison itself can fail: the adapter bug from the field (sparsify -> SAELens with
    apply_b_dec_to_input=False) changes many active latents (how many depends on the init)."""
    sae = random_coder("topk")
    x = inputs(sae)
    wrong = torch.relu(x @ sae.W_enc + sae.b_enc).detach()  # b_dec not subtracted
    v, i = wrong.topk(K, dim=-1)
    z_wrong = torch.zeros_like(wrong).scatter_(-1, i, v)
    r = compare_codes(z_wrong, sae.encode(x), sae.decode(z_wrong), sae.reconstruct(x))
    assert not r["passed"] and r["jaccard_mean"] < 0.9 and r["rows_differing"] > 100
    assert row_jaccard(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.0]])).item() == 0.0


def test_saelens_config_fields_are_honoured_or_refused(tmp_path):
    sae = random_coder("jumprelu")
    save(sae, META, tmp_path, "saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    # apply_b_dec_to_input=False: folded into b_enc, so the file's encode (x W + b_enc) is reproduced
    sd = load_file(tmp_path / "sae_weights.safetensors")
    x = inputs(sae)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    raw_x, _ = load(tmp_path)
    pre = x @ sd["W_enc"] + sd["b_enc"]
    z_ref = torch.relu(pre) * (pre > sd["threshold"])
    r = compare_codes(raw_x.encode(x), z_ref, raw_x.decode(z_ref), z_ref @ sd["W_dec"] + sd["b_dec"])
    assert r["passed"], r
    for field, value in [("normalize_activations", "layer_norm"), ("normalize_activations", "expected_average_only_in"),
                         ("architecture", "matching_pursuit")]:
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(ValueError, match=f"'{field}' = '{value}' cannot be honoured"):
            load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file({**sd, "threshold": -sd["threshold"]}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="'threshold' has .* negative"):
        load(tmp_path)


def test_saelens_topk_decoder_norm_rescaling_is_folded(tmp_path):
    sae = random_coder("topk")
    save(sae, META, tmp_path, "saelens")
    sd = load_file(tmp_path / "sae_weights.safetensors")
    scale = torch.rand(W, generator=torch.Generator().manual_seed(5)) + 0.5  # un-normalise the decoder: rescale_acts_by_decoder_norm=True keeps the function
    save_file({**sd, "W_dec": sd["W_dec"] * scale[:, None]}, tmp_path / "sae_weights.safetensors")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "rescale_acts_by_decoder_norm": True}))
    back, _ = load(tmp_path)
    x = inputs(sae)
    # SAELens: pre_i * ||W_dec_i|| then top-k; decode with W_dec_i / ||W_dec_i|| (unit rows here)
    pre = ((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]) * scale
    v, i = torch.relu(pre).topk(K, dim=-1)
    z_ref = torch.zeros_like(pre).scatter_(-1, i, v)
    r = compare_codes(back.encode(x), z_ref, back.reconstruct(x), z_ref @ sd["W_dec"] + sd["b_dec"])
    assert r["passed"], r


def test_sparsify_refusals_and_multi_layer_folders(tmp_path):
    sae = random_coder("topk")
    root = tmp_path / "sparsify"
    for layer in (2, 10):
        save(sae, {**META, "hook": f"resid_post.{layer}"}, root / f"layers.{layer}", "sparsify")
    assert detect(root) == "sparsify"
    with pytest.raises(ValueError, match=r"several sparsify coders \(layers.2, layers.10\)"):
        load(root)
    pairs = convert(root, tmp_path / "sl", "sae_lens")
    assert [d.name for _, d in pairs] == ["layers.2", "layers.10"]
    back, meta = load(tmp_path / "sl" / "layers.10")
    assert meta["hook"] == "resid_post.10" and torch.equal(weights(back)["W_enc"], weights(sae)["W_enc"])
    cfg_path = root / "layers.2" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "k": K + 1}))  # the file wins over a stale saelab.json
    assert load(root / "layers.2")[0].cfg.k == K + 1
    (root / "layers.2" / "saelab.json").unlink()  # as sparsify itself writes it: the hook comes from the folder name
    assert load(root / "layers.2")[1]["hook"] == "resid_post.2"
    cfg_path.write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(ValueError, match="'activation' = 'groupmax' cannot be honoured"):
        load(root / "layers.2")


def test_unknown_folder_lists_what_each_format_expects(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert "in no known SAE format" in msg and "weights.bin" in msg
    for expected in ("sae_weights.safetensors", "ae.pt", "params.npz", "sae.safetensors"):
        assert expected in msg


def test_dictionary_learning_class_mismatch_is_refused(tmp_path):
    save(random_coder("topk"), META, tmp_path, "dictionary_learning")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "GatedAutoEncoder"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'trainer.dict_class' = 'GatedAutoEncoder'.*AutoEncoderTopK"):
        load(tmp_path)


def test_convert_and_inspect_cli(tmp_path):
    sae = random_coder("jumprelu")
    save(sae, META, tmp_path / "native", "saelab")
    r = runner.invoke(app, ["convert", str(tmp_path / "native"), str(tmp_path / "gs"), "--to", "gemma-scope"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "gs"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["format"] == "gemma_scope" and info["architecture"] == "jumprelu" and info["width"] == W
    assert info["threshold_rel_err"] == 0.0  # thresholds written by saelab are exp() values already
    d = describe(sae, {"format": "saelab", **META})
    assert info["decoder_norm"] == pytest.approx(d["decoder_norm"])
    r = runner.invoke(app, ["inspect", str(tmp_path / "native")])
    assert r.exit_code == 0 and "resid_post.3" in r.output and "decoder_norm" in r.output
    r = runner.invoke(app, ["convert", str(tmp_path / "native"), str(tmp_path / "x"), "--to", "sparsify"])
    assert r.exit_code == 2 and "cannot export a saelab jumprelu to sparsify" in r.output
    r = runner.invoke(app, ["inspect", str(tmp_path / "x_missing")])
    assert r.exit_code == 2 and "neither a local folder nor a hub id" in r.output
    r = runner.invoke(app, ["inspect", "no-such-dir/sae"])  # tests are offline: the hub reading fails too
    assert r.exit_code == 2 and "no such local folder, and no hub download" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["inspect", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no known SAE format" in r.output
