"""`saelab eval --suite ...` end to end on the tiny model, the randomized-model control, and refusals."""

import json

import pytest
import torch
from tiny import byte_tokenizer, tiny_config
from typer.testing import CliRunner

from saelab.cli import app
from saelab.experiments.control import ControlConfig, randomized_copy
from saelab.experiments.evaluate import EvalConfig, run_suite
from saelab.models.load import load_model

runner = CliRunner()


def test_randomized_copy_reinitialises_every_weight_and_leaves_the_model(tiny_loaded):
    before = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    a, b = randomized_copy(tiny_loaded, 0), randomized_copy(tiny_loaded, 0)
    c = randomized_copy(tiny_loaded, 1)
    for name, p in a.model.named_parameters():
        assert torch.equal(p, dict(b.model.named_parameters())[name])  # seeded
        if p.ndim >= 2:
            assert not torch.equal(p, before[name]) and not torch.equal(p, dict(c.model.named_parameters())[name])
    for k, v in tiny_loaded.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert "randomized" in a.name and a.tokenizer is tiny_loaded.tokenizer


def test_eval_suite_cli_runs_all_four_and_writes_the_run_dir(tiny_sae_run, tiny_model_dir, text_jsonl, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_sae_run.path, run)
    words = tmp_path / "words.txt"
    words.write_text("\n".join(f"{a}{b}{c}" for a in "abcdef" for b in "aeiou" for c in "nrst"))
    args = ["eval", str(run), "--suite", "core,probing,absorption,control", "--tokens", "800", "--ce-tokens", "300",
            "--set", f"text={text_jsonl}", "--set", "ctx_len=64", "--set", f"model={tiny_model_dir}",
            "--set", "probing.tasks=[code_vs_prose]", "--set", "probing.ks=[1,5]",
            "--set", "probing.max_per_class=40", "--set", "probing.bootstrap=100",
            "--set", f"absorption.word_list={words}", "--set", "absorption.min_letter_words=3",
            "--set", "absorption.bootstrap=100",
            "--set", "control.harvest_tokens=3000", "--set", "control.train_tokens=12000",
            "--set", "control.tokens=600", "--set", "control.ce_tokens=200",
            "--set", "control.probing_tasks=[code_vs_prose]"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    for line in ("explained_variance_legacy", "ce_loss_recovered_mean_ablation", "code_vs_prose",
                 "absorption_fraction", "randomized-model control", "probing_code_vs_prose_k5", "wall seconds"):
        assert line in r.output, line
    suite = json.loads((run / "eval_suite.json").read_text())
    assert set(suite["wall_seconds"]) == {"core", "probing", "absorption", "control"}
    core = json.loads((run / "eval.json").read_text())
    assert core["eval_tokens"] == 800 and sum(core["feature_density_histogram"]["counts"]) + \
        core["feature_density_histogram"]["never_fired"] == 128
    assert core["dead_latents"] == core["feature_density_histogram"]["never_fired"]
    control = json.loads((run / "eval_control.json").read_text())
    ev = control["gaps"]["explained_variance"]
    assert ev["diff"] == pytest.approx(ev["a"] - ev["b"]) and ev["unit"] == "validation context"
    assert ev["diff_ci95"][0] <= ev["diff"] <= ev["diff_ci95"][1]
    assert (run / "control" / "sae" / "summary.json").is_file()  # harvest -> train -> eval really ran
    assert control["random_core"]["eval_tokens"] == 600
    # a second call reuses every result with the same config
    stamps = {f: (run / f).stat().st_mtime_ns for f in ("eval.json", "eval_probing.json", "eval_control.json")}
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert stamps == {f: (run / f).stat().st_mtime_ns for f in stamps}
    assert "probing" in json.loads((run / "eval_suite.json").read_text())["reused"] and "(stored)" in r.output


def test_suite_refuses_a_model_whose_hook_or_width_disagrees(tiny_sae_run, text_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    for name, kw, pattern in (("wide", {"hidden_size": 48}, r"SAE d_in 32 .* width 48"),
                              ("shallow", {"num_hidden_layers": 1},
                               r"SAE hook 'resid_post.1' does not exist .* has 1 layers")):
        other = tmp_path / name
        AutoModelForCausalLM.from_config(tiny_config(**kw)).save_pretrained(other)
        byte_tokenizer().save_pretrained(other)
        cfg = EvalConfig(run=str(tiny_sae_run.path), text=str(text_jsonl), model=str(other), suite=["probing"],
                         control=ControlConfig())
        with pytest.raises(ValueError, match=pattern):
            run_suite(cfg, loaded=load_model(str(other)), progress=False)
        r = runner.invoke(app, ["eval", str(tiny_sae_run.path), "--suite", "probing", "--set", f"model={other}"])
        assert r.exit_code == 2 and "error:" in r.output


def test_unknown_suite_name_is_a_clear_error(tiny_sae_run):
    r = runner.invoke(app, ["eval", str(tiny_sae_run.path), "--suite", "core,bogus"])
    assert r.exit_code == 2 and "suite.1" in r.output and "absorption" in r.output


def test_every_eval_of_the_suite_leaves_a_ledger_row_and_the_cli_reads_them(tiny_sae_run, tiny_model_dir,
                                                                           text_jsonl, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_sae_run.path, run)
    ledger = tmp_path / "ledger.sqlite"
    args = ["eval", str(run), "--suite", "core,probing", "--tokens", "600", "--ce-tokens", "200",
            "--ledger", str(ledger), "--ledger-id", "suite-a", "--notes", "tiny model",
            "--set", f"text={text_jsonl}", "--set", "ctx_len=64", "--set", f"model={tiny_model_dir}",
            "--set", "probing.tasks=[code_vs_prose]", "--set", "probing.ks=[1,5]",
            "--set", "probing.max_per_class=40", "--set", "probing.bootstrap=100"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "ledger: core suite-a-core, probing suite-a-probing" in r.output
    from saelab.runs.ledger import Ledger

    led = Ledger(ledger)
    core, probing = led.row("suite-a-core"), led.row("suite-a-probing")
    assert core["verdict"] == "novel" and core["notes"] == "tiny model" and core["width"] == 128
    assert core["metrics"]["eval_tokens"] == 600 and core["model_hash"] and core["git_commit"] is not None
    assert probing["cmp_name"] == "pooled_k1" and probing["verdict"] in ("conclusive", "inconclusive")
    assert probing["cmp_lo"] <= probing["cmp_diff"] <= probing["cmp_hi"] and "code_vs_prose_k5" in probing["comparisons"]
    assert runner.invoke(app, args).exit_code == 0 and len(led.rows()) == 2  # reused: no new rows
    md = runner.invoke(app, ["ledger", "export", "--ledger", str(ledger)])
    assert md.exit_code == 0 and md.output.count("| suite-a-") == 2 and "pooled_k1:" in md.output
    show = runner.invoke(app, ["ledger", "show", "suite-a-probing", "--ledger", str(ledger)])
    assert show.exit_code == 0 and "comparisons (a, b, a - b [95% CI], n)" in show.output
    v = runner.invoke(app, ["ledger", "verdict", "suite-a-core", "inconclusive", "--reason", "tiny budget",
                            "--ledger", str(ledger)])
    s = runner.invoke(app, ["ledger", "supersede", "suite-a-core", "--by", "suite-a-probing", "--reason", "x",
                            "--ledger", str(ledger)])
    assert v.exit_code == s.exit_code == 0 and led.row("suite-a-core")["superseded_by"] == "suite-a-probing"
    assert runner.invoke(app, ["ledger", "check", "--ledger", str(ledger)]).exit_code == 0
    (run / "eval_probing.json").write_text((run / "eval_probing.json").read_text().replace("0", "1", 1))
    bad = runner.invoke(app, ["ledger", "check", "--ledger", str(ledger)])
    assert bad.exit_code == 1 and "suite-a-probing: result file" in bad.output and "changed" in bad.output
    missing = runner.invoke(app, ["ledger", "show", "nope", "--ledger", str(ledger)])
    assert missing.exit_code == 2 and "no ledger row 'nope'" in missing.output
    # rebuilt from the run directory: the same rows, verdicts set by hand included
    rebuilt = tmp_path / "rebuilt.sqlite"
    assert runner.invoke(app, ["ledger", "rebuild", str(tmp_path), "--out", str(rebuilt)]).exit_code == 0
    again = [(x["id"], x["verdict"], x["superseded_by"]) for x in Ledger(rebuilt).rows() if x["stage"] == "eval"]
    assert again == [(x["id"], x["verdict"], x["superseded_by"]) for x in led.rows()]
    assert [x["stage"] for x in Ledger(rebuilt).rows()] == ["train", "eval", "eval"]  # the copied run's training


def test_a_run_from_before_the_ledger_is_backfilled_by_rebuild(tiny_sae_run, tmp_path):
    import shutil

    from saelab.runs.ledger import Ledger, rebuild

    run = tmp_path / "runs" / "old"
    shutil.copytree(tiny_sae_run.path, run)
    (run / "ledger.jsonl").unlink()
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "verdict": "novel"}))  # as older saelab wrote it
    assert rebuild(tmp_path / "runs", tmp_path / "l.sqlite") == {"replayed": 0, "backfilled": 1, "skipped_events": 0,
                                                               "unreadable_files": 0}
    (row,) = Ledger(tmp_path / "l.sqlite").rows()
    assert row["stage"] == "train" and "backfilled" in row["notes"] and row["cpu"]  # provenance from manifest.json


def test_control_on_a_run_trained_on_the_fly(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    """A train-fly run has no store and its config.yaml is a FlyTrainConfig: the control takes the
    harvest and training settings from the SAE's checkpoint and that config."""
    from saelab.saes.config import SAEConfig
    from saelab.train.fly import FlySAE, FlyTrainConfig, train_on_the_fly

    fly = FlyTrainConfig(model=str(tiny_model_dir), text=str(text_jsonl), ctx_len=64, model_batch_size=8,
                         buffer_tokens=1024, tokens=256 * 20, batch_size=256, lr=3e-3, runs_dir=str(tmp_path / "fly"),
                         saes=[FlySAE(name="a", hook="resid_post.1", sae=SAEConfig(width=64, k=4), lr=2e-3)])
    (run,) = train_on_the_fly(fly, loaded=tiny_loaded, progress=False)
    cfg = EvalConfig(run=str(run.path), suite=["control"], text=str(text_jsonl), model=str(tiny_model_dir),
                     ctx_len=64, batch_size=8,
                     control=ControlConfig(harvest_tokens=2000, train_tokens=4096, tokens=400, ce_tokens=100,
                                           probing_tasks=[]))
    out = run_suite(cfg, loaded=tiny_loaded, progress=False)
    c = out.results["control"]
    assert c.gaps["explained_variance"].n_units > 0 and (run.path / "control" / "sae" / "summary.json").is_file()
    rand_cfg = (run.path / "control" / "sae" / "config.yaml").read_text()
    assert "lr: 0.002" in rand_cfg and "batch_size: 256" in rand_cfg  # this SAE's own lr, the fly run's batch


def test_a_checkpoint_without_a_store_or_config_still_gets_its_control(tiny_sae_run, tiny_model_dir, tiny_loaded,
                                                                      text_jsonl, tmp_path):
    import shutil

    run = tmp_path / "bare"
    shutil.copytree(tiny_sae_run.path / "checkpoint", run / "checkpoint")  # e.g. a converted checkpoint
    meta = json.loads((run / "checkpoint" / "cfg.json").read_text())
    meta["store"] = str(tmp_path / "gone")
    (run / "checkpoint" / "cfg.json").write_text(json.dumps(meta))
    cfg = EvalConfig(run=str(run), suite=["control"], text=str(text_jsonl), model=str(tiny_model_dir), ctx_len=64,
                     batch_size=8, control=ControlConfig(harvest_tokens=2000, train_tokens=4096, tokens=400,
                                                         ce_tokens=100, probing_tasks=[]))
    with pytest.raises(ValueError, match=r"control.harvest_tokens \(2000\) is smaller than one training batch "
                                         r"\(4096\).*has no config.yaml"):
        run_suite(cfg, loaded=tiny_loaded, progress=False)
    cfg.control.batch_size = 256
    out = run_suite(cfg, loaded=tiny_loaded, progress=False)
    assert out.results["control"].random_core["eval_tokens"] == 400
