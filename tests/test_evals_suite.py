"""`saelab eval --suite ...` end to end on the tiny model, the randomized-model control, and refusals."""

import json

import pytest
import torch
from tiny import byte_tokenizer, tiny_config
from typer.testing import CliRunner

from saelab.cli import app
from saelab.config import ControlConfig, EvalConfig
from saelab.evals.control import randomized_copy
from saelab.evals.suite import run_suite
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
