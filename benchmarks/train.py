"""Training speed and quality, side by side: saelab vs sparsify vs SAELens (TopK).

Every library trains from the same initial data, the same batches in the same order, with
the same width, k, batch size and optimizer (Adam, same lr), on the same machine in one
run; libraries are interleaved over repeats and medians are reported. Reports tokens/s,
FVU on held-out rows after the same number of tokens, achieved GFLOP/s (counting only the
irreducible dense encoder forward, 2 d m FLOPs per token) and the measured float32 matmul
GFLOP/s of the same shape (the limit; and the bf16 one, the limit where the selection runs in
bf16), plus every saelab architecture's tokens/s and its ratio to TopK. The threshold coders
(relu, jumprelu, gated, panneal) start calibrated to a sparse regime (--arch-density) and run beside
saelab's dense reference path and their reference trainer (SAELens; dictionary_learning for
p-annealing, which must be importable, e.g. via PYTHONPATH) from the same weights (--arch-refs).

Needs a venv with saelab, eai-sparsify and sae-lens (torch==2.13.0 pinned):
  python3 -m venv .bench && .bench/bin/pip install torch==2.13.0 -e . eai-sparsify sae-lens
  .bench/bin/python benchmarks/train.py --data real --store STORE_DIR --out docs/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date

import torch

D, WIDTH, K, BATCH = 576, 9216, 32, 4096
DEVICE = torch.device("cpu")  # --device: every library trains there (sparsify uses its Triton kernels on CUDA)


def sync() -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def synthetic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Sparse nonnegative mixtures of 16 of 8192 random unit directions, plus noise and an offset."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(8192, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    out = torch.empty(n, d)
    for s in range(0, n, 8192):
        m = min(8192, n - s)
        idx = torch.randint(0, 8192, (m, 16), generator=g)
        coef = torch.rand(m, 16, generator=g) * 4
        out[s:s + m] = torch.bmm(coef[:, None, :], dirs[idx]).squeeze(1) + 0.1 * torch.randn(m, d, generator=g) + 1.0
    return out


def matmul_gflops(dtype: torch.dtype = torch.float32, n_rep: int = 7) -> float:
    """Measured GFLOP/s of the encoder-forward matmul [BATCH, D] x [D, WIDTH] in dtype."""
    a, b = torch.randn(BATCH, D, dtype=dtype, device=DEVICE), torch.randn(D, WIDTH, dtype=dtype, device=DEVICE)
    torch.mm(a, b)
    ts = []
    for _ in range(n_rep):
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        ts.append(time.perf_counter() - t)
    return 2 * BATCH * D * WIDTH / statistics.median(ts) / 1e9


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# --- one trainer per library: init(x_sample) -> (step(x), reconstruct(x)) -----------------------

def calibrate(sae, x: torch.Tensor, density: float) -> None:
    """Set the encoder biases so that each latent fires on `density` of the rows x (the gate and the
    magnitude path, for gated): the sparse regime of a trained threshold coder (L0 = density * width),
    reached without the thousands of steps training takes. The directions stay at their init."""
    with torch.no_grad():
        s = sae.centered(x) @ sae.W_enc
        q = s.kthvalue(max(1, int(round((1 - density) * x.shape[0]))), dim=0).values
        arch = sae.cfg.architecture
        sae.b_enc.copy_((sae.threshold if arch == "jumprelu" else 0) - q)
        if arch == "gated":
            sae.b_mag.copy_(-q * sae.r_mag.exp())


def saelab_trainer(arch, sample, lr, total_steps, dead_after, select="auto", normalize=True, density=None):
    from saelab.runs.rundir import RunDir
    from saelab.saes.config import SAEConfig
    from saelab.train.trainer import OptimFields, Trainer

    run = RunDir(tempfile.mkdtemp())
    run.path.mkdir(exist_ok=True)
    # saelab's default trains on inputs scaled to E||x||^2 = d (folded into the weights at save)
    cfg = OptimFields(batch_size=BATCH, lr=lr, b_dec_init="mean", normalize=normalize, warmup_steps=0,
                      decay_start=1.0, log_every=10**9, checkpoint_every=10**9)
    sae_cfg = SAEConfig(architecture=arch, d_in=D, width=WIDTH, k=K, topk_select_dtype=select,
                        dead_tokens=dead_after)
    t = Trainer(sae_cfg, cfg, run, total_steps, (sample, sample), device=DEVICE)
    if density is not None and arch in THRESHOLD_ARCHS:
        calibrate(t.sae, sample[:4096] * t.s_in, density)
    return t


THRESHOLD_ARCHS = ("relu", "jumprelu", "gated", "panneal")


def make_saelab(select: str = "auto", arch: str = "topk", normalize: bool = True, density: float | None = None,
                dense: bool = False, stats: dict | None = None):
    """dense: force the dense reference path (threshold coders); stats: filled with the last step's path,
    density and L0."""

    def init(sample, lr, total_steps, dead_after):
        t = saelab_trainer(arch, sample, lr, total_steps, dead_after, select, normalize, density)
        if dense:
            t.sae.sparse_max_density = 0.0

        def step(x):
            t.step(x)
            if stats is not None and arch in THRESHOLD_ARCHS:
                stats.update(path=getattr(t.sae, "last_path", "sparse"), density=getattr(t.sae, "density", None))

        def reconstruct(x):
            with torch.no_grad():
                return t.sae.eval().reconstruct(x * t.s_in) / t.s_out
        return step, reconstruct
    return init


def make_saelens_arch(arch: str, density: float):
    """SAELens's training SAE for a threshold architecture (JumpReLU, standard = ReLU with the
    decoder-norm-weighted L1, Gated), from the same calibrated weights as saelab's, on the same
    normalised inputs, with saelab's coefficients; stepped as make_saelens does (its
    training_forward_pass + Adam)."""
    from sae_lens import (
        GatedTrainingSAE,
        GatedTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    def init(sample, lr, total_steps, dead_after):
        t = saelab_trainer(arch, sample, lr, total_steps, dead_after, density=density)
        lab = t.sae
        common = dict(d_in=D, d_sae=WIDTH, dtype="float32", device=str(DEVICE))
        if arch == "jumprelu":
            sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**common, jumprelu_bandwidth=lab.cfg.bandwidth,
                                                                l0_coefficient=0.1))
            extra = {"threshold": lab.threshold}
        elif arch == "relu":
            sae = StandardTrainingSAE(StandardTrainingSAEConfig(**common, l1_coefficient=5.0))
            extra = {}
        else:
            sae = GatedTrainingSAE(GatedTrainingSAEConfig(**common, l1_coefficient=1.0))
            extra = {"b_gate": lab.b_enc, "r_mag": lab.r_mag, "b_mag": lab.b_mag}
        state = {"W_enc": lab.W_enc, "W_dec": lab.W_dec, "b_dec": lab.b_dec, **extra}
        if arch != "gated":
            state["b_enc"] = lab.b_enc
        sae.load_state_dict({k: v.detach().clone().contiguous() for k, v in state.items()})
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        coefs = {name: c.value for name, c in sae.get_coefficients().items()}
        st = {"i": 0}

        def step(x):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x * t.s_in, coefficients=coefs, dead_neuron_mask=None,
                                                           n_training_steps=st["i"], is_logging_step=False))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            st["i"] += 1

        def reconstruct(x):
            with torch.no_grad():
                return sae.decode(sae.encode(x * t.s_in)) / t.s_in
        return step, reconstruct
    return init


def make_dictionary_learning_panneal(density: float):
    """dictionary_learning's PAnnealTrainer (SAELens has no p-annealing) from the same calibrated weights,
    on the same normalised inputs, coefficient 5 (saelab's), p annealed from the start of these steps
    (the per-step work is the same at any p). dictionary_learning 0.1.0 imports nnsight at package import
    (for its activation buffer, unused here): a stub module stands in where nnsight is not installed."""
    import sys
    import types

    if "nnsight" not in sys.modules:
        try:
            import nnsight  # noqa: F401
        except ImportError:
            stub = types.ModuleType("nnsight")
            stub.LanguageModel = object
            sys.modules["nnsight"] = stub
    from dictionary_learning.trainers.p_anneal import PAnnealTrainer

    def init(sample, lr, total_steps, dead_after):
        t = saelab_trainer("panneal", sample, lr, total_steps, dead_after, density=density)
        lab = t.sae
        tr = PAnnealTrainer(steps=total_steps, activation_dim=D, dict_size=WIDTH, layer=0, lm_name="bench", lr=lr,
                            warmup_steps=1, sparsity_warmup_steps=None, initial_sparsity_penalty=5.0, anneal_start=0,
                            p_end=0.5, n_sparsity_updates=min(10, total_steps), device=str(DEVICE))
        with torch.no_grad():
            tr.ae.encoder.weight.copy_(lab.W_enc.t())
            tr.ae.encoder.bias.copy_(lab.b_enc)
            tr.ae.decoder.weight.copy_(lab.W_dec.t())
            tr.ae.bias.copy_(lab.b_dec)
        st = {"i": 0}

        def step(x):
            tr.update(st["i"], x * t.s_in)
            st["i"] += 1

        def reconstruct(x):
            with torch.no_grad():
                return tr.ae(x * t.s_in) / t.s_in
        return step, reconstruct
    return init


def make_sparsify():
    from sparsify import SparseCoder, SparseCoderConfig

    def init(sample, lr, total_steps, dead_after):
        torch.manual_seed(0)
        sae = SparseCoder(D, SparseCoderConfig(num_latents=WIDTH, k=K), device=DEVICE)
        with torch.no_grad():
            sae.b_dec.copy_(sample.mean(0))
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        since = torch.zeros(WIDTH, dtype=torch.long, device=DEVICE)

        def step(x):
            dead = since >= dead_after
            out = sae(x, dead_mask=dead)
            loss = out.fvu + (1 / 32) * out.auxk_loss
            opt.zero_grad()
            loss.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            sae.set_decoder_norm_to_unit_norm()
            since.add_(x.shape[0])
            since[out.latent_indices.flatten()] = 0

        def reconstruct(x):
            with torch.no_grad():
                return sae(x).sae_out
        return step, reconstruct
    return init


def make_saelens(sparse: bool):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    def init(sample, lr, total_steps, dead_after):
        torch.manual_seed(0)
        # sparse activations fail in backward with the default rescale_acts_by_decoder_norm=True
        # (sae-lens 6.54.12, torch 2.13: aten::view on SparseCPU), so the sparse variant turns it off
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=WIDTH, k=K, dtype="float32", device=str(DEVICE),
                                                    use_sparse_activations=sparse,
                                                    rescale_acts_by_decoder_norm=not sparse))
        with torch.no_grad():
            sae.b_dec.copy_(sample.mean(0))
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        coefs = {name: c.value for name, c in sae.get_coefficients().items()} if hasattr(sae, "get_coefficients") else {}
        state = {"i": 0}

        def step(x):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefs, dead_neuron_mask=None,
                                                           n_training_steps=state["i"], is_logging_step=False))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            state["i"] += 1

        def reconstruct(x):
            with torch.no_grad():
                return sae.decode(sae.encode(x))
        return step, reconstruct
    return init


LIBS = {
    "saelab": make_saelab("auto"),  # bf16 top-k selection where the CPU has AVX512-BF16
    "saelab-fp32": make_saelab("float32"),
    "saelab-raw": make_saelab("float32", normalize=False),
    "sparsify": make_sparsify(),
    "saelens-sparse": make_saelens(True),
    "saelens": make_saelens(False),
}


def run_one(init, data, holdout, steps, warmup, lr, dead_after):
    step, reconstruct = init(data[:8192], lr, steps + warmup, dead_after)
    times = []
    for i in range(steps + warmup):
        x = data[i * BATCH:(i + 1) * BATCH]
        sync()
        t = time.perf_counter()
        step(x)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"tokens_per_s": BATCH / statistics.median(times), "fvu": fvu(holdout, reconstruct(holdout))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=["synthetic", "real"], default="synthetic")
    ap.add_argument("--store", help="activation store for --data real (d_in must be 576)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-4 / (WIDTH / 2**14) ** 0.5)
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--dead-after", type=int, default=10_000_000,
                    help="a latent silent this many tokens is dead and AuxK trains it (sparsify's default "
                         "10M; a small value times the long-run regime where AuxK runs every step)")
    ap.add_argument("--archs", default="relu,topk,batchtopk,jumprelu,gated,matryoshka,panneal",
                    help="saelab architectures to time (a few steps each); empty to skip")
    ap.add_argument("--arch-repeats", type=int, default=3)
    ap.add_argument("--arch-steps", type=int, default=6, help="timed steps per architecture run (after one untimed)")
    ap.add_argument("--arch-density", type=float, default=0.005,
                    help="start the threshold coders (relu, jumprelu, gated, panneal) with each latent firing on "
                         "this fraction of tokens (calibrate(): the sparse regime of a trained SAE); 0: from init")
    ap.add_argument("--arch-refs", default="dense,ref",
                    help="also time, per threshold coder: dense (saelab's dense reference path), ref (SAELens's "
                         "training SAE; dictionary_learning's PAnnealTrainer for panneal); empty for neither")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: every library trains there")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    global DEVICE
    from saelab.device import describe, resolve_device

    DEVICE = resolve_device(args.device)
    n = (args.steps + args.warmup) * BATCH
    if args.data == "real":
        from saelab.activations.store import ActivationStore

        data = ActivationStore(args.store).all_acts(max_rows=n + 8192)
    else:
        data = synthetic(n + 8192, D)
    data, holdout = data[:n].to(DEVICE), data[n:n + 8192].to(DEVICE)
    libs = [lib for lib in args.libs.split(",") if lib]
    results = {lib: [] for lib in libs}
    peaks, peaks_bf16 = [], []
    for r in range(args.repeats):
        peaks.append(matmul_gflops())
        peaks_bf16.append(matmul_gflops(torch.bfloat16))
        for lib in libs:  # interleaved, so slow phases of a shared machine hit every library
            results[lib].append(run_one(LIBS[lib], data, holdout, args.steps, args.warmup, args.lr,
                                        args.dead_after))
            print(f"repeat {r} {lib}: {results[lib][-1]}", flush=True)
    peak, peak_bf16 = statistics.median(peaks), statistics.median(peaks_bf16)
    flop_per_token = 2 * D * WIDTH
    table = {}
    for lib, rs in results.items():
        tps = statistics.median(x["tokens_per_s"] for x in rs)
        table[lib] = {"tokens_per_s": round(tps), "fvu": round(statistics.median(x["fvu"] for x in rs), 4),
                      "achieved_gflops": round(tps * flop_per_token / 1e9, 1),
                      "fraction_of_matmul_limit": round(tps * flop_per_token / 1e9 / peak, 3),
                      "fraction_of_bf16_matmul_limit": round(tps * flop_per_token / 1e9 / peak_bf16, 3),
                      "runs": rs}
    archs, detail = {}, {}
    arch_list = [a for a in args.archs.split(",") if a]
    n_steps = min(args.arch_steps, args.steps + args.warmup - 1)  # within the prepared batches
    density = args.arch_density or None
    variants = {}  # (arch, variant) -> (init, stats)
    for arch in arch_list:
        stats: dict = {}
        variants[arch, "saelab"] = make_saelab("auto", arch, density=density, stats=stats), stats
        if arch in THRESHOLD_ARCHS and "dense" in args.arch_refs:
            variants[arch, "saelab-dense"] = make_saelab("auto", arch, density=density, dense=True), {}
        if arch in THRESHOLD_ARCHS and "ref" in args.arch_refs:
            try:
                ref = make_dictionary_learning_panneal(density) if arch == "panneal" else make_saelens_arch(arch, density)
                variants[arch, "dictionary_learning" if arch == "panneal" else "saelens"] = ref, {}
            except ImportError as e:
                print(f"arch {arch}: no reference trainer ({e})", flush=True)
    runs: dict = {key: [] for key in variants}
    for r in range(args.arch_repeats):  # interleaved, so slow phases of a shared machine hit every variant
        for key, (init, stats) in variants.items():
            res = run_one(init, data, holdout, n_steps, 1, args.lr, args.dead_after)
            res.update(stats)
            runs[key].append(res)
            print(f"repeat {r} arch {key[0]} {key[1]}: {res}", flush=True)
    for arch in arch_list:
        row = {}
        for (a, variant), rs in runs.items():
            if a != arch:
                continue
            row[variant] = {"tokens_per_s": round(statistics.median(x["tokens_per_s"] for x in rs)),
                            "fvu": round(statistics.median(x["fvu"] for x in rs), 4),
                            **({"path": rs[-1]["path"], "density": rs[-1]["density"]} if "path" in rs[-1] else {}),
                            "runs": rs}
        archs[arch] = row["saelab"]["tokens_per_s"]
        detail[arch] = row
    topk = archs.get("topk")
    for arch, row in detail.items():
        for variant, v in row.items():
            if topk:
                v["ratio_vs_topk"] = round(v["tokens_per_s"] / topk, 3)
            if variant not in ("saelab",):
                v["saelab_ratio"] = round(row["saelab"]["tokens_per_s"] / v["tokens_per_s"], 2)
        print(f"arch {arch}: " + ", ".join(f"{k} {v['tokens_per_s']:,} tok/s FVU {v['fvu']:.4f}"
                                            f"{' (' + str(v['saelab_ratio']) + 'x)' if 'saelab_ratio' in v else ''}"
                                            for k, v in row.items()), flush=True)
    report = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} torch threads", "device": describe(DEVICE), "data": args.data, "d_in": D, "width": WIDTH, "k": K,
              "batch": BATCH, "optimizer": f"Adam lr {args.lr:.3g}", "dead_after_tokens": args.dead_after, "tokens_trained": args.steps * BATCH + args.warmup * BATCH,
              "matmul_fp32_gflops": round(peak, 1), "token_limit_per_s": round(peak * 1e9 / flop_per_token),
              "matmul_bf16_gflops": round(peak_bf16, 1),
              "bf16_token_limit_per_s": round(peak_bf16 * 1e9 / flop_per_token),
              "libraries": table, "saelab_architectures_tokens_per_s": archs,
              "saelab_architectures_vs_topk": {a: round(v / topk, 3) for a, v in archs.items()} if topk else {},
              "architectures": detail, "arch_steps": n_steps, "arch_start_density": density}
    print(json.dumps({k: v for k, v in report.items() if k != "libraries"}, indent=1))
    for lib, row in table.items():
        print(f"{lib:18s} {row['tokens_per_s']:>8,} tok/s  FVU {row['fvu']:.4f}  {row['achieved_gflops']:6.1f} GFLOP/s "
              f"({row['fraction_of_matmul_limit']:.0%} of the fp32, "
              f"{row['fraction_of_bf16_matmul_limit']:.0%} of the bf16 matmul limit)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
