"""Batched latent ablation vs one full pass per latent (run by hand; results in docs/benchmarks.md).

N latents (the top N by mean activation on the text) are zero- (or mean-) ablated one at a time
on C contexts of the embedded corpus's validation split, with the SAE spliced in and its error
kept, two ways:

- separate passes: for each latent, one full forward pass of the model over the C contexts with
  the ablation patched in at the hook (`saelab.intervene.ablate.full_pass_ce`), plus one clean
  pass. These reuse the cached latents instead of encoding inside the hook, which only favours them.
- batched: `saelab.intervene.ablate.ablate`, the whole stage computation (one caching pass to the
  hook, a clean pass of the blocks after the hook, then for each latent only the contexts where it
  fired, through the blocks after the hook only, `rows` contexts per forward; plus the bootstrap
  CIs, moved tokens and logit lens).

Both give Delta CE per latent; the largest difference between them is reported. The separate
passes are timed one by one (total and median per pass); the batched run `--repeats` times
(median). Output: a JSON record (stdout, and --out).

    PYTHONPATH=src python benchmarks/ablate.py --run runs/quickstart-XXXX --latents 100 --contexts 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from saelab.device import describe, resolve_device
from saelab.experiments.evaluate import coder_positions
from saelab.intervene.ablate import AblateSettings, ablate, cache, full_pass_ce
from saelab.models.hooks import resolve
from saelab.models.load import load_model
from saelab.saes.base import load_sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a run directory with checkpoint/ (e.g. the quickstart's)")
    ap.add_argument("--latents", type=int, default=100, help="ablate the top N latents, one at a time")
    ap.add_argument("--contexts", type=int, default=8, help="eval contexts (one batch)")
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=8, help="ablated contexts per forward (batched engine)")
    ap.add_argument("--mode", choices=["zero", "mean"], default="zero")
    ap.add_argument("--repeats", type=int, default=3, help="batched runs (median)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    sae, meta = load_sae(Path(args.run) / "checkpoint")
    loaded = load_model(meta["model"], device=device)
    sae = sae.to(device).eval()
    hp = resolve(loaded.model, meta["hook"])
    positions = coder_positions(meta)
    cfg = AblateSettings(top=args.latents, mode=args.mode, tokens=1, ctx_len=args.ctx_len, batch_size=args.contexts,
                         rows=args.rows, bootstrap=1000)  # tokens=1: the first batch of `contexts` contexts only

    batched, results = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        results = ablate(cfg, sae, loaded, hp, positions, meta["model"], progress=False)
        batched.append(time.perf_counter() - t)

    c = cache(cfg, sae, loaded, hp, positions, None, args.latents)
    t = time.perf_counter()
    clean, n = full_pass_ce(sae, loaded, hp, c, None, args.mode, chunk=args.contexts)
    clean_s = time.perf_counter() - t
    per_pass, diffs = [], []
    for k, x in enumerate(results.latents):
        t = time.perf_counter()
        abl, _ = full_pass_ce(sae, loaded, hp, c, [k], args.mode, chunk=args.contexts)
        per_pass.append(time.perf_counter() - t)
        diffs.append(abs(x.delta_ce.diff - (abl - clean) / n))
    separate = clean_s + sum(per_pass)
    med = statistics.median(batched)
    record = {
        "benchmark": "ablate", "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "device": describe(device), "torch": torch.__version__},
        "model": meta["model"], "hook": str(hp), "sae_width": sae.cfg.width, "mode": args.mode,
        "latents": len(results.latents), "contexts": results.contexts, "scored_tokens": results.tokens,
        "separate_seconds": round(separate, 2), "separate_clean_pass_seconds": round(clean_s, 2),
        "separate_pass_median_seconds": round(statistics.median(per_pass), 3),
        "batched_seconds": [round(x, 2) for x in batched], "batched_median_seconds": round(med, 2),
        "speedup_separate_over_batched": round(separate / med, 2),
        "batched_engine": results.engine, "batched_wall_seconds": results.wall_seconds,
        "max_abs_delta_ce_difference": max(diffs), "mean_fire_fraction": sum(x.fire_fraction for x in results.latents)
        / len(results.latents),
    }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
