"""A run directory `runs/<name>/`: config.yaml, metrics.jsonl, checkpoint/, summary.json,
manifest.json. summary.json is written last, so its presence means the run finished.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from saelab.config import Config, read_yaml
from saelab.io import read_json, write_json, write_text


class RunExistsError(RuntimeError):
    pass


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.yaml")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    summary_file = property(lambda self: self.path / "summary.json")
    manifest_file = property(lambda self: self.path / "manifest.json")
    checkpoint_dir = property(lambda self: self.path / "checkpoint")
    state_file = property(lambda self: self.path / "train_state.pt")

    @property
    def complete(self) -> bool:
        return self.summary_file.is_file()

    @classmethod
    def prepare(cls, path: str | Path, cfg: Config) -> RunDir:
        """Create the run dir, or reopen one made with the same config (to reuse or resume).

        A run dir made with a different config is never overwritten.
        """
        run = cls(path)
        if run.config_file.is_file():
            if not cfg.same_work(read_yaml(run.config_file)):
                raise RunExistsError(
                    f"run directory {run.path} already holds a run with a different config "
                    f"({run.config_file}); pick another --name or delete that directory")
        else:
            run.path.mkdir(parents=True, exist_ok=True)
            cfg.save(run.config_file)
        return run

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric rows past `after_step` (they were logged after the checkpoint we resume)."""
        if not self.metrics_file.is_file():
            return
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("step", 0) <= after_step:
                rows.append(line)
        write_text(self.metrics_file, "".join(r + "\n" for r in rows))

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(x) for x in self.metrics_file.read_text().splitlines() if x.strip()]

    def summary(self) -> dict[str, Any]:
        return read_json(self.summary_file)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary_file, summary)

    def write_manifest(self, seed: int, wall_seconds: float, **extra: Any) -> None:
        write_json(self.manifest_file, {**provenance(), "seed": seed,
                                        "wall_seconds": round(wall_seconds, 3), **extra})


def provenance() -> dict[str, Any]:
    """Git commit, package versions, hardware: what a reader needs to trust a number."""
    return {
        "git": _git_state(),
        "versions": {p: _version(p) for p in ("saelab", "torch", "transformers", "numpy", "safetensors")},
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "hardware": _hardware(),
        "argv": sys.argv,
    }


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _git_state() -> dict[str, Any]:
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def _hardware() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": mem,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
