import pytest
import torch

from saelab.activations import harvest as harvest_mod
from saelab.activations.harvest import harvest
from saelab.activations.store import StoreError
from saelab.config import HarvestConfig
from saelab.models.hooks import HookPoint, capture


def _cfg(tiny_model_dir, text_jsonl, out, **kw):
    base = dict(model=str(tiny_model_dir), hook="resid_post.1", text=str(text_jsonl), tokens=3000,
                ctx_len=64, batch_size=4, shard_tokens=500, out=str(out))
    return HarvestConfig(**{**base, **kw})


def test_harvest_rows_match_a_direct_forward(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    store = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "s"), loaded=tiny_loaded, progress=False)
    m = store.manifest
    assert store.n_tokens == 3000 and m["complete"] and m["d_in"] == 32 and m["hook"] == "resid_post.1"
    tok = tiny_loaded.tokenizer
    shard = store.load_shard(0)
    assert tok.bos_token_id not in shard["tokens"].tolist() and tok.pad_token_id not in shard["tokens"].tolist()
    assert m["excluded"]["bos"] == m["resume"]["contexts_done"] > 0
    # the first row of the first context: document `doc`, position 0, preceded by BOS
    docs = __import__("json").loads((store.path / "documents.json").read_text())
    doc_text = next(d.text for d in harvest_mod.iter_documents(str(text_jsonl), "train") if d.id == docs[int(shard["doc"][0])])
    ids = tok(doc_text, add_special_tokens=False)["input_ids"][:63]
    ref = capture(tiny_loaded.model, [HookPoint(1, "resid_post")], torch.tensor([[tok.bos_token_id] + ids]))
    ref = ref[HookPoint(1, "resid_post")][0, 1:]
    n = len(ids)
    assert shard["pos"][:n].tolist() == list(range(n))
    assert shard["tokens"][:n].tolist() == ids
    assert torch.allclose(shard["acts"][:n], ref, atol=1e-5)


def test_killed_harvest_resumes_to_the_same_store(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path, monkeypatch):
    whole = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "a"), loaded=tiny_loaded, progress=False)
    calls = {"n": 0}
    real = harvest_mod.capture

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("kill")
        return real(*a, **k)

    monkeypatch.setattr(harvest_mod, "capture", dying)
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "b"), loaded=tiny_loaded, progress=False)
    with pytest.raises(StoreError, match="incomplete"):
        harvest_mod.ActivationStore(tmp_path / "b")
    assert not list((tmp_path / "b").glob("*.tmp")) and not list((tmp_path / "b").glob(".*"))
    monkeypatch.setattr(harvest_mod, "capture", real)
    resumed = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "b"), loaded=tiny_loaded, progress=False)
    assert resumed.n_tokens == whole.n_tokens
    for key in ("acts", "tokens", "doc", "pos"):
        a = torch.cat([whole.load_shard(i)[key] for i in range(len(whole.shards))])
        b = torch.cat([resumed.load_shard(i)[key] for i in range(len(resumed.shards))])
        assert torch.equal(a, b), key
    assert resumed.manifest["excluded"] == whole.manifest["excluded"]


def test_same_config_is_reused_other_config_refused(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    cfg = _cfg(tiny_model_dir, text_jsonl, tmp_path / "s", tokens=500)
    first = harvest(cfg, loaded=tiny_loaded, progress=False)
    mtime = (first.path / "shard_00000.safetensors").stat().st_mtime_ns
    harvest(cfg, loaded=tiny_loaded, progress=False)
    assert (first.path / "shard_00000.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(StoreError, match="another config"):
        harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "s", tokens=600), loaded=tiny_loaded, progress=False)


def test_bad_hook_lists_valid_points(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    with pytest.raises(ValueError, match=r"model has 3 layers .*resid_pre.0"):
        harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "s", hook="resid_post.7"), loaded=tiny_loaded)
