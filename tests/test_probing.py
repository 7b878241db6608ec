import numpy as np
import pytest
import torch

from saelab.data.tasks import TaskData
from saelab.data.tokens import Context, Positions, batches, keep_mask
from saelab.evals.probing import (
    ProbingConfig,
    one_vs_rest,
    pooled_features,
    probe_correct,
    sparse_probing,
    top_k_by_mean_diff,
)
from saelab.models.hooks import HookPoint, capture
from saelab.saes import load_sae


def _planted(n=400, d=30, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, d))
    x[:, 4] += 3.0 * (y == 1)  # feature 4 marks class 1, feature 9 class 2
    x[:, 9] += 3.0 * (y == 2)
    test = rng.random(n) < 0.3
    return x, TaskData("planted", "-", [""] * n, y, ["a", "b", "c"], test, [str(i) for i in range(n)])


def test_top_k_by_class_mean_difference_finds_the_planted_features():
    x, data = _planted()
    y = (data.labels == 1).astype(int)
    assert top_k_by_mean_diff(x, y, 1).tolist() == [4]
    assert set(top_k_by_mean_diff(x, (data.labels == 2).astype(int), 2).tolist()) >= {9}


def test_one_vs_rest_is_balanced_and_probes_share_units():
    x, data = _planted()
    for _, tr, ytr, te, yte in one_vs_rest(data.labels, data.test, 3, seed=0):
        assert ytr.mean() == 0.5 and yte.mean() == 0.5
        assert not set(tr) & set(te)
    good = probe_correct(x, data, 1, seed=0)
    noise = probe_correct(np.random.default_rng(1).normal(size=x.shape), data, 1, seed=0)
    assert good.shape == noise.shape
    # class 0 has no planted feature of its own, but its one-vs-rest problem still shows it
    assert good.mean() > 0.8 and 0.35 < noise.mean() < 0.65


def test_pooled_features_average_kept_tokens_only(tiny_loaded):
    hp = HookPoint(1, "resid_post")
    texts = ["hello there", "a much longer piece of text here"]
    x, z = pooled_features(texts, tiny_loaded, hp, None, 64, 2, Positions())
    assert z is None and x.shape == (2, 32)
    tok = tiny_loaded.tokenizer
    ids = [tok.bos_token_id] + tok(texts[0], add_special_tokens=False)["input_ids"]
    batch = next(batches([Context(ids, 0, 0)], 1, tok.pad_token_id))
    acts = capture(tiny_loaded.model, [hp], batch.input_ids, batch.attention_mask)[hp]
    keep, _ = keep_mask(batch, tok, Positions())
    torch.testing.assert_close(x[0], acts[keep].mean(0), rtol=1e-4, atol=1e-5)  # BOS excluded, padding too
    last, _ = pooled_features(texts, tiny_loaded, hp, None, 64, 2, Positions(), pool="last")
    torch.testing.assert_close(last[0], acts[0, -1], rtol=1e-4, atol=1e-5)



def test_sparse_probing_on_a_real_task(tiny_sae_run, tiny_loaded):
    """Code vs prose from the stdlib through the tiny model: residual and SAE probes, paired CIs."""
    sae, _ = load_sae(tiny_sae_run.checkpoint_dir)
    cfg = ProbingConfig(tasks=["code_vs_prose"], ks=[1, 5], max_per_class=60, bootstrap=200)
    r = sparse_probing(cfg, sae, tiny_loaded, HookPoint(1, "resid_post"), Positions(), progress=False).model_dump()
    t = r["tasks"]["code_vs_prose"]
    assert set(t["accuracy"]) == {"sae_k1", "sae_k5", "sae_all", "resid_k1", "resid_k5", "resid_full"}
    assert t["accuracy"]["resid_full"] >= 0.75  # code and prose differ even to a random tiny model
    c = t["comparisons"]["k5"]
    assert c["a"] == t["accuracy"]["sae_k5"] and c["b"] == t["accuracy"]["resid_k5"]
    assert c["diff_ci95"][0] <= c["diff"] <= c["diff_ci95"][1]
    assert t["counts"]["code"]["test"] >= 10 and t["wall_seconds"] > 0


def test_unknown_task_and_missing_sources_are_explained(tiny_sae_run, tiny_loaded):
    sae, _ = load_sae(tiny_sae_run.checkpoint_dir)
    with pytest.raises(ValueError, match="unknown probing task 'nope'.*sentiment"):
        sparse_probing(ProbingConfig(tasks=["nope"]), sae, tiny_loaded, HookPoint(1, "resid_post"), Positions(), False)


@pytest.mark.embedded
def test_word_sentiment_is_linearly_readable_from_the_embedded_model():
    """The residual stream of SmolLM2 at resid_post.10 separates positive from negative words
    (lemma-split test set) well above chance; an untrained SAE stands in for the interface."""
    from saelab.models.load import load_model
    from saelab.saes import build_sae
    from saelab.saes.config import SAEConfig

    loaded = load_model("smollm2")
    sae = build_sae(SAEConfig(d_in=576, width=256, k=16))
    cfg = ProbingConfig(tasks=["sentiment"], ks=[5], max_per_class=300, bootstrap=300)
    r = sparse_probing(cfg, sae.eval(), loaded, HookPoint(10, "resid_post"), Positions(), progress=False).model_dump()
    full = r["tasks"]["sentiment"]["comparisons"]["all"]
    assert full["b_ci95"][0] > 0.55, full  # residual, full width: above chance (0.5)
