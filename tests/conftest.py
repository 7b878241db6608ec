"""Shared fixtures: a tiny random Llama (tests/tiny.py) and a small JSONL of real text
(Python standard-library modules)."""

from __future__ import annotations

import os

# Tests never touch a model or dataset hub: huggingface_hub reads these at import time,
# so they are set here, before anything imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Every stage records into the ledger; tests record into a throwaway one unless they pass their own.
os.environ["SAELAB_LEDGER"] = os.path.join(__import__("tempfile").mkdtemp(prefix="saelab-test-ledger-"),
                                           "ledger.sqlite")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny import save_tiny  # noqa: E402

from saelab.data.corpus import stdlib_documents  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from saelab.models.load import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    """~60 real documents (stdlib modules), enough for both splits."""
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    with open(path, "w") as f:
        for i, doc in enumerate(stdlib_documents()):
            if i >= 60:
                break
            f.write(json.dumps({"id": doc.id, "text": doc.text[:3000]}) + "\n")
    return path



@pytest.fixture(scope="session")
def tiny_sae_run(tiny_model_dir, tiny_loaded, text_jsonl, tmp_path_factory):
    """A TopK SAE trained on the tiny model's resid_post.1 (a RunDir), shared by the eval tests."""
    from tiny import train_tiny_sae

    return train_tiny_sae(tmp_path_factory.mktemp("tiny-sae"), tiny_model_dir, tiny_loaded, text_jsonl)


@pytest.fixture
def own_sae_run(tiny_sae_run, tmp_path):
    """A copy of tiny_sae_run for a test that writes into its run directory (results, ledger.jsonl),
    so the shared run stays as trained."""
    import shutil

    from saelab.runs.rundir import RunDir

    return RunDir(shutil.copytree(tiny_sae_run.path, tmp_path / "own-run"))
