import json

import pytest
import torch

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.data.tokens import Positions
from saelab.evals.core import CoreConfig, ce_metrics, validation_batches
from saelab.experiments.evaluate import EvalConfig, evaluate
from saelab.models.hooks import HookPoint
from saelab.saes import load_sae
from saelab.saes.config import SAEConfig
from saelab.train.trainer import TrainConfig, train


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
    assert r.eval_tokens == 2000 and r.ce_tokens >= 1000
    assert 0.5 < r.explained_variance < 1 and r.fvu == pytest.approx(1 - r.explained_variance)
    assert r.l0 == pytest.approx(8.0)
    assert 0 <= r.dead_fraction < 1
    assert r.kl_to_clean > 0 and r.ce_sae != r.ce_clean
    assert "variance around the mean" in r.definitions["explained_variance"]
    assert json.loads((trained.path / "eval.json").read_text())["ce_loss_recovered"] == r.ce_loss_recovered


def test_ce_splice_endpoints(trained, tiny_model_dir, tiny_loaded, text_jsonl):
    """A perfect reconstruction recovers all CE (KL 0); splicing zeros recovers none."""
    sae, _ = load_sae(trained.checkpoint_dir)
    cfg = _eval(trained, tiny_model_dir, text_jsonl)
    hp = HookPoint(1, "resid_post")
    sae.reconstruct = lambda x: x.clone()
    r = ce_metrics(sae, tiny_loaded, hp, validation_batches(cfg, tiny_loaded, Positions()), 500, False)
    assert r["ce_sae"] == r["ce_clean"] and r["kl_to_clean"] == 0 and r["ce_loss_recovered"] == 1
    sae.reconstruct = torch.zeros_like
    r = ce_metrics(sae, tiny_loaded, hp, validation_batches(cfg, tiny_loaded, Positions()), 500, False)
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


def test_evals_read_the_positions_the_sae_was_trained_on(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    """A store harvested with exclude_tokens: the SAE records its positions, and the core eval (and
    probing, via the same helper) never reconstructs a token the SAE never trained on."""
    from saelab.experiments.evaluate import coder_positions

    store = harvest(HarvestConfig(model=str(tiny_model_dir), hook="resid_post.1", text=str(text_jsonl), tokens=4000,
                                  ctx_len=64, batch_size=8, exclude_tokens=["e", "Ġ"], out=str(tmp_path / "s")),
                    loaded=tiny_loaded, progress=False)
    assert store.manifest["excluded"]["listed"] > 0
    run = train(TrainConfig(store=str(store.path), runs_dir=str(tmp_path / "runs"), name="ex",
                            sae=SAEConfig(width=64, k=4), tokens=4096, batch_size=256), progress=False)
    _, meta = load_sae(run.checkpoint_dir)
    assert meta["positions"]["exclude_tokens"] == ["e", "Ġ"] and coder_positions(meta).exclude_tokens == ("e", "Ġ")
    r = evaluate(EvalConfig(run=str(run.path), text=str(text_jsonl), model=str(tiny_model_dir), tokens=1500,
                            ce_tokens=300, ctx_len=64, batch_size=8), loaded=tiny_loaded, progress=False)
    excluded = r.positions["excluded_in_reconstruction"]
    assert r.positions["exclude_tokens"] == ["e", "Ġ"] and excluded["listed"] > 0 and r.eval_tokens == 1500
    # the same budget with the default positions reads other rows, so the metrics differ
    meta.pop("positions")
    assert coder_positions({**meta, "store": None}).exclude_tokens == ()


def test_ce_counts_predictions_made_at_kept_positions_only(trained, tiny_model_dir, tiny_loaded, text_jsonl):
    """The prediction made at BOS is not scored; SAELens' all-positions zero ablation is reported beside."""
    from saelab.data.tokens import keep_mask
    from saelab.evals.core import scored_positions

    cfg = _eval(trained, tiny_model_dir, text_jsonl)
    batch = next(iter(validation_batches(cfg, tiny_loaded, Positions())))
    keep, _ = keep_mask(batch, tiny_loaded.tokenizer, Positions())
    score = scored_positions(batch, keep)
    assert not score[:, 0].any()  # position 0 is BOS
    assert int(score.sum()) == int(batch.attention_mask[:, 2:].sum())  # every real target after the first
    r = evaluate(cfg, loaded=tiny_loaded, progress=False)
    assert r.ce_zero_all_positions != r.ce_zero  # BOS zeroed too: another number (a random tiny model)
    assert r.ce_loss_recovered_all_positions_zeroed == pytest.approx(
        (r.ce_zero_all_positions - r.ce_sae) / (r.ce_zero_all_positions - r.ce_clean))
    assert "SAELens" in r.definitions["ce_loss_recovered_all_positions_zeroed"]


def test_an_older_eval_json_without_a_new_field_is_reused(trained, tiny_model_dir, tiny_loaded, text_jsonl):
    from tiny import drop_fields

    cfg = _eval(trained, tiny_model_dir, text_jsonl, seed=5)
    evaluate(cfg, loaded=tiny_loaded, progress=False)
    drop_fields(trained.path / "eval.json", ["similar_pairs", "device", "ledger"])
    stamp = (trained.path / "eval.json").stat().st_mtime_ns
    evaluate(cfg, loaded=tiny_loaded, progress=False)
    assert (trained.path / "eval.json").stat().st_mtime_ns == stamp


def _reference_ce(sae, loaded, hp, stream, n_tokens, mean_act):
    """The CE/KL eval as it was first written: five full passes, whole [batch, ctx, vocab] logits."""
    from saelab.data.tokens import keep_mask
    from saelab.evals.core import scored_positions
    from saelab.evals.metrics import token_ce, token_kl
    from saelab.models.hooks import run_with_patch

    sums = dict.fromkeys(("clean", "sae", "zero", "zero_all", "mean", "kl"), 0.0)
    n = 0
    for batch in stream:
        if n >= n_tokens:
            break
        keep, _ = keep_mask(batch, loaded.tokenizer, Positions())
        score = scored_positions(batch, keep)
        targets = batch.input_ids[:, 1:][score]

        def splice(fn, keep=keep):
            def patch(x):
                y = x.clone()
                y[keep] = fn(x[keep].float()).to(x.dtype)
                return y
            return patch
        patches = {"clean": None, "sae": splice(sae.reconstruct), "zero": splice(torch.zeros_like),
                   "zero_all": torch.zeros_like, "mean": splice(lambda x: mean_act.expand_as(x))}
        kept = {}
        for k, fn in patches.items():
            flat = run_with_patch(loaded.model, hp, fn, batch.input_ids, batch.attention_mask)[:, :-1][score]
            sums[k] += float(token_ce(flat, targets).sum())
            kept[k] = flat
        sums["kl"] += float(token_kl(kept["clean"], kept["sae"]).sum())
        n += targets.shape[0]
    return {k: v / n for k, v in sums.items()}


@pytest.mark.parametrize("hook", ["resid_post.1", "mlp_out.1", "resid_mid.2"])
def test_ce_from_a_shared_prefix_in_chunks_equals_five_full_passes(trained, tiny_model_dir, tiny_loaded, text_jsonl,
                                                                   hook):
    """The streamed eval (lower blocks once, patched passes from the cached residual, logits in
    row chunks) gives the numbers of five full passes with whole logits, for a residual hook and
    for hooks inside a block (the prefix is then the block's input)."""
    sae, _ = load_sae(trained.checkpoint_dir)
    cfg = _eval(trained, tiny_model_dir, text_jsonl)
    hp = HookPoint.parse(hook)
    mean_act = torch.randn(32) * 0.1
    want = _reference_ce(sae, tiny_loaded, hp, validation_batches(cfg, tiny_loaded, Positions()), 600, mean_act)
    got = ce_metrics(sae, tiny_loaded, hp, validation_batches(cfg, tiny_loaded, Positions()), 600, False,
                     mean_act=mean_act)
    pairs = {"clean": "ce_clean", "sae": "ce_sae", "zero": "ce_zero", "zero_all": "ce_zero_all_positions",
             "mean": "ce_mean", "kl": "kl_to_clean"}
    for k, name in pairs.items():
        assert got[name] == pytest.approx(want[k], rel=1e-5, abs=1e-6), name
    assert got["ce_zero"] != got["ce_sae"] != got["ce_clean"]


def test_the_shared_ablation_contexts_are_checked_and_fall_back(trained, tiny_model_dir, tiny_loaded, text_jsonl,
                                                                caplog):
    """At a residual hook each ablation's CE comes from one context standing for every row
    (`AblatedCE`). It equals full passes, also with a row left clean mid-context (a special
    token: that row gets its own pass). In a model whose tokens also enter above the hook (here
    the token's embedding added after the final norm, as per-layer token embeddings would do)
    the shortcut is wrong; the check sees it and the eval runs full passes, so every number still
    equals five full passes, where the shortcut alone would be off."""
    from saelab.data.tokens import keep_mask
    from saelab.evals.core import AblatedCE, scored_positions
    from saelab.evals.metrics import ce_chunk_rows
    from saelab.models.hooks import final_norm, record, unembed

    sae, _ = load_sae(trained.checkpoint_dir)
    cfg = _eval(trained, tiny_model_dir, text_jsonl)
    hp, model = HookPoint(1, "resid_post"), tiny_loaded.model
    head, rows = (lambda h: unembed(model, h)), ce_chunk_rows(model.config.vocab_size)
    mean_act = torch.randn(32) * 0.1
    values = {"zero": torch.zeros(32), "zero_all": torch.zeros(32), "mean": mean_act}
    batch = next(iter(validation_batches(cfg, tiny_loaded, Positions())))
    keep, _ = keep_mask(batch, tiny_loaded.tokenizer, Positions())
    keep[0, 5] = False  # as if a special token mid-context
    score = scored_positions(batch, keep)
    ids, mask = batch.input_ids, batch.attention_mask

    def sums(trusted=None):
        p = AblatedCE(model, hp, head, rows, values)
        if trusted is not None:
            p.trusted = dict.fromkeys(values, trusted)
        with record(model, [hp]) as rec:
            model(input_ids=ids, attention_mask=mask)
        return p.sums(rec[hp], ids, mask, keep, score), p

    full, _ = sums(trusted=False)
    got, p = sums()
    assert p.trusted == dict.fromkeys(values, True)
    assert len(p.reps) == 3  # one context per ablation: every row but row 0 shared one
    for k in values:
        assert got[k] == pytest.approx(full[k], rel=1e-5), k
    assert got["zero"] != got["mean"] != got["zero_all"]

    term = {}
    pre = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: term.update(ids=a[0]))
    post = final_norm(model).register_forward_hook(
        lambda m, i, out: out + 1000 * model.get_input_embeddings().weight[term["ids"]].to(out.dtype))
    try:
        full, _ = sums(trusted=False)
        got, p = sums()
        assert p.trusted == dict.fromkeys(values, False)
        for k in values:
            assert got[k] == pytest.approx(full[k], rel=1e-6), k
        off, _ = sums(trusted=True)  # the shortcut itself would have been off
        assert all(abs(off[k] - full[k]) > 1e-3 * abs(full[k]) for k in values), (off, full)
        want = _reference_ce(sae, tiny_loaded, hp, validation_batches(cfg, tiny_loaded, Positions()), 600, mean_act)
        with caplog.at_level("INFO", logger="saelab.evals.core"):
            got = ce_metrics(sae, tiny_loaded, hp, validation_batches(cfg, tiny_loaded, Positions()), 600, False,
                             mean_act=mean_act)
        assert "depends on more than the position" in caplog.text
        for k, name in (("zero", "ce_zero"), ("zero_all", "ce_zero_all_positions"), ("mean", "ce_mean")):
            assert got[name] == pytest.approx(want[k], rel=1e-5), name
    finally:
        pre.remove()
        post.remove()


def test_ce_eval_memory_stays_bounded_with_a_huge_vocabulary(tmp_path, text_jsonl):
    """A 250k-token vocabulary (Gemma's size) at batch 16 x 64: whole logits would be 1 GB a pass
    and the five-pass eval held ~5 of them (>4 GB measured as first written); streamed, the peak
    resident memory over the eval stays under 1.5 GB."""
    from tiny import byte_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    from saelab.device import peak_memory_bytes, reset_peak
    from saelab.models.load import LoadedModel
    from saelab.saes.base import build_sae

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=250_000, num_hidden_layers=2,
                                                         tie_word_embeddings=True)).eval().requires_grad_(False)
    loaded = LoadedModel(model, byte_tokenizer(), "huge-vocab", "memory")
    sae = build_sae(SAEConfig(width=64, k=4, d_in=32))
    cfg = CoreConfig(text=str(text_jsonl), tokens=1000, ce_tokens=2000, ctx_len=64, batch_size=16)
    hp = HookPoint(0, "resid_post")
    import gc
    gc.collect()
    base = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    reset_peak(torch.device("cpu"))
    r = ce_metrics(sae, loaded, hp, validation_batches(cfg, loaded, Positions()), 2000, False,
                   mean_act=torch.zeros(32))
    peak = peak_memory_bytes(torch.device("cpu")) - base
    assert r["ce_tokens"] >= 2000 and r["ce_clean"] > 0
    assert peak < 1.5e9, f"CE eval peaked {peak / 1e9:.2f} GB above its start"


def test_the_sae_independent_passes_are_cached_and_checked(trained, tiny_model_dir, tiny_loaded, text_jsonl, tmp_path,
                                                           caplog):
    """A second coder at the same hook reuses the clean and ablated passes (same numbers as
    computing them); another text recomputes (its token ids differ); a damaged cache file is
    refused by its checksum and recomputed."""
    from saelab.evals.core import core_eval

    sae, meta = load_sae(trained.checkpoint_dir)
    cfg = CoreConfig(text=str(text_jsonl), tokens=1000, ce_tokens=600, ctx_len=64, batch_size=8)
    hp = HookPoint(1, "resid_post")
    fresh = core_eval(cfg, sae, tiny_loaded, hp, Positions(), "tiny", False)
    first = core_eval(cfg, sae, tiny_loaded, hp, Positions(), "tiny", False, baseline_dir=tmp_path)
    other = load_sae(trained.checkpoint_dir)[0]
    with torch.no_grad():
        other.W_dec.mul_(0.5)
    second = core_eval(cfg, other, tiny_loaded, hp, Positions(), "tiny", False, baseline_dir=tmp_path)
    second_fresh = core_eval(cfg, other, tiny_loaded, hp, Positions(), "tiny", False)
    assert (fresh.ce_baseline, first.ce_baseline, second.ce_baseline) == ("uncached", "computed", "reused")
    names = ("ce_clean", "ce_sae", "ce_zero", "ce_zero_all_positions", "ce_mean", "kl_to_clean")
    assert all(getattr(first, k) == getattr(fresh, k) for k in names)
    assert all(getattr(second, k) == pytest.approx(getattr(second_fresh, k), rel=1e-6) for k in names)
    assert second.ce_sae != first.ce_sae
    [cached] = tmp_path.glob("*.safetensors")
    data = bytearray(cached.read_bytes())
    data[-5] ^= 0xFF
    cached.write_bytes(bytes(data))
    again = core_eval(cfg, other, tiny_loaded, hp, Positions(), "tiny", False, baseline_dir=tmp_path)
    assert again.ce_baseline == "computed" and "not used" in caplog.text
    assert again.ce_sae == pytest.approx(second_fresh.ce_sae, rel=1e-6)
    shifted = cfg.model_copy(update={"seed": 1})  # other contexts: other key
    assert core_eval(shifted, other, tiny_loaded, hp, Positions(), "tiny", False,
                     baseline_dir=tmp_path).ce_baseline == "computed"
    from saelab.evals.core import CEBaseline
    stored = CEBaseline.load(cached, json.loads(cached.with_suffix(".json").read_text())["key"])
    ids = stored.batches[0]["ids"]
    assert stored.get(0, ids) is not None and stored.get(0, ids.flip(1)) is None  # same key, other tokens
