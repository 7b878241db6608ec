"""The CLI end to end on the tiny model: harvest -> train -> eval, and its error messages."""

import json

from typer.testing import CliRunner

from saelab.cli import app

runner = CliRunner()


def test_help_and_config():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "quickstart" in r.output and "harvest" in r.output
    r = runner.invoke(app, ["config", "train"])
    assert r.exit_code == 0 and "store: <required>" in r.output and "width: 4608" in r.output
    assert runner.invoke(app, ["config", "nope"]).exit_code == 2


def test_pipeline_through_the_cli(tiny_model_dir, text_jsonl, tmp_path):
    store = tmp_path / "store"
    r = runner.invoke(app, ["harvest", "--model", str(tiny_model_dir), "--hook", "mlp_out.2", "--text",
                            str(text_jsonl), "--tokens", "3000", "--out", str(store), "--set", "ctx_len=64"])
    assert r.exit_code == 0, r.output
    assert "3,000 tokens x 32" in r.output
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"runs_dir: {tmp_path / 'runs'}\nsae:\n  width: 96\n  k: 6\nbatch_size: 200\n")
    r = runner.invoke(app, ["train", str(store), "--config", str(cfg), "--name", "cli", "--tokens", "6000",
                            "--set", "lr=0.003"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "cli"
    assert "width: 96" in (run / "config.yaml").read_text() and "lr: 0.003" in (run / "config.yaml").read_text()
    r = runner.invoke(app, ["eval", str(run), "--tokens", "800", "--ce-tokens", "300", "--set",
                            f"text={text_jsonl}", "--set", "ctx_len=64"])
    assert r.exit_code == 0, r.output
    assert "ce_loss_recovered" in r.output
    assert json.loads((run / "eval.json").read_text())["hook"] == "mlp_out.2"


def test_clear_errors(tiny_model_dir, text_jsonl, tmp_path):
    r = runner.invoke(app, ["harvest", "--model", str(tiny_model_dir), "--hook", "resid_post.9",
                            "--text", str(text_jsonl), "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "out of range" in r.output and "resid_pre.0" in r.output
    r = runner.invoke(app, ["harvest", "--model", str(tmp_path / "nothing-here.gguf")])
    assert r.exit_code == 2 and "nothing-here.gguf" in r.output
    r = runner.invoke(app, ["train", str(tmp_path / "no-store")])
    assert r.exit_code == 2 and "not an activation store" in r.output
    r = runner.invoke(app, ["train", "x", "--set", "sae.k=0"])
    assert r.exit_code == 2 and "sae.k" in r.output
    r = runner.invoke(app, ["train", "x", "--arch", "sparse-magic"])
    assert r.exit_code == 2 and "valid: relu, topk, batchtopk, jumprelu, gated, matryoshka, panneal" in r.output
    r = runner.invoke(app, ["train", "x", "--set", "sae.sparsity_coef=-0.5"])
    assert r.exit_code == 2 and "sae.sparsity_coef" in r.output
    r = runner.invoke(app, ["harvest", "--list-hooks", "--model", str(tiny_model_dir)])
    assert r.exit_code == 0 and "resid_post.2" in r.output.split()


def test_harvest_many_hooks_from_the_cli(tiny_model_dir, text_jsonl, tmp_path):
    r = runner.invoke(app, ["harvest", "--model", str(tiny_model_dir), "--hook", "mlp_in.1,blocks.1.hook_mlp_out",
                            "--text", str(text_jsonl), "--tokens", "500", "--out", str(tmp_path / "s"),
                            "--set", "ctx_len=64", "--set", "exclude_tokens=['Ġ']"])
    assert r.exit_code == 0, r.output
    assert r.output.count("500 tokens x 32") == 2
    m = json.loads((tmp_path / "s" / "mlp_out.1" / "manifest.json").read_text())
    assert m["hooks"] == ["mlp_in.1", "mlp_out.1"] and m["excluded"]["listed"] > 0
    r = runner.invoke(app, ["harvest", "--model", str(tiny_model_dir), "--hook", "resid_mid.0", "--text",
                            str(tmp_path / "nope.parquet")])
    assert r.exit_code == 2 and "nope.parquet" in r.output
