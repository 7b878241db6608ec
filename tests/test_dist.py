"""Data-parallel training with torchrun: 2 gloo processes on CPU match 1 process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.saes.config import SAEConfig
from saelab.train.trainer import TrainConfig, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_two_gloo_ranks_match_one_process(arch, tiny_model_dir, tiny_loaded, text_jsonl, tmp_path):
    store = harvest(HarvestConfig(model=str(tiny_model_dir), hook="resid_post.1", text=str(text_jsonl), tokens=4000,
                                  ctx_len=64, batch_size=8, out=str(tmp_path / "s")), loaded=tiny_loaded, progress=False)
    sae = SAEConfig(architecture=arch, width=256, k=8, dead_tokens=1024, sparsity_coef=0.05)
    cfg = TrainConfig(store=str(store.path), runs_dir=str(tmp_path / "runs"), name="ddp", sae=sae, tokens=12_800,
                      batch_size=256, lr=2e-3, log_every=5, checkpoint_every=1000)
    cfg.save(tmp_path / "ddp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), str(Path(__file__).parent / "dist_train.py"),
                           str(tmp_path / "ddp.yaml")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(cfg.model_copy(update={"name": "single"}), progress=False)
    ddp_dir = tmp_path / "runs" / "ddp"
    a, b = load_file(ddp_dir / "checkpoint" / "sae.safetensors"), load_file(single.checkpoint_dir / "sae.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key
    rows_ddp = [json.loads(x) for x in (ddp_dir / "metrics.jsonl").read_text().splitlines()]
    rows_one = single.metrics()
    assert [r["step"] for r in rows_ddp] == [r["step"] for r in rows_one]
    for r, s in zip(rows_ddp, rows_one, strict=True):
        assert r["fvu"] == pytest.approx(s["fvu"], rel=1e-3) and r["l0"] == pytest.approx(s["l0"], rel=1e-3)
        # dead counts are global: each rank sees half the tokens, yet the fractions agree
        assert r["dead_fraction"] == pytest.approx(s["dead_fraction"], abs=1e-3)
    summary = json.loads((ddp_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == single.summary()["tokens"]
    if arch == "topk":  # the comparison covered dead latents (an L1 SAE keeps all alive here)
        assert any(r["dead_fraction"] > 0 for r in rows_one)
