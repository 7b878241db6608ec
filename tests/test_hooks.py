import pytest
import torch
from tiny import save_tiny

from saelab.models.hooks import (
    KINDS,
    HookPoint,
    capture,
    resolve,
    run_with_patch,
    valid_hook_points,
)
from saelab.models.load import load_model


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def family(request, tmp_path_factory):
    return load_model(str(save_tiny(tmp_path_factory.mktemp(request.param), request.param)))


def _ids(lm, texts=("def f(x):\n    return x + 1", "To be, or not to be")):
    enc = lm.tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_parse_hook_names():
    assert HookPoint.parse("resid_post.2") == HookPoint(2, "resid_post")
    assert HookPoint.parse("blocks.2.hook_resid_post") == HookPoint(2, "resid_post")
    assert str(HookPoint(3, "mlp_out")) == "mlp_out.3"
    with pytest.raises(ValueError, match="kinds: resid_pre"):
        HookPoint.parse("resid_middle.1")
    with pytest.raises(ValueError, match="KIND.LAYER"):
        HookPoint.parse("layer 3")


def test_out_of_range_lists_valid_points(tiny_loaded):
    with pytest.raises(ValueError) as e:
        resolve(tiny_loaded.model, "resid_post.3")
    assert "3 layers" in str(e.value) and "resid_pre.0" in str(e.value)
    assert len(valid_hook_points(tiny_loaded.model)) == 3 * len(KINDS)


def test_semantics_match_hidden_states(family):
    model = family.model
    ids, mask = _ids(family)
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    for L in range(n):
        got = capture(model, [HookPoint(L, k) for k in KINDS], ids, mask)
        pre, attn, mlp, post = (got[HookPoint(L, k)] for k in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
        assert torch.equal(pre, hs[L])
        if L < n - 1:  # the last hidden state has the final norm applied: resid_post is not it
            assert torch.equal(post, hs[L + 1])
        assert torch.allclose(pre + attn + mlp, post, atol=1e-5)
    last = capture(model, [HookPoint(n - 1, "resid_post")], ids, mask)[HookPoint(n - 1, "resid_post")]
    assert not torch.allclose(last, hs[n])


def test_identity_splice_leaves_logits_bit_identical(family):
    ids, mask = _ids(family)
    clean = run_with_patch(family.model, HookPoint(0, "resid_post"), None, ids, mask)
    for kind in KINDS:
        patched = run_with_patch(family.model, HookPoint(1, kind), lambda x: x.clone(), ids, mask)
        assert torch.equal(clean, patched), kind
    zeroed = run_with_patch(family.model, HookPoint(1, "mlp_out"), torch.zeros_like, ids, mask)
    assert not torch.equal(clean, zeroed)


def test_capture_stops_after_the_deepest_hook(tiny_loaded):
    model = tiny_loaded.model
    calls = []
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, blk in enumerate(model.model.layers)]
    try:
        ids, mask = _ids(tiny_loaded)
        capture(model, [HookPoint(0, "mlp_out"), HookPoint(1, "attn_out")], ids, mask)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]  # block 1 started (attention ran) but never finished; block 2 never ran


def test_unsupported_architecture_lists_modules(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError) as e:
        resolve(model, "resid_post.0")
    assert "gpt2" in str(e.value) and "'h'" in str(e.value)
