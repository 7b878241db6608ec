"""The device setting, tested on the CPU (CI has no GPU): parsing and refusals, configs round-trip,
the plain (non-CPU) kernel paths equal the fused ones, and no code moves tensors with .cuda()."""

import re
from pathlib import Path

import pytest
import torch

from saelab.device import (
    check_fits,
    describe,
    dist_backend,
    peak_memory_bytes,
    resolve_device,
    select_dtype,
)
from saelab.saes.sparse_ops import selected_values
from saelab.train.trainer import TrainConfig, train_bytes

SRC = Path(__file__).resolve().parents[1] / "src" / "saelab"


def test_device_names_are_parsed_and_refused_clearly(monkeypatch):
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(" CPU ")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match="asks for a GPU, but torch sees none"):
            resolve_device(name)
    for bad in ("gpu", "cuda:x", "tpu:0", ""):
        with pytest.raises(ValueError, match="is not one of auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


def test_torchrun_ranks_pick_their_local_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2) == resolve_device("cuda")
    with pytest.raises(ValueError, match="would put every rank on one GPU"):
        resolve_device("cuda:3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="has 4 GPU"):
        resolve_device("cuda:7")
    assert dist_backend(torch.device("cuda", 2)) == "nccl" and dist_backend(torch.device("cpu")) == "gloo"


def test_every_stage_config_takes_a_device_and_round_trips_it(tmp_path):
    from saelab.activations.harvest import HarvestConfig
    from saelab.experiments.evaluate import EvalConfig
    from saelab.experiments.quickstart import QuickstartConfig
    from saelab.train.fly import FlySAE, FlyTrainConfig

    for cfg in (HarvestConfig(device="cuda:1"), TrainConfig(store="s", device="cuda:1"),
                FlyTrainConfig(saes=[FlySAE(name="a", hook="resid_post.1")], device="cuda:1"),
                EvalConfig(run="r", device="cuda:1"), QuickstartConfig(device="cuda:1")):
        cfg.save(tmp_path / "c.yaml")
        again = type(cfg).load(tmp_path / "c.yaml")
        assert again.device == "cuda:1" and again == cfg
        assert again.hash() == cfg.model_copy(update={"device": "cpu"}).hash()  # not part of the work
    with pytest.raises(ValueError, match="device: Value error, device 'gpu' is not one of"):
        TrainConfig.from_dict({"store": "s", "device": "gpu"})


def test_auto_select_dtype_is_chosen_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert select_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert select_dtype("auto", "cuda") == torch.float32  # never the CPU's AVX512-BF16 test
    native = torch.cpu._is_avx512_bf16_supported()
    assert select_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)


def test_the_plain_kernel_path_equals_the_fused_one(monkeypatch):
    """Off the CPU the selected values come from a chunked gather, not the private fused op."""
    from saelab.saes import sparse_ops

    g = torch.Generator().manual_seed(0)
    x, W_t, b = torch.randn(64, 24, generator=g), torch.randn(96, 24, generator=g), torch.randn(96, generator=g)
    k = 5
    cols = torch.randint(0, 96, (64 * k,), generator=g)
    rows, offsets = torch.arange(64).repeat_interleave(k), torch.arange(0, 64 * k, k)
    fused = selected_values(x, W_t, b, rows, cols, offsets)
    monkeypatch.setattr(sparse_ops, "fused_kernels", lambda t: False)
    plain = selected_values(x, W_t, b, rows, cols, offsets)
    assert torch.allclose(fused, plain, atol=1e-5) and torch.allclose(plain, (x[rows] * W_t[cols]).sum(-1) + b[cols])


def test_nothing_moves_tensors_with_dot_cuda():
    """Devices come from the config (saelab.device); a bare .cuda() would ignore it."""
    hits = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\.cuda\(\s*\)", line)]
    assert hits == []


def test_memory_estimate_and_refusal(monkeypatch):
    from saelab import device
    from saelab.saes.config import SAEConfig

    need = train_bytes(SAEConfig(d_in=576, width=9216, k=32), 4096)
    assert 0.5e9 < need < 2e9
    check_fits(torch.device("cpu"), 10**15, "x", "y")  # on the CPU the OS decides: nothing refused
    monkeypatch.setattr(device, "free_bytes", lambda d: 2**30)
    monkeypatch.setattr(device, "describe", lambda d: "cuda:0 (test GPU)")
    with pytest.raises(ValueError, match=r"training needs about 2.0 GiB on cuda:0 \(test GPU\), which has 1.0 GiB "
                                         r"free; lower batch_size"):
        device.check_fits(torch.device("cuda", 0), 2 * 2**30, "training", "lower batch_size")
    assert describe(torch.device("cpu")) == "cpu" and peak_memory_bytes(torch.device("cpu")) > 10**7
