"""`saelab probe RUN` on the tiny model's SAE: RUN/probe/ records, one ledger row per setting with
its verdict, cached features and reuse; the features equal the probing eval's pooled ones."""

import json
import shutil

import numpy as np
import torch
from typer.testing import CliRunner

from saelab.data.tokens import Positions
from saelab.evals.probe_features import compute_features
from saelab.evals.probing import pooled_features
from saelab.models.hooks import HookPoint
from saelab.runs.ledger import Ledger
from saelab.saes import load_sae


def test_features_of_one_pass_equal_the_pooled_features(tiny_sae_run, tiny_loaded):
    sae, _ = load_sae(tiny_sae_run.checkpoint_dir)
    texts = ["def f(x): return x", "a much longer piece of text here, with words", "hi"]
    hp = HookPoint(1, "resid_post")
    f = compute_features(texts, tiny_loaded, hp, sae, Positions(), max_tokens=16, batch_size=2)
    for pool in ("last", "mean"):
        x, z = pooled_features(texts, tiny_loaded, hp, sae, 16, 2, Positions(), pool=pool)
        torch.testing.assert_close(torch.from_numpy(f[pool].x), x, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(f[pool].z.toarray()), z, rtol=1e-4, atol=1e-5)
    assert f["last"].z.nnz <= 3 * sae.cfg.k  # last-token TopK latents: at most k per example


def test_probe_stage_writes_records_and_ledger_rows_and_reuses(tiny_sae_run, tmp_path):
    from saelab.cli import app

    run = tmp_path / "run"  # a copy: the shared fixture's run directory stays as other tests expect it
    shutil.copytree(tiny_sae_run.path, run)
    ledger = tmp_path / "ledger.sqlite"
    task = tmp_path / "task.jsonl"  # a user's own task file
    words = {"animal": ["cat", "dog", "horse", "bird"], "number": ["seven", "twelve", "forty", "three"]}
    with open(task, "w") as out:
        for label, ws in words.items():
            for i in range(80):
                out.write(json.dumps({"text": f"the {ws[i % 4]} and {i}", "label": label, "doc": f"{label}{i // 4}"}) + "\n")
    spec = {"name": "mine", "source": str(task), "group_field": "doc", "min_train": 10, "min_test": 5}
    cfg = tmp_path / "probe.yaml"
    cfg.write_text(json.dumps({"run": str(run), "tasks": ["code_vs_prose", spec], "max_per_class": 60,
                               "settings": ["normal", "label_noise"], "probes": ["logreg", "knn", "sae_topk"],
                               "budget": 2, "n_jobs": 1, "bootstrap": 100, "scr_pairs": ["kind_genre"],
                               "tpp_tasks": ["text_source"],
                               "control_cfg": {"harvest_tokens": 4096, "train_tokens": 8192, "batch_size": 256,
                                               "out": str(tmp_path / "control")}}))
    args = ["probe", "--config", str(cfg), "--ledger", str(ledger), "--ledger-id", "p1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    out = run / "probe"
    records = json.loads((out / "records.json").read_text())
    assert {r["task"] for r in records} == {"code_vs_prose", "mine"}
    assert {r["probe"] for r in records} == {"logreg", "knn", "sae_topk", "ctrl_topk"}
    assert {(r["setting"], len([q for q in records if q["setting"] == r["setting"] and q["task"] == r["task"]]))
            for r in records if r["task"] == "mine"} == {("normal", 4), ("label_noise", 44)}
    tasks = json.loads((out / "tasks.json").read_text())
    assert all(t["split"].startswith("grouped by field") and t["size"] > 0 for t in tasks)
    rows = {r["id"]: r for r in Ledger(ledger).rows(stage="probe")}
    assert set(rows) == {"p1-normal", "p1-label_noise", "p1-scr", "p1-tpp", "p1-analyses"}
    assert all(r["cmp_name"] == "sae" and r["cmp_unit"] == "task" and r["verdict"] in ("conclusive", "inconclusive")
               for r in rows.values() if r["kind"] == "winrate")
    assert rows["p1-scr"]["cmp_name"] == "mean_normal_top20" and rows["p1-analyses"]["verdict"] == "novel"
    scr = json.loads((out / "scr.json").read_text())
    assert scr["tasks"] == ["kind_genre"] and {p["setting"] for p in scr["points"]} == {"normal", "scarcity"}
    w = json.loads((out / "winrate_label_noise.json").read_text())
    assert set(w["quiver"]) == {"sae", "control"} and w["points"] == 22
    assert "sae_topk" in res.output and (out / "plots_skipped.json").is_file() or (out / "plots/winrate.png").is_file()
    # the same work again: reused, no new rows
    res = CliRunner().invoke(app, [*args[:-2]])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "probe.json").read_text())["reused"] and len(Ledger(ledger).rows(stage="probe")) == 5
    # other settings: recomputed from the cached features
    res = CliRunner().invoke(app, ["probe", "--config", str(cfg), "--ledger", str(ledger), "--settings", "scarcity"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "probe.json").read_text())
    assert not meta["reused"] and meta["wall_seconds"]["feature_files_reused"] >= 4
    assert np.isfinite([r["test_auc"] for r in json.loads((out / "records.json").read_text())]).all()
