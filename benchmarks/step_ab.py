"""One training step (forward, backward, decoder-row projection) of this tree's saelab against
another git revision's, interleaved in one process on the same weights and the same batch.

Separate processes on a shared machine drift by 10% and more between runs (docs/benchmarks.md);
here the two versions alternate step by step (ABBA order), so a slow phase hits both and the
median of the per-pair ratios isolates the code change. The other revision's `src/saelab` is
copied to a temporary folder and renamed `saelab_ref` (imports rewritten), so both load side by
side. Threshold coders start calibrated (benchmarks/train.py `calibrate`) and the weights stay
fixed (no optimizer step), so every timed step runs at the same density. Also reports the
largest relative gradient difference between the two versions.

  python benchmarks/step_ab.py --rev 7e111df --store STORE --archs topk,relu,jumprelu,gated,panneal
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_revision(rev: str) -> str:
    """Import `rev`'s saelab as `saelab_ref`; returns the resolved commit."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    dest = Path(tempfile.mkdtemp()) / "saelab_ref"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", commit, "src/saelab"],
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{f}"], capture_output=True,
                              check=True).stdout
        out = dest / Path(f).relative_to("src/saelab")
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.endswith(".py"):
            blob = re.sub(rb"\bsaelab(?=[. ])", b"saelab_ref", blob)
        out.write_bytes(blob)
    sys.path.insert(0, str(dest.parent))
    return commit


def step(sae, x: torch.Tensor, ctx) -> float:
    """Seconds for one forward, backward and decoder-row projection."""
    t0 = time.perf_counter()
    sae.zero_grad(set_to_none=True)
    sae(x, x, ctx).loss.backward()
    if sae.unit_norm_decoder:
        sae.remove_parallel_decoder_grad()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the git revision to compare against (e.g. HEAD~1)")
    ap.add_argument("--store", required=True, help="an activation store with d_in 576 (the quickstart's)")
    ap.add_argument("--archs", default="topk,relu,jumprelu,gated,panneal")
    ap.add_argument("--pairs", type=int, default=15, help="timed steps per version")
    ap.add_argument("--density", type=float, default=0.005, help="calibrated firing rate of threshold coders")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    commit = load_revision(args.rev)
    import train as bench  # benchmarks/train.py: the same trainer set-up and calibration

    ref_saes = importlib.import_module("saelab_ref.saes")
    ref_base = importlib.import_module("saelab_ref.saes.base")
    ref_config = importlib.import_module("saelab_ref.saes.config")
    from saelab.activations.store import ActivationStore
    from saelab.saes.base import LossContext

    data = ActivationStore(args.store).all_acts(max_rows=bench.BATCH + 8192)
    results = {}
    for arch in [a for a in args.archs.split(",") if a]:
        density = args.density if arch in bench.THRESHOLD_ARCHS else None
        t = bench.saelab_trainer(arch, data[:8192], 1e-4, 100, 10**9, density=density)
        new = t.sae
        ref = ref_saes.build_sae(ref_config.SAEConfig(**new.cfg.model_dump()), seed=0)
        ref.load_state_dict(new.state_dict())
        x = data[8192:8192 + bench.BATCH] * t.s_in  # [batch, d_in], normalised as the trainer does
        tv = (x - x.mean(0)).pow(2).sum()
        ctx = {"ref": ref_base.LossContext(tv, x.shape[0], sparsity_scale=1.0, progress=0.5),
               "new": LossContext(tv, x.shape[0], sparsity_scale=1.0, progress=0.5)}
        saes = {"ref": ref, "new": new}

        for k in ("ref", "new", "ref", "new"):  # warm-up; a threshold coder measures its density first
            step(saes[k], x, ctx[k])
        ts: dict[str, list[float]] = {"ref": [], "new": []}
        for i in range(args.pairs):
            for k in ("ref", "new") if i % 2 == 0 else ("new", "ref"):
                ts[k].append(step(saes[k], x, ctx[k]))
        ratios = [a / b for a, b in zip(ts["ref"], ts["new"], strict=True)]
        grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        rel = max(float((grads[n] - p.grad).norm() / grads[n].norm().clamp_min(1e-30))
                  for n, p in new.named_parameters() if n in grads)
        results[arch] = {"ref_ms": round(statistics.median(ts["ref"]) * 1000, 1),
                         "new_ms": round(statistics.median(ts["new"]) * 1000, 1),
                         "median_pair_ratio_ref_over_new": round(statistics.median(ratios), 3),
                         "path": new.last_path if density else "topk kernel",
                         "density": new.density if density else None,
                         "max_rel_grad_diff": rel}
        print(arch, json.dumps(results[arch]), flush=True)
    report = {"rev": args.rev, "commit": commit, "pairs": args.pairs, "threads": torch.get_num_threads(),
              "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
