import pytest
import torch
from tiny import tiny_config

from saelab.models.hooks import (
    ARCHS,
    KINDS,
    HookPoint,
    arch_of,
    capture,
    final_hidden,
    final_norm,
    forward_from,
    hidden_patched_from,
    mlp_fn,
    position_only_hidden,
    prefix_point,
    record,
    replace,
    resolve,
    run_with_patch,
    unembed,
    valid_hook_points,
)

# tiny random configs per family (no download); extra kwargs keep them small and valid
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 8},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 16},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16, "head_dim": 8},
    "gemma2": {"head_dim": 8}, "gemma3_text": {"head_dim": 8},
    "gpt2": {"n_inner": 64},
    "gpt_neox": {},  # Pythia: parallel attention + MLP
    "gpt_neox-sequential": {"use_parallel_residual": False},
    "bert": {},  # an encoder (as the MiniLM in DATA.md)
}


def build(family: str) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    model_type = family.split("-")[0]
    torch.manual_seed(0)
    cfg = tiny_config(model_type, **FAMILIES[family])
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    return auto.from_config(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, build(request.param)


def _ids(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 259, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    return ids, mask


def _parallel(model):
    arch = arch_of(model)
    return bool(arch.parallel and getattr(model.config, arch.parallel))


def test_parse_hook_names():
    assert HookPoint.parse("resid_post.2") == HookPoint(2, "resid_post")
    assert HookPoint.parse("blocks.2.hook_resid_mid") == HookPoint(2, "resid_mid")
    assert str(HookPoint(3, "mlp_in")) == "mlp_in.3"
    with pytest.raises(ValueError, match="kinds: resid_pre"):
        HookPoint.parse("resid_middle.1")
    with pytest.raises(ValueError, match="KIND.LAYER"):
        HookPoint.parse("layer 3")


def test_out_of_range_lists_valid_points(tiny_loaded):
    with pytest.raises(ValueError) as e:
        resolve(tiny_loaded.model, "resid_post.3")
    assert "3 layers" in str(e.value) and "resid_pre.0" in str(e.value)
    assert len(valid_hook_points(tiny_loaded.model)) == 3 * len(KINDS)


def test_semantics_per_family(family):
    name, model = family
    ids, mask = _ids()
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    kinds = [k for k in KINDS if not (k == "resid_mid" and _parallel(model))]
    for L in range(n):
        got = {hp.kind: x for hp, x in capture(model, [HookPoint(L, k) for k in kinds], ids, mask).items()}
        assert torch.equal(got["resid_pre"], hs[L])
        if L < n - 1 or name == "bert":  # decoders: the last hidden state has the final norm applied
            assert torch.equal(got["resid_post"], hs[L + 1])
        # mlp_in through the block's real MLP is the captured mlp_out
        assert torch.allclose(mlp_fn(model, L)(got["mlp_in"]), got["mlp_out"], atol=1e-6)
        if name == "bert":  # post-norm: resid_mid = LN(resid_pre + attn_out) feeds the MLP directly
            assert torch.equal(got["resid_mid"], got["mlp_in"])
        elif _parallel(model):
            assert torch.allclose(got["resid_pre"] + got["attn_out"] + got["mlp_out"], got["resid_post"], atol=1e-5)
        else:
            assert torch.allclose(got["resid_pre"] + got["attn_out"], got["resid_mid"], atol=1e-5)
            assert torch.allclose(got["resid_mid"] + got["mlp_out"], got["resid_post"], atol=1e-5)
            assert not torch.allclose(got["mlp_in"], got["resid_mid"])  # mlp_in is normalised
    if name != "bert":
        last = capture(model, [HookPoint(n - 1, "resid_post")], ids, mask)[HookPoint(n - 1, "resid_post")]
        assert not torch.allclose(last, hs[n])


def test_identity_splice_leaves_logits_bit_identical(family):
    name, model = family
    ids, mask = _ids(1)
    clean = run_with_patch(model, HookPoint(0, "resid_post"), None, ids, mask)
    for L in range(model.config.num_hidden_layers):
        for kind in KINDS:
            if kind == "resid_mid" and _parallel(model):
                continue
            patched = run_with_patch(model, HookPoint(L, kind), lambda x: x.clone(), ids, mask)
            assert torch.equal(clean, patched), (L, kind)
    for kind in KINDS:  # and a real change at any point changes the output
        if not (kind == "resid_mid" and _parallel(model)):
            assert not torch.equal(clean, run_with_patch(model, HookPoint(1, kind), lambda x: x * 1.5, ids, mask)), kind


def test_a_context_set_past_its_first_token_depends_on_the_position_alone(family):
    """The residual at a resid hook set to one vector c at every position, or at every position
    but the first (a clean first token, as the core eval's ablations keep BOS): every real
    position t of every row of a full pass, whatever its tokens, ends in the state one context
    computes at t (`position_only_hidden`), in every family, padded rows and RoPE included.
    Non-zero vectors, so biases and norms are exercised; with a distinct first position the
    states differ by position (the shortcut is not a constant)."""
    name, model = family
    if name == "bert":
        return
    ids, mask = _ids(4)
    g = torch.Generator().manual_seed(1)
    c, first = torch.randn(32, generator=g), torch.randn(32, generator=g) * 3
    m = mask.bool()
    for hp in (HookPoint(0, "resid_pre"), HookPoint(1, "resid_post")):
        for f in (None, first):
            resid = c.expand(*ids.shape, 32).clone()
            if f is not None:
                resid[:, 0] = f
            full = forward_from(model, hp, resid, ids, mask, hidden=True)  # [B, T, d]
            one = position_only_hidden(model, hp, c, ids.shape[1], f, first_id=7)  # [T, d]
            assert torch.allclose(full[m], one.expand_as(full)[m], atol=1e-5, rtol=1e-4), (hp, f is None)
            assert not torch.allclose(one, torch.zeros_like(one)), hp
        assert not torch.allclose(one[1], one[-1], atol=1e-4), (name, hp)


def test_forward_from_a_cached_residual_equals_the_full_pass(family):
    """Running only the blocks after a resid_pre/resid_post hook, fed the captured activation, gives
    the logits of the full pass (bit-identical: the same operations run on the same inputs); an
    edited residual changes them as patching it would; the final norm is the one hidden_states[-1] has."""
    name, model = family
    ids, mask = _ids(3)
    if name == "bert":
        with pytest.raises(ValueError, match="LM head"):
            forward_from(model, "resid_post.0", torch.zeros(2, 12, 32), ids, mask)
        return
    clean = run_with_patch(model, HookPoint(0, "resid_post"), None, ids, mask)
    n = model.config.num_hidden_layers
    for L in range(n):
        for kind in ("resid_pre", "resid_post"):
            hp = HookPoint(L, kind)
            x = capture(model, [hp], ids, mask)[hp]
            assert torch.equal(forward_from(model, hp, x, ids, mask), clean), (L, kind)
            edited = run_with_patch(model, hp, lambda a: a * 1.5, ids, mask)
            assert torch.allclose(forward_from(model, hp, x * 1.5, ids, mask), edited, atol=1e-5), (L, kind)
    assert all(type(b).__name__ != "_Skip" for b in model.base_model.get_submodule(arch_of(model).layers))
    last = capture(model, [HookPoint(n - 1, "resid_post")], ids, mask)[HookPoint(n - 1, "resid_post")]
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.allclose(final_norm(model)(last), hs[-1], atol=1e-6)
    with pytest.raises(ValueError, match="residual-stream hook"):
        forward_from(model, "mlp_out.0", last, ids, mask)


def test_patching_resid_mid_moves_the_residual_too(family):
    name, model = family
    if name == "bert" or _parallel(model):
        pytest.skip("resid_mid is not resid_pre + attn_out in post-norm or parallel blocks")
    ids, mask = _ids(2)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    via_mid = run_with_patch(model, HookPoint(1, "resid_mid"), lambda x: x + v, ids, mask)
    via_attn = run_with_patch(model, HookPoint(1, "attn_out"), lambda x: x + v, ids, mask)
    assert torch.allclose(via_mid, via_attn, atol=1e-4)
    only_mlp = run_with_patch(model, HookPoint(1, "mlp_in"), lambda x: x, ids, mask)
    assert not torch.allclose(via_mid, only_mlp, atol=1e-4)


def test_resid_mid_of_a_parallel_block_is_a_clear_error():
    model = build("gpt_neox")
    with pytest.raises(ValueError, match="parallel"):
        resolve(model, "resid_mid.0")


def test_capture_stops_after_the_deepest_hook(tiny_loaded):
    model = tiny_loaded.model
    calls = []
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, blk in enumerate(model.model.layers)]
    try:
        ids, mask = _ids()
        capture(model, [HookPoint(0, "mlp_out"), HookPoint(1, "attn_out"), HookPoint(0, "resid_mid")], ids, mask)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]  # block 1 started (attention ran) but never finished; block 2 never ran


def test_unsupported_architecture_lists_modules():
    from transformers import OPTConfig, OPTForCausalLM

    assert "opt" not in ARCHS
    model = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                                     vocab_size=50, word_embed_proj_dim=16))
    with pytest.raises(NotImplementedError) as e:
        resolve(model, "resid_post.0")
    msg = str(e.value)
    assert "'opt'" in msg and "decoder.layers" in msg and "self_attn" in msg and "fc1" in msg


@pytest.mark.embedded
def test_embedded_model_semantics():
    from saelab.models.load import load_model

    lm = load_model("smollm2")
    model = lm.model
    enc = lm.tokenizer(["def f(x):\n    return x + 1", "To be, or not to be"], return_tensors="pt", padding=True)
    ids, mask = enc.input_ids, enc.attention_mask
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    L = 10
    got = {hp.kind: x for hp, x in capture(model, [HookPoint(L, k) for k in KINDS], ids, mask).items()}
    assert torch.equal(got["resid_pre"], hs[L]) and torch.equal(got["resid_post"], hs[L + 1])
    assert torch.allclose(got["resid_mid"] + got["mlp_out"], got["resid_post"], atol=1e-4)
    assert torch.allclose(mlp_fn(model, L)(got["mlp_in"]), got["mlp_out"], atol=1e-5)
    clean = run_with_patch(model, HookPoint(L, "resid_post"), None, ids, mask)
    for kind in ("resid_mid", "mlp_in"):
        assert torch.equal(clean, run_with_patch(model, HookPoint(L, kind), lambda x: x.clone(), ids, mask))


def test_public_patch_api_runs_with_gradients(tiny_loaded):
    """add / replace / record / capture(grad=True): differentiable, and exact where they should be."""
    from saelab.models.hooks import add, forward, record, replace

    model = tiny_loaded.model
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    hp = HookPoint(1, "resid_post")
    clean = forward(model, ids)
    with replace(model, hp, lambda x: x):
        assert torch.equal(forward(model, ids), clean)
    v = torch.zeros(32, requires_grad=True)
    with torch.enable_grad(), add(model, "resid_post.1", v):
        out = forward(model, ids)
        assert torch.equal(out.detach(), clean)  # adding zero changes nothing
        out[0, -1, 7].backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    # the gradient is the derivative: a small step along it moves the logit as predicted
    step = 1e-3 * v.grad / v.grad.norm()
    with add(model, hp, step):
        moved = forward(model, ids)[0, -1, 7]
    assert torch.isclose(moved - clean[0, -1, 7], (step * v.grad).sum(), rtol=0.05)
    # add only where a mask says
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 3] = True
    with add(model, hp, torch.ones(32), mask), record(model, [hp]) as acts:  # hooks run in the order entered
        forward(model, ids)
    base = capture(model, [hp], ids)[hp]
    assert torch.allclose(acts[hp][0, 3], base[0, 3] + 1) and torch.equal(acts[hp][0, :3], base[0, :3])
    # recorded activations are graph nodes: d logit / d activation by backprop (frozen weights and
    # integer ids leave nothing to differentiate, so a zero vector that requires grad enters first)
    v0 = torch.zeros(32, requires_grad=True)
    with torch.enable_grad(), add(model, "resid_pre.0", v0), record(model, [hp]) as acts:
        out = forward(model, ids)
        acts[hp].retain_grad()
        out[0, -1, 7].backward()
    assert acts[hp].grad.shape == (1, 6, 32) and acts[hp].grad[0, -1].abs().sum() > 0
    model.zero_grad(set_to_none=True)
    g = capture(model, [HookPoint(0, "resid_post")], ids, grad=True)[HookPoint(0, "resid_post")]
    assert g.requires_grad is False  # model weights are frozen and ids are not differentiable...
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    try:
        g = capture(model, [HookPoint(0, "resid_post")], ids, grad=True)[HookPoint(0, "resid_post")]
        assert g.requires_grad and g.grad_fn is not None
    finally:
        emb.weight.requires_grad_(False)


def test_unembed_of_final_hidden_is_the_models_logits(family):
    """The head applied to the final hidden states gives the full forward's logits (Gemma-2's
    soft-capping included), which is what lets the CE eval make logits in chunks."""
    name, model = family
    ids, mask = _ids(5)
    if name == "bert":
        with pytest.raises(ValueError, match="LM head"):
            unembed(model, torch.zeros(2, 32))
        return
    clean = run_with_patch(model, HookPoint(0, "resid_post"), None, ids, mask)
    assert torch.allclose(unembed(model, final_hidden(model, ids, mask)), clean, atol=1e-5)
    if name == "gemma2":
        assert model.config.final_logit_softcapping  # the capped family really is exercised


def test_patched_passes_from_a_shared_prefix_equal_full_patched_passes(family):
    """Every hook kind at every layer: the final hidden states of a pass patched at the hook,
    run from the clean residual at its block (`prefix_point`), equal those of the full patched
    pass; and the patch really changes them."""
    name, model = family
    if name == "bert":
        return
    ids, mask = _ids(6)
    clean = final_hidden(model, ids, mask)
    for L in range(model.config.num_hidden_layers):
        for kind in KINDS:
            if kind == "resid_mid" and _parallel(model):
                continue
            hp = HookPoint(L, kind)
            with record(model, [prefix_point(hp)]) as rec:
                final_hidden(model, ids, mask)
            prefix = rec[prefix_point(hp)]

            def fn(x):
                return x * 1.5 + 0.1
            with replace(model, hp, fn):
                want = final_hidden(model, ids, mask)
            got = hidden_patched_from(model, hp, prefix, fn, ids, mask)
            assert torch.allclose(got, want, atol=1e-5), (L, kind)
            assert not torch.allclose(got, clean, atol=1e-3), (L, kind)
