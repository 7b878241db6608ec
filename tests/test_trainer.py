import pytest
import torch
from safetensors.torch import load_file
from tiny import drop_fields

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.runs.rundir import RunExistsError
from saelab.saes.config import SAEConfig
from saelab.train import trainer as trainer_mod
from saelab.train.trainer import NonFiniteLossError, TrainConfig, contiguous_alias, lr_factor, train


@pytest.fixture(scope="module")
def store(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    return harvest(HarvestConfig(model=str(tiny_model_dir), hook="resid_post.1", text=str(text_jsonl),
                                 tokens=6000, ctx_len=64, batch_size=8, shard_tokens=1000, out=str(out)),
                   loaded=tiny_loaded, progress=False)


def _cfg(store, tmp_path, **kw):
    base = dict(store=str(store.path), runs_dir=str(tmp_path / "runs"), name="t",
                sae=SAEConfig(width=128, k=8, dead_tokens=2000), tokens=30_000, batch_size=256,
                lr=3e-3, log_every=5, checkpoint_every=20)
    return TrainConfig(**{**base, **kw})


def test_training_reduces_fvu_and_writes_the_run_dir(store, tmp_path):
    run = train(_cfg(store, tmp_path), progress=False)
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "manifest.json", "checkpoint/sae.safetensors",
              "checkpoint/cfg.json"):
        assert (run.path / f).is_file(), f
    assert not run.state_file.exists()
    rows = run.metrics()
    assert rows[-1]["fvu"] < 0.5 * rows[0]["fvu"] and rows[-1]["fvu"] < 0.3
    s = run.summary()
    assert s["steps"] == 30_000 // 256 and s["d_in"] == 32 and s["hook"] == "resid_post.1"
    m = __import__("json").loads((run.path / "manifest.json").read_text())
    assert m["seed"] == 0 and m["versions"]["torch"] and m["hardware"]["cores"] and "commit" in m["git"]


def test_finished_run_is_reused_and_other_config_refused(store, tmp_path):
    run = train(_cfg(store, tmp_path, tokens=3000), progress=False)
    stamp = run.summary_file.stat().st_mtime_ns
    train(_cfg(store, tmp_path, tokens=3000), progress=False)
    assert run.summary_file.stat().st_mtime_ns == stamp
    with pytest.raises(RunExistsError, match="different config"):
        train(_cfg(store, tmp_path, tokens=4000), progress=False)


def test_killed_run_resumes_bit_identical(store, tmp_path, monkeypatch):
    whole = train(_cfg(store, tmp_path, name="whole"), progress=False)
    real = trainer_mod.RunDir.append_metrics
    calls = {"n": 0}

    def dying(self, row):
        real(self, row)
        calls["n"] += 1
        if calls["n"] == 11:  # step 55: after the checkpoint at step 40
            raise KeyboardInterrupt("kill -9")

    monkeypatch.setattr(trainer_mod.RunDir, "append_metrics", dying)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(store, tmp_path, name="killed"), progress=False)
    monkeypatch.setattr(trainer_mod.RunDir, "append_metrics", real)
    killed_dir = tmp_path / "runs" / "killed"
    assert (killed_dir / "train_state.pt").is_file() and not (killed_dir / "summary.json").exists()
    resumed = train(_cfg(store, tmp_path, name="killed"), progress=False)
    a = load_file(whole.checkpoint_dir / "sae.safetensors")
    b = load_file(resumed.checkpoint_dir / "sae.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in resumed.metrics()] == [r["step"] for r in whole.metrics()]


def test_d_in_mismatch_names_both_sizes(store, tmp_path):
    with pytest.raises(ValueError, match=r"SAE d_in 64 does not match .* d_in 32"):
        train(_cfg(store, tmp_path, sae=SAEConfig(d_in=64, width=128, k=8)), progress=False)


def test_nan_loss_stops_with_step_and_saves_state(store, tmp_path, monkeypatch):
    real = trainer_mod.StorePair.batches

    def poisoned(self, *a, **k):
        for i, (x, y) in enumerate(real(self, *a, **k)):
            yield (x * float("nan"), y * float("nan")) if i == 7 else (x, y)

    monkeypatch.setattr(trainer_mod.StorePair, "batches", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        train(_cfg(store, tmp_path, name="nan"), progress=False)
    state = torch.load(tmp_path / "runs" / "nan" / "train_state.pt", weights_only=True)
    assert state["step"] == 7 and all(torch.isfinite(v).all() for v in state["sae"].values())


def test_store_smaller_than_a_batch(store, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(_cfg(store, tmp_path, batch_size=10_000), progress=False)


def test_lr_schedule():
    assert lr_factor(0, 100, 10, 0.8) == pytest.approx(0.1)
    assert lr_factor(50, 100, 10, 0.8) == 1.0
    assert lr_factor(90, 100, 10, 0.8) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, 0.8) == pytest.approx(0.05)


def test_fused_adam_on_a_contiguous_alias_updates_the_transposed_parameter():
    """W_enc is a transposed view; the optimizer steps a contiguous alias of the same storage."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40, 12).t())  # [12, 40], strides (1, 12)
    ref = torch.nn.Parameter(p.detach().contiguous())  # a copy in the usual layout
    alias = contiguous_alias(p)
    assert alias is not p and alias.data_ptr() == p.data_ptr() and alias.is_contiguous()
    assert contiguous_alias(ref) is ref  # contiguous parameters are used as they are
    fused = torch.optim.Adam([alias], lr=1e-2, fused=True)
    plain = torch.optim.Adam([ref], lr=1e-2, foreach=False)
    for _ in range(3):
        g = torch.randn(12, 40)
        p.grad, ref.grad = g.t().contiguous().t(), g.clone()  # p's gradient has p's layout
        alias.grad = p.grad.t()
        fused.step()
        plain.step()
    assert torch.allclose(p, ref, rtol=1e-6, atol=1e-7) and not torch.equal(p, torch.zeros_like(p))


def test_resume_reads_optimizer_state_saved_in_the_parameter_layout(tmp_path):
    """States saved before the alias existed are [d_in, width]; same numel, so fused Adam would
    silently misread them: they are transposed on load, and other shapes are refused."""
    from saelab.runs.rundir import RunDir
    from saelab.train.trainer import OptimFields, Trainer

    torch.manual_seed(0)
    x = torch.randn(512, 16)
    cfg = OptimFields(batch_size=128, lr=1e-2, b_dec_init="mean", warmup_steps=0, log_every=10**9,
                      checkpoint_every=10**9)
    sae_cfg = SAEConfig(d_in=16, width=64, k=4)

    def resumed_step(state):
        run = RunDir(tmp_path / f"r{len(list(tmp_path.iterdir()))}")
        run.path.mkdir()
        torch.save(state, run.state_file)
        t = Trainer(sae_cfg, cfg, run, 10, (x, x))
        t.step(x[128:256])
        return t.sae.W_enc.detach().clone()

    first = RunDir(tmp_path / "first")
    first.path.mkdir()
    t = Trainer(sae_cfg, cfg, first, 10, (x, x))
    t.step(x[:128])
    t.save_state()
    state = torch.load(first.state_file, weights_only=True)
    new = resumed_step(state)
    i = [n for n, _ in t.sae.named_parameters()].index("W_enc")
    for key in ("exp_avg", "exp_avg_sq"):
        state["opt"]["state"][i][key] = state["opt"]["state"][i][key].t()  # the old layout
    assert torch.equal(resumed_step(state), new)
    state["opt"]["state"][i]["exp_avg"] = torch.zeros(8, 128)
    with pytest.raises(ValueError, match="optimizer state 'exp_avg' has shape"):
        resumed_step(state)


@pytest.fixture(scope="module")
def mlp_stores(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path_factory):
    """resid_pre.1 and mlp_out.1 harvested with the same settings: row-aligned stores."""
    root = tmp_path_factory.mktemp("pair")
    common = dict(model=str(tiny_model_dir), text=str(text_jsonl), tokens=6000, ctx_len=64, batch_size=8,
                  shard_tokens=1000)
    pair = [harvest(HarvestConfig(hook=h, out=str(root / h), **common), loaded=tiny_loaded, progress=False)
            for h in ("resid_pre.1", "mlp_out.1")]
    other = harvest(HarvestConfig(hook="mlp_out.1", out=str(root / "seed1"), seed=1, **common),
                    loaded=tiny_loaded, progress=False)  # same size, other document order
    return [*pair, other]


def test_transcoder_with_skip_from_two_stores(mlp_stores, tmp_path):
    src, dst, _ = mlp_stores
    run = train(_cfg(src, tmp_path, store_out=str(dst.path), name="tc",
                     sae=SAEConfig(width=128, k=8, transcoder=True, skip=True)), progress=False)
    s = run.summary()
    assert s["transcoder"] and s["skip"] and s["train_fvu_last"] < 0.5
    ck = load_file(run.checkpoint_dir / "sae.safetensors")
    assert ck["W_skip"].shape == (32, 32) and ck["W_skip"].abs().sum() > 0
    meta = __import__("json").loads((run.checkpoint_dir / "cfg.json").read_text())
    assert meta["hook"] == "resid_pre.1" and meta["hook_out"] == "mlp_out.1"


def test_transcoder_needs_aligned_stores_and_the_flag(mlp_stores, tmp_path):
    src, dst, shuffled = mlp_stores
    with pytest.raises(Exception, match="not row-aligned"):
        train(_cfg(src, tmp_path, store_out=str(shuffled.path), sae=SAEConfig(width=128, k=8, transcoder=True)),
              progress=False)
    with pytest.raises(ValueError, match="set sae.transcoder=true"):
        train(_cfg(src, tmp_path, store_out=str(dst.path)), progress=False)


@pytest.mark.parametrize("arch", ["relu", "batchtopk", "jumprelu", "gated", "matryoshka", "panneal"])
def test_every_architecture_trains_from_a_store(arch, store, tmp_path):
    sae = SAEConfig(architecture=arch, width=128, k=8, sparsity_coef={"jumprelu": 0.05}.get(arch))
    run = train(_cfg(store, tmp_path, name=arch, sae=sae, tokens=20_000, lr=2e-3), progress=False)
    rows = run.metrics()
    assert rows[-1]["fvu"] < rows[0]["fvu"] and rows[-1]["l0"] > 0
    from saelab.saes import load_sae
    loaded, _ = load_sae(run.checkpoint_dir)
    assert loaded.cfg.architecture == arch


def test_normalisation_is_folded_and_validation_logged(store, tmp_path):
    run = train(_cfg(store, tmp_path, name="norm", val_store=str(store.path), val_every=20, optimizer="signum",
                     lr=1e-3), progress=False)
    from saelab.saes import load_sae
    sae, meta = load_sae(run.checkpoint_dir)
    assert meta["normalization"]["folded"] and meta["normalization"]["training_scale_in"] != 1.0
    vals = [r for r in run.metrics() if "val_fvu" in r]
    assert len(vals) == 5 and vals[-1]["val_fvu"] < vals[0]["val_fvu"]
    x = store.all_acts(max_rows=2000)  # raw activations in, raw reconstruction out
    fvu = ((x - sae.reconstruct(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu < 0.6 and abs(fvu - vals[-1]["val_fvu"]) < 0.1


def _fly_cfg(tiny_model_dir, text_jsonl, tmp_path, **kw):
    from saelab.train.fly import FlySAE, FlyTrainConfig

    base = dict(model=str(tiny_model_dir), text=str(text_jsonl), ctx_len=64, model_batch_size=8,
                buffer_tokens=1024, tokens=256 * 40, batch_size=256, lr=3e-3, runs_dir=str(tmp_path / "fly"),
                log_every=5, checkpoint_every=15,
                saes=[FlySAE(name="sae", hook="resid_post.1", sae=SAEConfig(width=128, k=8)),
                      FlySAE(name="tc", hook="resid_pre.2", hook_out="mlp_out.2",
                             sae=SAEConfig(architecture="relu", width=128, transcoder=True, sparsity_coef=0.05))])
    return FlyTrainConfig(**{**base, **kw})


def test_on_the_fly_trains_several_saes_from_one_pass(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path, monkeypatch):
    from saelab.activations import rows
    from saelab.train import fly

    calls = {"n": 0}
    real = rows.capture

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(rows, "capture", counting)
    runs = fly.train_on_the_fly(_fly_cfg(tiny_model_dir, text_jsonl, tmp_path), loaded=tiny_loaded, progress=False)
    assert [r.path.name for r in runs] == ["sae", "tc"] and all(r.complete for r in runs)
    for r in runs:
        rows = r.metrics()
        assert rows[-1]["fvu"] < rows[0]["fvu"] and r.summary()["steps"] == 40
    meta = __import__("json").loads((runs[1].checkpoint_dir / "cfg.json").read_text())
    assert (meta["hook"], meta["hook_out"]) == ("resid_pre.2", "mlp_out.2")
    # one capture per model batch serves both SAEs: 40 steps x 256 rows need ~10k rows of ~60 per context
    assert calls["n"] < 40


def test_on_the_fly_resume_is_exact(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path, monkeypatch):
    from saelab.train import fly

    whole = fly.train_on_the_fly(_fly_cfg(tiny_model_dir, text_jsonl, tmp_path / "a"), loaded=tiny_loaded,
                                 progress=False)
    real = fly.Trainer.step
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2 * 20 + 1:  # step 20 of the first SAE: after the checkpoint at step 15
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(fly.Trainer, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        fly.train_on_the_fly(_fly_cfg(tiny_model_dir, text_jsonl, tmp_path / "b"), loaded=tiny_loaded, progress=False)
    monkeypatch.setattr(fly.Trainer, "step", real)
    resumed = fly.train_on_the_fly(_fly_cfg(tiny_model_dir, text_jsonl, tmp_path / "b"), loaded=tiny_loaded,
                                   progress=False)
    for a, b in zip(whole, resumed, strict=True):
        wa, wb = load_file(a.checkpoint_dir / "sae.safetensors"), load_file(b.checkpoint_dir / "sae.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_9_then_resume_via_cli_is_bit_identical(store, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from typer.testing import CliRunner

    from saelab.cli import app

    cfg = _cfg(store, tmp_path, name="killed", tokens=256 * 300, checkpoint_every=20)
    cfg.save(tmp_path / "train.yaml")
    cmd = [sys.executable, "-m", "saelab.cli", "train", "--config", str(tmp_path / "train.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    state = tmp_path / "runs" / "killed" / "train_state.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (tmp_path / "runs" / "killed" / "summary.json").exists()
    runner = CliRunner()
    refused = runner.invoke(app, ["train", "--config", str(tmp_path / "train.yaml")])
    assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = runner.invoke(app, ["train", "--config", str(tmp_path / "train.yaml"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    whole = train(cfg.model_copy(update={"name": "whole"}), progress=False)
    a = load_file(whole.checkpoint_dir / "sae.safetensors")
    b = load_file(tmp_path / "runs" / "killed" / "checkpoint" / "sae.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wandb_logging_in_offline_mode(store, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # a dev extra; training never requires it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(_cfg(store, tmp_path, name="wb", tokens=256 * 20, wandb=True), progress=False)
    offline = list((run.path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert run.complete


def test_wandb_missing_is_a_clear_error(store, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ValueError, match="pip install wandb"):
        train(_cfg(store, tmp_path, name="nowb", tokens=256 * 5, wandb=True), progress=False)


def _interrupt_at_step(cfg, n: int) -> None:
    """Train until step n, then stop as a kill would (the last checkpoint stays on disk)."""
    real, calls = trainer_mod.Trainer.step, {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    trainer_mod.Trainer.step = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    finally:
        trainer_mod.Trainer.step = real


def test_a_field_added_with_a_default_does_not_lock_out_an_old_run(store, tmp_path):
    """An older config.yaml lacks fields added since (here: device, ledger, notes, val_every,
    sae.encoder_init_norm): the same run is reused, an interrupted one resumes; a real change is refused."""
    done = train(_cfg(store, tmp_path), progress=False)
    drop_fields(done.config_file, ["device", "ledger", "ledger_id", "notes", "val_every", "sae.encoder_init_norm"])
    stamp = done.summary_file.stat().st_mtime_ns
    assert train(_cfg(store, tmp_path), progress=False).summary_file.stat().st_mtime_ns == stamp
    with pytest.raises(RunExistsError):
        train(_cfg(store, tmp_path, lr=1e-3), progress=False)
    # an interrupted run of an older version resumes
    cfg = _cfg(store, tmp_path, name="killed", checkpoint_every=10)
    _interrupt_at_step(cfg, 25)
    run_dir = tmp_path / "runs" / "killed"
    drop_fields(run_dir / "config.yaml", ["device", "notes"])
    assert train(cfg, progress=False, resume=True).complete


def test_train_state_is_saved_device_independent(store, tmp_path):
    """Every tensor of the resumable state is on the CPU, so a run resumes on another device."""
    cfg = _cfg(store, tmp_path, name="state", checkpoint_every=10, device="cpu")
    _interrupt_at_step(cfg, 15)
    state = torch.load(tmp_path / "runs" / "state" / "train_state.pt", weights_only=True)

    def devices(obj):
        if torch.is_tensor(obj):
            yield obj.device.type
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from devices(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                yield from devices(v)

    assert set(devices(state)) == {"cpu"}
    run = train(cfg.model_copy(update={"device": "auto"}), progress=False, resume=True)  # reused across devices
    assert run.complete and run.summary()["device"] == "cpu"


def test_named_loss_terms_are_logged_per_architecture(store, tmp_path):
    expect = {"topk": {"loss_fvu", "loss_auxk"}, "relu": {"loss_mse", "loss_l1"}, "jumprelu": {"loss_mse", "loss_l0"},
              "gated": {"loss_mse", "loss_l1", "loss_aux_gate"}, "panneal": {"loss_mse", "loss_lp"},
              "matryoshka": {"loss_fvu_prefix_mean", "loss_auxk"}}
    for arch, terms in expect.items():
        run = train(_cfg(store, tmp_path, name=f"terms-{arch}", tokens=2560,
                         sae=SAEConfig(architecture=arch, width=128, k=8)), progress=False)
        row = run.metrics()[-1]
        assert terms <= set(row) and "aux_loss" not in row, (arch, row)
        assert set(run.summary()["train_loss_terms_last"]) == {t.removeprefix("loss_") for t in terms}
