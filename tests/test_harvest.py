import pytest
import torch

from saelab.activations import harvest as harvest_mod
from saelab.activations.harvest import HarvestConfig, harvest
from saelab.activations.store import StoreError
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
    from saelab.activations import rows as rows_mod

    real = rows_mod.capture  # every forward of a harvest goes through it

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("kill")
        return real(*a, **k)

    monkeypatch.setattr(rows_mod, "capture", dying)
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "b"), loaded=tiny_loaded, progress=False)
    with pytest.raises(StoreError, match="incomplete"):
        harvest_mod.ActivationStore(tmp_path / "b")
    assert not list((tmp_path / "b").glob("*.tmp")) and not list((tmp_path / "b").glob(".*"))
    monkeypatch.setattr(rows_mod, "capture", real)
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


def _index(store):
    return {k: torch.cat([store.load_shard(i)[k] for i in range(len(store.shards))]) for k in ("acts", "tokens", "doc", "pos")}


def test_many_hooks_in_one_pass_write_aligned_stores(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    from saelab.activations.store import aligned
    from saelab.models.hooks import mlp_fn

    hooks = ["mlp_in.1", "mlp_out.1", "resid_post.0", "resid_mid.2"]
    stores = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "m", hook=hooks), loaded=tiny_loaded, progress=False)
    assert sorted(stores) == sorted(hooks)
    for h, s in stores.items():
        assert s.path == tmp_path / "m" / h and s.hook == h and s.n_tokens == 3000
    assert all(aligned(stores["mlp_in.1"], s, strict=True) for s in stores.values())
    # the same rows as a single-hook harvest, and mlp_in -> the real MLP -> mlp_out row by row
    single = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "one", hook="resid_post.0"), loaded=tiny_loaded,
                     progress=False)
    a, b = _index(single), _index(stores["resid_post.0"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    x, y = stores["mlp_in.1"].rows(torch.arange(0, 3000, 7)), stores["mlp_out.1"].rows(torch.arange(0, 3000, 7))
    assert torch.allclose(mlp_fn(tiny_loaded.model, 1)(x["acts"]), y["acts"], atol=1e-5)
    other = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "o", seed=1), loaded=tiny_loaded, progress=False)
    assert not aligned(single, other)
    with pytest.raises(StoreError, match="not row-aligned"):
        aligned(single, other, strict=True)


def test_killed_multi_hook_harvest_lines_its_stores_up(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path, monkeypatch):
    """A kill between two stores' flushes leaves one a shard ahead: resume rolls it back."""
    from saelab.activations.store import StoreWriter

    hooks = ["mlp_in.1", "mlp_out.1"]
    whole = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "a", hook=hooks), loaded=tiny_loaded, progress=False)
    real, n = StoreWriter.flush, {"calls": 0}

    def dying(self):
        if self._buf_rows:
            n["calls"] += 1
            if n["calls"] == 6:  # the second store's 3rd shard: the first store already has it
                raise KeyboardInterrupt("kill")
        real(self)

    monkeypatch.setattr(StoreWriter, "flush", dying)
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "b", hook=hooks), loaded=tiny_loaded, progress=False)
    monkeypatch.setattr(StoreWriter, "flush", real)
    ahead = harvest_mod.ActivationStore(tmp_path / "b" / "mlp_in.1", allow_incomplete=True)
    behind = harvest_mod.ActivationStore(tmp_path / "b" / "mlp_out.1", allow_incomplete=True)
    assert len(ahead.shards) == len(behind.shards) + 1
    resumed = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "b", hook=hooks), loaded=tiny_loaded, progress=False)
    for h in hooks:
        a, b = _index(whole[h]), _index(resumed[h])
        assert all(torch.equal(a[k], b[k]) for k in a), h
        assert resumed[h].manifest["stats"] == whole[h].manifest["stats"]
        assert resumed[h].manifest["excluded"] == whole[h].manifest["excluded"]


def test_exclusions_are_counted_and_long_documents_truncated(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    tok = tiny_loaded.tokenizer
    space, newline = tok.convert_tokens_to_ids("Ġ"), tok.convert_tokens_to_ids("Ċ")
    s = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "x", exclude_tokens=["Ġ", newline], long_docs="truncate",
                     ctx_len=32, tokens=100_000), loaded=tiny_loaded, progress=False)
    m, idx = s.manifest, _index(s)
    assert m["exhausted"] and s.n_tokens < 100_000
    assert space not in idx["tokens"].tolist() and newline not in idx["tokens"].tolist()
    assert m["excluded"]["listed"] > 0 and m["excluded"]["bos"] == m["resume"]["contexts_done"]
    # truncate: one context per document, so positions stay below ctx_len - 1 (BOS takes one)
    assert int(idx["pos"].max()) < 31 and m["resume"]["contexts_done"] == len(set(idx["doc"].tolist()))
    # every document is longer than a context, so each context has 32 tokens: kept + excluded
    assert s.n_tokens + m["excluded"]["listed"] + m["excluded"]["bos"] + m["excluded"]["special"] == \
        m["resume"]["contexts_done"] * 32
    with pytest.raises(ValueError, match="not a token of this tokenizer"):
        harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "y", exclude_tokens=["no-such-token"]), loaded=tiny_loaded)


def test_torchrun_sharded_harvest_equals_one_process(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    """2 gloo processes under torchrun, each on half the documents; the merged stores hold
    the rows of a one-process harvest, in the same order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    hooks = ["resid_pre.1", "mlp_out.2"]
    cfg = _cfg(tiny_model_dir, text_jsonl, tmp_path / "dist", hook=hooks, tokens=2500)
    cfg.save(tmp_path / "harvest.yaml")
    src = str(Path(harvest_mod.__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "saelab.cli", "harvest", "--config", str(tmp_path / "harvest.yaml")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "one", hook=hooks, tokens=2500),
                     loaded=tiny_loaded, progress=False)
    for h in hooks:
        merged = harvest_mod.ActivationStore(tmp_path / "dist" / h)
        assert merged.manifest["merged_from"] == 2 and merged.n_tokens == single[h].n_tokens == 2500
        a, b = _index(single[h]), _index(merged)
        for k in ("tokens", "doc", "pos"):
            assert torch.equal(a[k], b[k]), k
        assert torch.allclose(a["acts"], b["acts"], atol=1e-5)
        assert merged.manifest["rows_sha256"] == single[h].manifest["rows_sha256"]
        for k in ("bos", "special", "listed"):  # padding depends on how contexts were batched
            assert merged.manifest["excluded"][k] == single[h].manifest["excluded"][k]
        assert torch.allclose(merged.mean, single[h].mean, atol=1e-5)
    assert not list(tmp_path.glob("dist/.*"))  # rank stores merged and removed


def test_harvest_an_encoder(text_jsonl, tmp_path):
    """A BERT encoder (as the MiniLM in DATA.md) loads without a head and harvests like a decoder."""
    from tiny import byte_tokenizer, tiny_config
    from transformers import AutoModel

    from saelab.models.load import load_model

    torch.manual_seed(0)
    AutoModel.from_config(tiny_config("bert")).save_pretrained(tmp_path / "bert")
    byte_tokenizer().save_pretrained(tmp_path / "bert")
    lm = load_model(str(tmp_path / "bert"))
    assert type(lm.model).__name__ == "BertModel"
    s = harvest(_cfg(tmp_path / "bert", text_jsonl, tmp_path / "s", hook="resid_post.2", tokens=400),
                loaded=lm, progress=False)
    row = s.rows([0])
    docs = __import__("json").loads((s.path / "documents.json").read_text())
    text = next(d.text for d in harvest_mod.iter_documents(str(text_jsonl), "train") if d.id == docs[int(row["doc"][0])])
    ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(text, add_special_tokens=False)["input_ids"][:63]
    hs = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    assert torch.allclose(row["acts"][0], hs[3][0, 1], atol=1e-5)  # bidirectional: the whole context counts


def test_an_older_store_without_a_new_field_is_reused(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    import json

    store = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "s"), loaded=tiny_loaded, progress=False)
    m = json.loads((store.path / "manifest.json").read_text())
    for f in ("long_docs", "device", "notes"):  # fields with defaults an older saelab did not have
        m["config"].pop(f, None)
    (store.path / "manifest.json").write_text(json.dumps(m))
    stamp = (store.path / "shard_00000.safetensors").stat().st_mtime_ns
    again = harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "s"), loaded=tiny_loaded, progress=False)
    assert again.n_tokens == store.n_tokens and (store.path / "shard_00000.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(StoreError, match="another config"):
        harvest(_cfg(tiny_model_dir, text_jsonl, tmp_path / "s", long_docs="truncate"), loaded=tiny_loaded,
                progress=False)


def test_kept_rows_drop_exactly_the_excluded_positions(tiny_loaded):
    from saelab.activations.rows import kept_rows
    from saelab.data.tokens import Context, Positions, batches

    tok = tiny_loaded.tokenizer
    e = tok.convert_tokens_to_ids("e")
    ids = [tok.bos_token_id] + tok("the tree sees three bees", add_special_tokens=False)["input_ids"]
    (batch,) = batches([Context(ids, 0, 0), Context(ids[:7], 1, 0)], 2, tok.pad_token_id)
    hp = HookPoint(1, "resid_post")
    full = kept_rows(tiny_loaded.model, [hp], batch, tok, Positions())
    listed = kept_rows(tiny_loaded.model, [hp], batch, tok, Positions(exclude_tokens=("e",)))
    kept_tokens = batch.input_ids[listed.ctx, listed.pos].tolist()
    assert e in ids and e not in kept_tokens and tok.bos_token_id not in kept_tokens
    assert listed.counts["listed"] == sum(t == e for t in ids) + sum(t == e for t in ids[:7])
    assert full.ctx.numel() - listed.ctx.numel() == listed.counts["listed"]
    assert torch.equal(listed.rows(hp), full.full[hp][listed.ctx, listed.pos])
    assert full.counts["pad"] == len(ids) - 7


def test_store_dtype_follows_the_model_by_default(tiny_model_dir, text_jsonl, tmp_path):
    """A bfloat16 model writes bfloat16 rows unless told otherwise (half the bytes: what keeps a
    many-hook harvest near the bare forward's speed); a float32 model's config is unchanged by
    the 'auto' default (same hash, so its stores are still found)."""
    assert HarvestConfig(dtype="bfloat16").store_dtype == "bfloat16"
    assert HarvestConfig(dtype="bfloat16", store_dtype="float32").store_dtype == "float32"
    assert HarvestConfig().hash() == HarvestConfig(store_dtype="float32").hash()
    cfg = HarvestConfig(model=str(tiny_model_dir), hook="resid_post.1", text=str(text_jsonl), tokens=500,
                        ctx_len=64, batch_size=8, dtype="bfloat16", out=str(tmp_path / "s"))
    store = harvest(cfg, progress=False)
    assert store.manifest["dtype"] == "bfloat16" and store.load_shard(0)["acts"].dtype == torch.bfloat16
