"""The logit lens of decoder directions: batched over all latents it equals the per-direction
computation through the model's own final norm and unembedding, and a direction built from a
token's unembedding promotes (or, negated, suppresses) that token most."""

import pytest
import torch
from test_hooks import build

from saelab.intervene.lens import lens_scores, logit_lens
from saelab.models.hooks import final_norm


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # RMSNorm, untied / LayerNorm, tied embeddings
def test_lens_is_the_direct_path_through_the_final_norm_and_unembedding(family):
    model = build(family)
    norm, head = final_norm(model), model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a non-trivial gain, so the test sees it
        norm.weight.copy_(1 + 0.5 * torch.rand(norm.weight.shape, generator=g))
    dirs = torch.randn(37, model.config.hidden_size, generator=g)
    with torch.no_grad():
        naive = torch.stack([head(norm(d)) - head(norm(torch.zeros_like(d))) for d in dirs])
    assert torch.allclose(lens_scores(model, dirs), naive, atol=1e-5)
    lens = logit_lens(model, dirs, k=5, chunk=8)  # chunked over latents
    top = naive.topk(5, dim=-1)
    assert torch.equal(lens.top_ids, top.indices) and torch.allclose(lens.top_scores, top.values, atol=1e-5)
    assert torch.equal(lens.bottom_ids, (-naive).topk(5, dim=-1).indices)
    assert (lens.bottom_scores[:, 0] <= lens.bottom_scores[:, -1]).all()  # most negative first
    W_U = head.weight.detach()
    for t in (5, 77, 200):  # the unembedding row of t, undone by the gain: t comes first (last, negated)
        probe = logit_lens(model, torch.stack([W_U[t] / norm.weight, -W_U[t] / norm.weight]).detach(), k=3)
        assert probe.top_ids[0, 0] == t and probe.bottom_ids[1, 0] == t


def test_lens_tokens_are_readable(tiny_loaded):
    lens = logit_lens(tiny_loaded.model, torch.randn(3, tiny_loaded.model.config.hidden_size), k=4)
    out = lens.tokens(tiny_loaded.tokenizer, 2)
    assert len(out["promoted"]) == len(out["suppressed"]) == 4
    assert out["promoted"][0][1] >= out["promoted"][-1][1] and out["suppressed"][0][1] <= out["suppressed"][-1][1]
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        logit_lens(tiny_loaded.model, torch.randn(32))
