"""Where a stage computes: one `device` setting (auto | cpu | cuda | cuda:N) resolved here.

`auto` is cuda when a GPU is available (under torchrun: cuda:LOCAL_RANK), else cpu. Nothing
else in saelab picks a device: stages call `resolve_device(cfg.device)` and move the model,
the coder and each batch there. Checkpoints are always saved from CPU copies, so a run
trained on one device resumes or is evaluated on another.

Peak memory (`peak_memory_bytes`): on CUDA the caching allocator's peak since the last
`reset_peak`; on CPU the process's maximum resident set size (which never resets).
"""

from __future__ import annotations

import os
import re
import sys

import torch

from saelab.io import DTYPES

DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def select_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """A dtype that runs fast on `device` (top-k selection, the local explainer LLM). 'auto' on CPU: bfloat16
    where the CPU has AVX512-BF16 (the bf16 matmul runs ~2.2x float32 there, making the whole
    step ~1.6x faster), float32 elsewhere (emulated bf16 is slower than float32: ~150x for a
    [64, 576] x [576, 49152] matmul on an AVX2-only AMD EPYC). 'auto' on CUDA: bfloat16 where the GPU supports it
    (tensor cores), else float32; the CPU's test is never applied to a GPU."""
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if native else torch.float32
    return DTYPES[name]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Parse and check a device setting; refuse clearly what this machine cannot run.

    'auto' and 'cuda' pick cuda:LOCAL_RANK under torchrun (one GPU per rank), else the current GPU."""
    name = str(name).strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name != "auto" and not m:
        raise ValueError(f"device {name!r} is not one of {DEVICE_HELP}")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise ValueError(f"device {name!r} asks for a GPU, but torch sees none (torch {torch.__version__}, "
                         f"CUDA build: {torch.version.cuda or 'no'}); use device: cpu or auto")
    if m and m.group(1) is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"device {name!r} under torchrun would put every rank on one GPU; use device: cuda or auto "
                         "(each rank takes cuda:LOCAL_RANK)")
    if m and m.group(1) is not None:
        index = int(m.group(1))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        index = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        index = torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} means cuda:{index}, but this machine has {torch.cuda.device_count()} "
                         f"GPU(s): cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """'cpu' or 'cuda:0 (NVIDIA H200)': what a ledger row says the stage ran on."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement: CUDA's allocator peak, or on Linux the process's
    resident high-water mark (VmHWM, reset by writing 5 to /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak then counts from the process start
        pass


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak device memory since `reset_peak` (CUDA), or the process's peak resident memory (CPU:
    since `reset_peak` on Linux, else since the process started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def free_bytes(device: torch.device) -> int | None:
    """Memory free on a GPU now (None on CPU: the OS decides)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def check_fits(device: torch.device, need_bytes: int, what: str, hint: str) -> None:
    """Refuse, before any work, a job whose estimated memory exceeds what the GPU has free."""
    free = free_bytes(device)
    if free is not None and need_bytes > free:
        raise ValueError(f"{what} needs about {need_bytes / 2**30:.1f} GiB on {describe(device)}, which has "
                         f"{free / 2**30:.1f} GiB free; {hint}")


def dist_backend(device: torch.device) -> str:
    """nccl for GPU tensors, gloo for CPU tensors (nccl cannot reduce CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"
