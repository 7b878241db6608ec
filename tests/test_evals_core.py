import pytest
import torch

from saelab.activations.harvest import harvest
from saelab.config import EvalConfig, HarvestConfig, SAEConfig, TrainConfig
from saelab.evals.core import _validation_batches, ce_metrics, evaluate
from saelab.models.hooks import HookPoint
from saelab.saes import load_sae
from saelab.train.trainer import train


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    store = harvest(HarvestConfig(model=str(tiny_model_dir), hook="resid_post.1", text=str(text_jsonl),
                                  tokens=8000, ctx_len=64, batch_size=8, out=str(root / "s")),
                    loaded=tiny_loaded, progress=False)
    return train(TrainConfig(store=str(store.path), runs_dir=str(root / "runs"), name="r",
                             sae=SAEConfig(width=128, k=8), tokens=60_000, batch_size=256, lr=3e-3),
                 progress=False)


def _eval(trained, tiny_model_dir, text_jsonl, **kw):
    return EvalConfig(run=str(trained.path), text=str(text_jsonl), model=str(tiny_model_dir), tokens=2000,
                      ce_tokens=1000, ctx_len=64, batch_size=8, **kw)


def test_core_eval_metrics(trained, tiny_model_dir, tiny_loaded, text_jsonl):
    r = evaluate(_eval(trained, tiny_model_dir, text_jsonl), loaded=tiny_loaded, progress=False)
    assert r["eval_tokens"] == 2000 and r["ce_tokens"] >= 1000
    assert 0.5 < r["explained_variance"] < 1 and r["fvu"] == pytest.approx(1 - r["explained_variance"])
    assert r["l0"] == pytest.approx(8.0)
    assert 0 <= r["dead_fraction"] < 1
    assert r["kl_to_clean"] > 0 and r["ce_sae"] != r["ce_clean"]
    assert "variance around the mean" in r["definitions"]["explained_variance"]
    assert trained.summary()["eval"]["ce_loss_recovered"] == r["ce_loss_recovered"]


def test_ce_splice_endpoints(trained, tiny_model_dir, tiny_loaded, text_jsonl):
    """A perfect reconstruction recovers all CE (KL 0); splicing zeros recovers none."""
    sae, _ = load_sae(trained.checkpoint_dir)
    cfg = _eval(trained, tiny_model_dir, text_jsonl)
    hp = HookPoint(1, "resid_post")
    sae.reconstruct = lambda x: x.clone()
    r = ce_metrics(sae, tiny_loaded, hp, _validation_batches(cfg, tiny_loaded, True), 500, False)
    assert r["ce_sae"] == r["ce_clean"] and r["kl_to_clean"] == 0 and r["ce_loss_recovered"] == 1
    sae.reconstruct = torch.zeros_like
    r = ce_metrics(sae, tiny_loaded, hp, _validation_batches(cfg, tiny_loaded, True), 500, False)
    assert r["ce_sae"] == r["ce_zero"] and r["ce_loss_recovered"] == 0


def test_eval_is_reused_for_the_same_config(trained, tiny_model_dir, tiny_loaded, text_jsonl):
    cfg = _eval(trained, tiny_model_dir, text_jsonl, seed=3)
    evaluate(cfg, loaded=tiny_loaded, progress=False)
    stamp = (trained.path / "eval.json").stat().st_mtime_ns
    evaluate(cfg, loaded=tiny_loaded, progress=False)
    assert (trained.path / "eval.json").stat().st_mtime_ns == stamp


def test_eval_refuses_a_model_of_another_width(trained, text_jsonl, tmp_path):
    from tiny import byte_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    from saelab.models.load import load_model

    other = tmp_path / "wide"
    AutoModelForCausalLM.from_config(tiny_config(hidden_size=48)).save_pretrained(other)
    byte_tokenizer().save_pretrained(other)
    with pytest.raises(ValueError, match=r"SAE d_in 32 .* width 48"):
        evaluate(EvalConfig(run=str(trained.path), text=str(text_jsonl), model=str(other)),
                 loaded=load_model(str(other)), progress=False)
