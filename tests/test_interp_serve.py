"""The `openai` backend against a real OpenAI-compatible server: `transformers serve` (the
transformers CLI; the `transformers[serving]` extra) started here on 127.0.0.1 with the embedded
model's local folder, and stopped here.

The server ignores `logprobs` / `top_logprobs`: the backend must notice, and the interpretation
must say which scores fall back (detection AUROC) while balanced accuracy is still reported.
Then a rerun is served entirely from the call cache. Select with `-m serving`; slow on CPU
(the server's start, 2 short generations and 14 short answers: a minute on a
quiet machine, ten or more on a loaded one).
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from test_interp_stage import char_run  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.embedded, pytest.mark.serving]

SERVING = ("fastapi", "uvicorn", "openai")
MISSING = [m for m in SERVING if importlib.util.find_spec(m) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, model name) of a `transformers serve` of the embedded model; stopped afterwards."""
    if MISSING:
        pytest.skip(f"the transformers[serving] extra is not installed (missing {', '.join(MISSING)}): "
                    "pip install -e '.[dev]'")
    from saelab.models.load import embedded_model_dir

    folder = str(embedded_model_dir())
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", folder, "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--log-level", "info"], stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up in 300 s: {log.read_text()[-2000:]}")
            time.sleep(1)
        yield url + "/v1", folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_openai_backend_against_transformers_serve(served, tmp_path):
    from saelab.interp.llm import LLMConfig, Request, make_llm

    url, model = served
    cfg = LLMConfig(backend="openai", model=model, base_url=url, concurrency=1, timeout=900, retries=1)
    llm = make_llm(cfg, cache_path=str(tmp_path / "calls.sqlite"))
    reqs = [Request.chat("Answer with one word: Yes or No.", q, max_tokens=2, top_logprobs=5)
            for q in ("Is the sky blue?", "Is fire cold?")]
    out = llm.complete(reqs)
    assert all(r.text.strip() for r in out)
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in out)  # usage recorded
    assert all(r.logprobs is None for r in out) and llm.gives_logprobs is False  # ignored, and noticed
    again = make_llm(cfg, cache_path=str(tmp_path / "calls.sqlite"))
    assert [r.text for r in again.complete(reqs)] == [r.text for r in out] and again.hit_rate() == 1.0
    assert again.gives_logprobs is False  # known from the cached answers


def test_interpret_through_transformers_serve(served, char_run, tiny_loaded, text_jsonl):  # noqa: F811
    """The whole stage (explain, score, controls) with the server as explainer and scorer, on two
    synthetic latents at a tiny budget: real answers, the AUROC fallback named, balanced accuracy
    reported, and a recomputation served entirely from the cache."""
    from saelab.experiments.interpret import InterpretConfig, interpret
    from saelab.interp.examples import ExamplesConfig
    from saelab.interp.select import SamplingConfig

    url, model = served
    # the server answers one request at a time; on a loaded 2-core machine one answer can take minutes
    llm = {"backend": "openai", "model": model, "base_url": url, "concurrency": 1, "timeout": 900, "retries": 1}
    cfg = InterpretConfig(
        run=str(char_run), latent_ids=[0, 1], ledger="none", out=str(char_run / "interp-serve"),
        examples=ExamplesConfig(text=str(text_jsonl), split="train", tokens=3000, batch_size=8, n_top=10,
                                reservoir=20, pool=32, window=12, lead=8),
        sampling=SamplingConfig(n_bands=1, explain_per_band=3, test_per_band=1, negatives=1, hard_negatives=0,
                                similar_negatives=0, neighbours=1, contrast_examples=1),
        explainer=llm, explain={"prompts": ["default"], "consensus": False, "max_tokens": 16},
        score={"scorers": ["detection"], "bootstrap": 50}, score_labels=["default"])
    r = interpret(cfg, loaded=tiny_loaded, progress=False)
    assert r.n_latents == 2
    assert r.llm["scorer"]["gives_logprobs"] is False
    assert r.llm["fallback_scores"] == ["detection_auroc"] and "detection_auroc" in r.llm["fallback"]
    for rec in r.latents:
        det = rec["scores"]["default"]["detection"]
        assert "no log-probabilities" in det["auroc_fallback"] and math.isnan(det["auroc"])
        assert det["n"] == 2 and (det["parse_failures"] == 2 or 0 <= det["balanced_accuracy"] <= 1)
        assert rec["explanations"]["default"]["label"] is not None
    assert r.llm["explainer"]["misses"] > 0
    (char_run / "interp-serve" / "interp.json").unlink()
    r2 = interpret(cfg, loaded=tiny_loaded, progress=False)
    assert r2.llm["explainer"]["misses"] == 0 and r2.llm["explainer"]["hit_rate"] == 1.0
    assert r2.llm["fallback_scores"] == ["detection_auroc"]  # still said when every answer comes from the cache
