"""On a GPU (marked `gpu`; skipped with the reason where torch sees none, as in CI): training,
the sparse kernels, the core eval and checkpoints match the CPU path within float tolerance."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no GPU: torch.cuda.is_available() is False")]


def test_sparse_kernels_on_cuda_match_the_cpu():
    from saelab.saes.sparse_ops import batch_topk_encode, entry_decode, topk_encode

    g = torch.Generator().manual_seed(0)
    x, W, b, W_dec = (torch.randn(s, generator=g) for s in ((256, 64), (64, 512), (512,), (512, 64)))
    out = {}
    for dev in ("cpu", "cuda"):
        xs, bs = x.to(dev), b.to(dev).requires_grad_()
        Ws, Wd = W.to(dev).requires_grad_(), W_dec.to(dev).requires_grad_()
        vals, idx, ent = topk_encode(xs, Ws, bs, 16)
        entry_decode(vals.reshape(-1), Wd, ent).pow(2).sum().backward()
        rows, cols, v2 = batch_topk_encode(xs, Ws, bs, 16)
        out[dev] = [t.detach().cpu() for t in (vals.sort(-1).values, Ws.grad, bs.grad, Wd.grad, v2.sort().values)]
    for a, c in zip(out["cpu"], out["cuda"], strict=True):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-4 * a.abs().max())


def test_training_and_eval_on_cuda_match_the_cpu(tiny_model_dir, text_jsonl, tmp_path):
    from saelab.activations.harvest import HarvestConfig, harvest
    from saelab.experiments.evaluate import EvalConfig, evaluate
    from saelab.saes import load_sae
    from saelab.saes.config import SAEConfig
    from saelab.train.trainer import TrainConfig, train

    store = harvest(HarvestConfig(model=str(tiny_model_dir), hook="resid_post.1", text=str(text_jsonl), tokens=6000,
                                  ctx_len=64, batch_size=8, out=str(tmp_path / "s"), device="cuda"), progress=False)
    assert "cuda" in store.manifest["device"]
    runs = {}
    for dev in ("cpu", "cuda"):
        runs[dev] = train(TrainConfig(store=str(store.path), runs_dir=str(tmp_path / "runs"), name=dev, device=dev,
                                      sae=SAEConfig(width=128, k=8, topk_select_dtype="float32"), tokens=20_480,
                                      batch_size=256, lr=3e-3), progress=False)
    a, _ = load_sae(runs["cpu"].checkpoint_dir)
    c, _ = load_sae(runs["cuda"].checkpoint_dir)  # saved on the GPU, loaded on the CPU
    assert runs["cuda"].summary()["device"].startswith("cuda") and runs["cuda"].summary()["peak_memory_bytes"] > 0
    assert abs(runs["cpu"].summary()["train_fvu_last"] - runs["cuda"].summary()["train_fvu_last"]) < 0.02
    assert torch.allclose(a.W_dec, c.W_dec, atol=5e-2)
    e = {dev: evaluate(EvalConfig(run=str(runs["cuda"].path), text=str(text_jsonl), tokens=1000, ce_tokens=300,
                                  ctx_len=64, batch_size=8, device=dev, seed={"cpu": 0, "cuda": 1}[dev]),
                       progress=False) for dev in ("cpu", "cuda")}
    assert e["cuda"].device.startswith("cuda") and 0 < e["cuda"].explained_variance < 1
