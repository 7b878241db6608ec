"""Shared fixtures: a tiny random Llama (tests/tiny.py) and a small JSONL of real text
(Python standard-library modules)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import save_tiny

from saelab.data.corpus import stdlib_documents


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

