"""Encode fidelity against the real libraries (the `interop` extra: sae-lens, eai-sparsify).

Both directions: a coder saved by the real library and loaded in saelab, and a saelab coder
exported and loaded by the real library, encode the same activations (random, and real
embedded-model activations) with identical active latents per row (Jaccard 1.0) and
values / outputs within 1e-5 relative. A deliberately wrong adapter (b_dec not subtracted)
fails the same check, so the check can fail.
"""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes import (
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sparsify import SparseCoder as SparsifyCoder
from sparsify import SparseCoderConfig
from test_formats import inputs, random_coder
from typer.testing import CliRunner

from saelab.cli import app
from saelab.saes.formats import load, save
from saelab.saes.formats.verify import compare_codes, reference_encode, verify_against

pytestmark = pytest.mark.interop
D, W, K = 48, 160, 8


def randomise(module: torch.nn.Module, seed: int, threshold: float | None = None) -> None:
    """Every parameter random (so no mapping hides behind a zero), thresholds positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 1 / p.shape[-1] ** 0.5))
            if "threshold" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.2 + (threshold or 0.05))


SAELENS = {
    "standard": lambda: StandardSAE(StandardSAEConfig(d_in=D, d_sae=W)),
    "standard_raw_input": lambda: StandardSAE(StandardSAEConfig(d_in=D, d_sae=W, apply_b_dec_to_input=False)),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=W, k=K)),
    "topk_rescaled": lambda: TopKSAE(TopKSAEConfig(d_in=D, d_sae=W, k=K, rescale_acts_by_decoder_norm=True)),
    "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=W)),
    "gated": lambda: GatedSAE(GatedSAEConfig(d_in=D, d_sae=W)),
    "gated_raw_input": lambda: GatedSAE(GatedSAEConfig(d_in=D, d_sae=W, apply_b_dec_to_input=False)),
    "transcoder": lambda: Transcoder(TranscoderConfig(d_in=D, d_sae=W, d_out=D + 16, apply_b_dec_to_input=False)),
    "skip_transcoder": lambda: SkipTranscoder(SkipTranscoderConfig(d_in=D, d_sae=W, d_out=D + 16,
                                                                   apply_b_dec_to_input=False)),
    "jumprelu_transcoder": lambda: JumpReLUTranscoder(JumpReLUTranscoderConfig(d_in=D, d_sae=W, d_out=D + 16,
                                                                               apply_b_dec_to_input=False)),
    "jumprelu_skip_transcoder": lambda: JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(
        d_in=D, d_sae=W, d_out=D + 16, apply_b_dec_to_input=False)),
}


def random_x(n: int = 512, d: int = D, seed: int = 11) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("name", sorted(SAELENS))
def test_saelens_saved_loads_identically(name, tmp_path):
    ref = SAELENS[name]()
    randomise(ref, seed=len(name))
    ref.cfg.metadata.hook_name = "blocks.4.hook_mlp_out"
    ref.save_model(tmp_path)
    sae, meta = load(tmp_path)
    assert meta["format"] == "saelens" and meta["hook"] == "mlp_out.4"
    x = random_x()
    z_ref, y_ref = reference_encode("sae_lens", tmp_path, x)
    r = compare_codes(sae.encode(x), z_ref, sae.reconstruct(x), y_ref)
    assert r["passed"] and r["l0_mean"] > 1, (name, r)


@pytest.mark.parametrize("name", ["standard", "jumprelu", "gated_raw_input", "skip_transcoder"])
def test_saelens_activation_scaling_is_folded(name, tmp_path):
    """A training checkpoint: normalize_activations=expected_average_only_in with the factor in
    activation_scaler.json. saelab folds it; the reference is SAELens's own fold."""
    ref = SAELENS[name]()
    randomise(ref, seed=4)
    ref.cfg.normalize_activations = "expected_average_only_in"
    ref.save_model(tmp_path)
    (tmp_path / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.37}))
    sae, _ = load(tmp_path)
    ref = SAE.load_from_disk(str(tmp_path)).eval()
    ref.fold_activation_norm_scaling_factor(0.37)
    x = random_x() / 0.37
    with torch.no_grad():
        r = compare_codes(sae.encode(x), ref.encode(x), sae.reconstruct(x), ref(x))
    assert r["passed"] and r["l0_mean"] > 1, r
    (tmp_path / "activation_scaler.json").unlink()
    with pytest.raises(ValueError, match="'normalize_activations' = 'expected_average_only_in' cannot be honoured"):
        load(tmp_path)


def test_saelens_topk_training_save_folds_norms(tmp_path):
    """SAELens's default TopK training config rescales by decoder norm and folds the norms into
    the weights in save_inference_model: what users actually have on disk."""
    from sae_lens.saes import TopKTrainingSAE, TopKTrainingSAEConfig

    ref = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=W, k=K))
    assert ref.cfg.rescale_acts_by_decoder_norm
    randomise(ref, seed=3)
    ref.save_inference_model(tmp_path)
    sae, _ = load(tmp_path)
    x = random_x()
    z_ref, y_ref = reference_encode("sae_lens", tmp_path, x)
    r = compare_codes(sae.encode(x), z_ref, sae.reconstruct(x), y_ref)
    assert r["passed"], r


# SAELens has no TopK or gated transcoder (that export refuses; see test_formats)
@pytest.mark.parametrize("arch,transcoder", [(a, False) for a in ("relu", "topk", "jumprelu", "gated", "batchtopk",
                                                                   "matryoshka", "panneal")]
                         + [(a, True) for a in ("relu", "jumprelu", "batchtopk", "matryoshka", "panneal")])
def test_saelab_exports_encode_identically_in_saelens(arch, transcoder):
    sae = random_coder(arch, transcoder)
    r = verify_against(sae, {"hook": "resid_post.3"}, "sae_lens", inputs(sae, 512))
    assert r["passed"] and r["l0_mean"] > 1, r


@pytest.mark.parametrize("transcode,skip", [(False, False), (True, False), (True, True)])
def test_sparsify_both_directions(transcode, skip, tmp_path):
    ref = SparsifyCoder(D, SparseCoderConfig(num_latents=W, k=K, transcode=transcode, skip_connection=skip))
    randomise(ref, seed=5)
    ref.save_to_disk(tmp_path / "layers.6")
    sae, meta = load(tmp_path / "layers.6")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == K and sae.cfg.transcoder == transcode
    assert meta["hook"] == "resid_post.6"
    x = random_x()
    z_ref, y_ref = reference_encode("sparsify", tmp_path / "layers.6", x)
    r = compare_codes(sae.encode(x), z_ref, sae.reconstruct(x), y_ref)
    assert r["passed"] and r["l0_mean"] == K, r
    # and back: saelab's export read by sparsify
    r = verify_against(sae, meta, "sparsify", x)
    assert r["passed"], r


def test_wrong_adapter_fails_the_check(tmp_path):
    """Regression for the published bug: a sparsify SAE written for SAELens with
    apply_b_dec_to_input=False. The correct export passes; the wrong one fails."""
    ref = SparsifyCoder(D, SparseCoderConfig(num_latents=W, k=K))
    randomise(ref, seed=9)
    ref.save_to_disk(tmp_path / "sp")
    sae, meta = load(tmp_path / "sp")
    x = random_x() + ref.b_dec.detach()
    z_true, y_true = reference_encode("sparsify", tmp_path / "sp", x)
    save(sae, meta, tmp_path / "right", "sae_lens")
    z, y = reference_encode("sae_lens", tmp_path / "right", x)
    assert compare_codes(z, z_true, y, y_true)["passed"]
    cfg = json.loads((tmp_path / "right" / "cfg.json").read_text())
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "sae_weights.safetensors").write_bytes((tmp_path / "right" / "sae_weights.safetensors").read_bytes())
    (tmp_path / "wrong" / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    z, y = reference_encode("sae_lens", tmp_path / "wrong", x)
    r = compare_codes(z, z_true, y, y_true)
    assert not r["passed"] and r["rows_differing"] > r["rows"] // 2, r


def test_saelens_own_sparsify_loader_is_caught(tmp_path):
    """SAELens 6.54's sparsify_disk_loader transposes W_dec and sets apply_b_dec_to_input from
    normalize_decoder. Whatever it does (fail to load, or load something else), it must not
    pass the fidelity check against sparsify."""
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    ref = SparsifyCoder(D, SparseCoderConfig(num_latents=W, k=K))
    randomise(ref, seed=2)
    ref.save_to_disk(tmp_path)
    x = random_x() + ref.b_dec.detach()
    z_true, y_true = reference_encode("sparsify", tmp_path, x)
    try:
        theirs = SAE.load_from_disk(str(tmp_path), converter=sparsify_disk_loader)
    except (RuntimeError, ValueError, KeyError):
        return  # observed with 6.54.12: a size mismatch on W_dec
    with torch.no_grad():
        r = compare_codes(theirs.encode(x), z_true, theirs(x), y_true)
    assert not r["passed"], r


def test_inspect_verify_against_cli(tmp_path):
    sae = random_coder("topk")
    save(sae, {"hook": "resid_post.3"}, tmp_path / "sp", "sparsify")
    for lib in ("sae_lens", "sparsify"):
        r = CliRunner().invoke(app, ["inspect", str(tmp_path / "sp"), "--verify-against", lib, "--rows", "256", "--json"])
        assert r.exit_code == 0, r.output
        v = json.loads(r.output[r.output.index("{"):])["verify"]
        assert v["passed"] and v["jaccard_min"] == 1.0 and v["rows"] == 256


@pytest.mark.embedded
def test_fidelity_on_embedded_model_activations(tmp_path):
    """Real activations (SmolLM2 resid_post.10 on the embedded corpus) through SAEs made by the
    real libraries (a sparsify TopK and a SAELens JumpReLU with b_dec at the data mean)."""
    from saelab.data.corpus import iter_documents
    from saelab.models.hooks import HookPoint, capture
    from saelab.models.load import load_model

    lm = load_model("smollm2")
    texts = [d.text[:2000] for _, d in zip(range(4), iter_documents("embedded", "validation"), strict=False)]
    enc = lm.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=64)
    hp = HookPoint.parse("resid_post.10")
    with torch.no_grad():
        acts = capture(lm.model, [hp], enc["input_ids"], enc["attention_mask"])[hp]
    x = acts[enc["attention_mask"].bool()].float()  # [tokens, 576]
    d = x.shape[1]
    g = torch.Generator().manual_seed(0)

    sp = SparsifyCoder(d, SparseCoderConfig(num_latents=4 * d, k=32))
    with torch.no_grad():
        sp.encoder.weight.copy_(torch.randn(4 * d, d, generator=g) / d**0.5)
        sp.W_dec.copy_(sp.encoder.weight / sp.encoder.weight.norm(dim=1, keepdim=True))
        sp.b_dec.copy_(x.mean(0))
    sp.save_to_disk(tmp_path / "layers.10")
    sae, _ = load(tmp_path / "layers.10")
    z_ref, y_ref = reference_encode("sparsify", tmp_path / "layers.10", x)
    r = compare_codes(sae.encode(x), z_ref, sae.reconstruct(x), y_ref)
    assert r["passed"] and r["rows"] >= 200, r
    assert verify_against(sae, {}, "sae_lens", x)["passed"]
    save(sae, {}, tmp_path / "wrong", "sae_lens")  # the published adapter bug, on real activations
    cfg = json.loads((tmp_path / "wrong" / "cfg.json").read_text())
    (tmp_path / "wrong" / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": False}))
    z, y = reference_encode("sae_lens", tmp_path / "wrong", x)
    wrong = compare_codes(z, z_ref, y, y_ref)
    assert not wrong["passed"] and wrong["jaccard_mean"] < 0.5, wrong

    jr = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=4 * d))
    with torch.no_grad():
        jr.W_enc.copy_(torch.randn(d, 4 * d, generator=g) / d**0.5)
        jr.W_dec.copy_(jr.W_enc.T)
        jr.b_dec.copy_(x.mean(0))
        jr.b_enc.zero_()
        pre = (x - jr.b_dec) @ jr.W_enc
        # ~3% of tokens fire each latent; the margin keeps thresholds off the data's own values
        jr.threshold.copy_(pre.quantile(0.97, dim=0).clamp_min(1e-3) * 1.0001)
    jr.save_model(tmp_path / "jr")
    sae, _ = load(tmp_path / "jr")
    z_ref, y_ref = reference_encode("sae_lens", tmp_path / "jr", x)
    r = compare_codes(sae.encode(x), z_ref, sae.reconstruct(x), y_ref)
    assert r["passed"] and r["l0_mean"] > 10, r
