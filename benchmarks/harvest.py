"""Harvest and store-read throughput (run by hand; results go into docs/benchmarks.md).

1. Harvest tokens/s on the embedded model vs a bare forward stopped at the same layer on
   the same batches (capture of the hook alone: no tokenizing, masking, copying or
   writing). Harvest time includes tokenizing, the store writes, checksums and fsync, so
   the ratio is conservative. Also with several hook points at that layer in one pass.
   Under a shared machine's noise the two timings can be compared more robustly inside one
   harvest: `--skip read --forward-share` times the forward (`capture`) calls within the
   harvest itself and reports their share of its wall time (1 - share = the overhead). Since
   the store writes run on a background thread (2026-12-07) that work overlaps the forward, so
   the share no longer isolates the overhead: compare wall times against the bare forward.
2. Store read throughput: shuffled float32 batches/s and GB/s from iter_batches (with and
   without the prefetch thread) vs what the trainer consumes (tokens/s of `train` on the
   same store, TopK width 4608, k 32, batch 4096).

Runs alternate (bare, harvest, bare, harvest, ...) so machine noise hits both; medians.

    SAELAB_CACHE=... PYTHONPATH=src python benchmarks/harvest.py --tokens 32768 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from saelab.activations import rows as rows_mod
from saelab.activations.harvest import HarvestConfig, harvest
from saelab.activations.store import StoreWriter
from saelab.data.corpus import iter_documents
from saelab.data.tokens import batches, budgeted, contexts, excluded_ids, shuffled
from saelab.models.hooks import HookPoint, capture
from saelab.models.load import load_model
from saelab.saes.config import SAEConfig
from saelab.train.trainer import TrainConfig, train


def bench_harvest(args, loaded, out: Path) -> dict:
    hook = HookPoint.parse(args.hook)
    many = [f"{k}.{hook.layer}" for k in ("resid_mid", "mlp_in", "mlp_out", "resid_post")]
    cfg = HarvestConfig(model="smollm2", hook=args.hook, tokens=args.tokens, ctx_len=args.ctx_len,
                        batch_size=args.batch_size, dtype=args.dtype, out=str(out / "h"))
    tok = loaded.tokenizer
    docs = shuffled(iter_documents(cfg.text, cfg.split, cfg.text_field), cfg.seed)
    ctxs = budgeted(contexts(docs, tok, cfg.ctx_len, cfg.prepend_bos, cfg.long_docs),
                    excluded_ids(tok, cfg.exclude_special, cfg.exclude_tokens), cfg.tokens)
    the_batches = list(batches(ctxs, cfg.batch_size, tok.pad_token_id))  # the harvest's own batches
    times: dict[str, list[float]] = {"bare": [], "harvest": [], "harvest_4_hooks": []}
    capture(loaded.model, [hook], the_batches[0].input_ids, the_batches[0].attention_mask)  # warm up
    for _ in range(args.repeats):
        t = time.perf_counter()
        for b in the_batches:
            capture(loaded.model, [hook], b.input_ids, b.attention_mask)
        times["bare"].append(time.perf_counter() - t)
        for name, hooks in (("harvest", args.hook), ("harvest_4_hooks", many)):
            shutil.rmtree(out / "h", ignore_errors=True)
            t = time.perf_counter()
            harvest(cfg.model_copy(update={"hook": hooks}), loaded=loaded, progress=False)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"hook": args.hook, "many_hooks": many, "tokens": args.tokens, "batches": len(the_batches),
            "runs_seconds": times,
            **{f"{k}_tokens_per_s": round(args.tokens / v, 1) for k, v in med.items()},
            "harvest_vs_bare": round(med["bare"] / med["harvest"], 3),
            "harvest_4_hooks_vs_bare": round(med["bare"] / med["harvest_4_hooks"], 3)}


def bench_forward_share(args, loaded, out: Path) -> dict:
    """Share of each harvest's wall time spent in the forward pass, measured inside it."""
    hook = HookPoint.parse(args.hook)
    many = [f"{k}.{hook.layer}" for k in ("resid_mid", "mlp_in", "mlp_out", "resid_post")]
    real, spent = rows_mod.capture, [0.0]  # the forward the harvest runs (through kept_rows)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    rows_mod.capture = timed
    res: dict = {}
    try:
        for name, hooks in (("1_hook", args.hook), ("4_hooks", many)):
            shares = []
            for _ in range(args.repeats):
                shutil.rmtree(out / "fs", ignore_errors=True)
                spent[0], t = 0.0, time.perf_counter()
                harvest(HarvestConfig(model="smollm2", hook=hooks, tokens=args.tokens, ctx_len=args.ctx_len,
                                      batch_size=args.batch_size, dtype=args.dtype, out=str(out / "fs")),
                        loaded=loaded, progress=False)
                shares.append(round(spent[0] / (time.perf_counter() - t), 4))
            res[name] = {"forward_share_runs": shares, "forward_share_median": statistics.median(shares)}
    finally:
        rows_mod.capture = real
    return res


def bench_read(args, out: Path) -> dict:
    d, rows = 576, args.read_rows
    path = out / "read-store"
    shutil.rmtree(path, ignore_errors=True)
    w = StoreWriter(path, {"model": "synthetic", "hook": "resid_post.10", "d_in": d, "dtype": "float32",
                           "config_hash": "bench"}, 32_768)
    g = torch.Generator().manual_seed(0)
    for s in range(0, rows, 8192):
        n = min(8192, rows - s)
        w.add(torch.randn(n, d, generator=g), torch.zeros(n), torch.zeros(n), torch.arange(n), {}, contexts=1)
    store = w.finish(["synthetic"])
    res: dict = {"rows": rows, "d_in": d, "batch_size": args.train_batch, "shards": len(store.shards)}
    for prefetch in (0, 2):
        runs = []
        for epoch in range(args.repeats):
            t, n = time.perf_counter(), 0
            for b in store.iter_batches(args.train_batch, seed=0, epoch=epoch, prefetch=prefetch):
                n += b.shape[0]
            runs.append((time.perf_counter() - t, n))
        sec = statistics.median(r[0] for r in runs)
        n = runs[0][1]
        res[f"prefetch{prefetch}"] = {"batches_per_s": round(n / args.train_batch / sec, 2),
                                      "tokens_per_s": round(n / sec), "GB_per_s": round(n * d * 4 / sec / 1e9, 3)}
    steps = args.train_steps
    tps = []
    for r in range(args.repeats):
        run = train(TrainConfig(store=str(path), name=f"bench{r}", runs_dir=str(out / "runs"),
                                sae=SAEConfig(width=4608, k=32), tokens=steps * args.train_batch,
                                batch_size=args.train_batch, log_every=steps, checkpoint_every=10**6,
                                b_dec_init="mean"), progress=False)
        tps.append(run.summary()["tokens_per_second"])
        shutil.rmtree(run.path)
    res["train_tokens_per_s"] = statistics.median(tps)
    res["train_runs_tokens_per_s"] = tps
    res["read_vs_train"] = round(res["prefetch2"]["tokens_per_s"] / res["train_tokens_per_s"], 1)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32_768)
    p.add_argument("--hook", default="resid_post.10")
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read-rows", type=int, default=262_144)
    p.add_argument("--train-batch", type=int, default=4096)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--out", default="/tmp/saelab-bench")
    p.add_argument("--skip", choices=["harvest", "read"], default=None)
    p.add_argument("--forward-share", action="store_true", help="time the forward inside the harvest instead")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "args": vars(args)}
    if args.skip != "harvest":
        loaded = load_model("smollm2", dtype=args.dtype)
        result["harvest"] = (bench_forward_share if args.forward_share else bench_harvest)(args, loaded, out)
    if args.skip != "read":
        result["read"] = bench_read(args, out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
