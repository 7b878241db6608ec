"""The interpretation examples pass vs a bare forward (run by hand; results go into docs/benchmarks.md).

All latents of one SAE (the quickstart's by default), examples collected over `--tokens` kept
tokens of the embedded corpus: top contexts, the quantile reservoir, the random pool and the
counts for every latent. Compared with the bare forward stopped at the SAE's hook on the same
batches (`capture` of the hook alone: no masking, no coder). Runs alternate (bare, pass, bare,
pass, ...) so machine noise hits both; medians. Inside each pass the time spent in the model
forward is also measured, so `1 - forward share` is the overhead read where noise hits both
parts alike.

    PYTHONPATH=src python benchmarks/interp_examples.py RUN_DIR --tokens 1000000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from saelab.experiments.evaluate import coder_positions
from saelab.hookpoints import HookPoint
from saelab.interp.examples import ExamplesConfig, collect_examples, context_batches, documents
from saelab.models.hooks import capture
from saelab.models.load import load_model
from saelab.saes.base import load_sae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory holding checkpoint/ (e.g. the quickstart's)")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args()
    sae, meta = load_sae(Path(args.run) / "checkpoint")
    loaded = load_model(meta["model"], dtype=args.dtype)
    hp = HookPoint.parse(meta["hook"])
    positions = coder_positions(meta)
    ctx_len = meta.get("ctx_len") or 128
    cfg = ExamplesConfig(split=args.split, tokens=args.tokens, batch_size=args.batch_size, dtype=args.dtype)
    the_batches = list(context_batches(cfg, documents(cfg), loaded, positions, ctx_len))
    capture(loaded.model, [hp], the_batches[0].input_ids, the_batches[0].attention_mask)  # warm up
    runs: dict[str, list[float]] = {"bare": [], "examples": [], "forward_share": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        with torch.no_grad():
            for b in the_batches:
                capture(loaded.model, [hp], b.input_ids, b.attention_mask)
        runs["bare"].append(time.perf_counter() - t)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        state = collect_examples(cfg, sae, loaded, hp, positions, ctx_len, progress=False, timings=timings)
        wall = time.perf_counter() - t
        runs["examples"].append(wall)
        runs["forward_share"].append(timings["forward"] / wall)
    bare, ex = statistics.median(runs["bare"]), statistics.median(runs["examples"])
    share = statistics.median(runs["forward_share"])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
        "sae": {"architecture": sae.cfg.architecture, "width": sae.cfg.width, "k": sae.cfg.k, "hook": meta["hook"]},
        "tokens": state.tokens, "batches": len(the_batches), "runs_seconds": runs,
        "bare_tokens_per_s": state.tokens / bare, "examples_tokens_per_s": state.tokens / ex,
        "overhead_vs_bare": ex / bare - 1, "overhead_inside_pass": 1 - share,
        "latents_firing": int((state.fire_contexts > 0).sum()),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
