"""The core eval's CE/KL part, two saelab versions side by side (run by hand; results in
docs/benchmarks.md "Core eval").

Each version is a checkout of saelab (`--impl NAME=PATH/src`, e.g. a `git worktree` of the commit
before the streaming eval and this tree); each measurement is a fresh subprocess that loads the
model and the run's SAE, then times `saelab.evals.core.ce_metrics` over `--ce-tokens` validation
tokens of the embedded corpus (the default eval's batch and context), recording its wall time,
its tokens/s, the peak resident memory over it (VmHWM, reset before) and the CE/KL numbers.
Versions are interleaved over `--repeats`; medians reported, and the largest difference in any
CE/KL number between versions (they must agree). A version named `NAME:reuse` times the eval
of a coder whose SAE-independent passes are already cached (`CEBaseline`, filled untimed in
the same process: what a second coder at the same hook costs).

    python benchmarks/eval.py --run runs/quickstart-XXXX --impl old=/tmp/saelab-old/src --impl new=src \\
        --impl new:reuse=src
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import date

CHILD = r"""
import json, sys, time, torch
from saelab.device import peak_memory_bytes, reset_peak
from saelab.evals.core import CoreConfig, ce_metrics, validation_batches
from saelab.experiments.evaluate import coder_positions
from saelab.models.hooks import resolve
from saelab.models.load import load_model
from saelab.saes.base import load_sae

run, tokens, model_name, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sae, meta = load_sae(run + "/checkpoint")
loaded = load_model(model_name)
hp = resolve(loaded.model, meta["hook"])
positions = coder_positions(meta)
cfg = CoreConfig(ce_tokens=tokens, ctx_len=meta.get("ctx_len"))
mean_act = torch.zeros(sae.cfg.d_in)
kw = {}
if mode == "reuse":  # fill a baseline once (untimed), then time an eval that reuses it
    from saelab.evals.core import CEBaseline
    kw["baseline"] = CEBaseline("bench")
    ce_metrics(sae, loaded, hp, validation_batches(cfg, loaded, positions), tokens, False, mean_act=mean_act,
               positions=positions, **kw)
base = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
reset_peak(torch.device("cpu"))
t = time.perf_counter()
r = ce_metrics(sae, loaded, hp, validation_batches(cfg, loaded, positions), tokens, False, mean_act=mean_act,
               positions=positions, **kw)
wall = time.perf_counter() - t
peak = peak_memory_bytes(torch.device("cpu"))
print(json.dumps({"wall_s": wall, "tokens": r["ce_tokens"], "peak_rss_bytes": peak, "start_rss_bytes": base,
                  "numbers": {k: v for k, v in r.items() if isinstance(v, float)}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory (checkpoint/ with cfg.json)")
    ap.add_argument("--impl", action="append", required=True,
                    help="NAME=PATH: a saelab src/ folder to time; NAME ending in ':reuse' times an eval that "
                    "reuses a CE baseline filled (untimed) in the same process")
    ap.add_argument("--ce-tokens", type=int, default=4096)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    impls = dict(s.split("=", 1) for s in a.impl)
    runs: dict[str, list[dict]] = {k: [] for k in impls}
    for rep in range(a.repeats):
        for name, src in impls.items():
            env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
            mode = "reuse" if name.endswith(":reuse") else "plain"
            out = subprocess.run([sys.executable, "-c", CHILD, a.run, str(a.ce_tokens), a.model, mode], env=env,
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"repeat {rep} {name}: {runs[name][-1]['wall_s']:.1f} s", file=sys.stderr)
    med = {k: {"wall_s": statistics.median(r["wall_s"] for r in v),
               "tokens_per_s": statistics.median(r["tokens"] / r["wall_s"] for r in v),
               "peak_rss_above_start_bytes": statistics.median(r["peak_rss_bytes"] - r["start_rss_bytes"] for r in v),
               "walls_s": [round(r["wall_s"], 2) for r in v]} for k, v in runs.items()}
    names = list(impls)
    first = runs[names[0]][0]["numbers"]
    diff = max(abs(r["numbers"][k] - first[k]) for v in runs.values() for r in v for k in first)
    record = {"benchmark": "core eval CE/KL", "date": str(date.today()), "machine": platform.processor() or
              platform.machine(), "cores": os.cpu_count(), "load_avg_start": os.getloadavg(),
              "command": " ".join(sys.argv), "ce_tokens": a.ce_tokens, "medians": med,
              "speedup": {f"{n}/{names[0]}": med[names[0]]["wall_s"] / med[n]["wall_s"] for n in names[1:]},
              "max_abs_difference_in_ce_kl": diff, "numbers": first}
    print(json.dumps(record, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
