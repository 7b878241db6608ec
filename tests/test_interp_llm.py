"""LLM backends and the call cache: the OpenAI-compatible client against a scripted local HTTP
server (retries on 429/5xx, malformed output, a server that dies mid-run, missing
log-probabilities), the SQLite cache (a rerun is 100% hits, a killed run resumes), and the
local transformers backend on the tiny model (shared-prefix one-token path = plain forward)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from saelab.interp.llm import LLMConfig, LLMError, Request, Response, make_llm
from saelab.interp.llm.cache import CachedLLM
from saelab.interp.llm.openai import OpenAILLM


class Script:
    """What the fake server does: a list of behaviours consumed one per request, then `default`."""

    def __init__(self, *plan, default="ok", logprobs=False):
        self.plan, self.default, self.logprobs = list(plan), default, logprobs
        self.seen: list[dict] = []
        self.lock = threading.Lock()

    def next(self, body):
        with self.lock:
            self.seen.append(body)
            return self.plan.pop(0) if self.plan else self.default


def answer(body, logprobs=False):
    text = "echo: " + body["messages"][-1]["content"]
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs and body.get("logprobs"):
        choice["logprobs"] = {"content": [{"token": "Yes", "logprob": -0.1,
                                           "top_logprobs": [{"token": "Yes", "logprob": -0.1},
                                                            {"token": "No", "logprob": -2.4}]}]}
    return {"choices": [choice], "usage": {"prompt_tokens": 11, "completion_tokens": 3}}


@pytest.fixture
def server():
    state = {}

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            script: Script = state["script"]
            what = script.next(body)
            if what == "die":
                state["srv"].socket.close()  # the server goes away: this and later requests fail
                self.close_connection = True
                return
            if isinstance(what, int):
                self.send_response(what)
                self.end_headers()
                self.wfile.write(b'{"error": "busy"}')
                return
            payload = b"<html>not json</html>" if what == "garbage" else json.dumps(
                {"choices": []} if what == "empty" else answer(body, script.logprobs)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    state["srv"] = srv
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def run(script):
        state["script"] = script
        return f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield run
    srv.shutdown()


def _cfg(url, **kw):
    return LLMConfig(**{"backend": "openai", "model": "m", "base_url": url, "backoff": 0.0, "retries": 3,
                        "concurrency": 2, "timeout": 5, **kw})


def _reqs(n, **kw):
    return [Request.chat("sys", f"question {i}", max_tokens=5, **kw) for i in range(n)]


def test_answers_usage_and_retries_on_429_and_5xx(server, monkeypatch):
    monkeypatch.setenv("SAELAB_TEST_KEY", "sekrit")
    script = Script(429, 503)
    llm = OpenAILLM(_cfg(server(script), api_key_env="SAELAB_TEST_KEY"))
    out = llm.complete(_reqs(4))
    assert [r.text for r in out] == [f"echo: question {i}" for i in range(4)]
    assert all(r.prompt_tokens == 11 and r.completion_tokens == 3 for r in out)
    assert llm.retried == 2 and len(script.seen) == 6
    assert script.seen[0]["model"] == "m" and script.seen[0]["messages"][0] == {"role": "system", "content": "sys"}


def test_persistent_5xx_and_malformed_output_give_clear_errors(server):
    with pytest.raises(LLMError, match="did not answer after 4 attempts.*HTTP 500"):
        OpenAILLM(_cfg(server(Script(default=500)))).complete(_reqs(1))
    with pytest.raises(LLMError, match="malformed response.*not json"):
        OpenAILLM(_cfg(server(Script(default="garbage")))).complete(_reqs(1))
    with pytest.raises(LLMError, match="malformed response"):
        OpenAILLM(_cfg(server(Script(default="empty")))).complete(_reqs(1))


def test_missing_logprobs_are_noticed(server):
    llm = OpenAILLM(_cfg(server(Script())))
    r = llm.complete(_reqs(1, top_logprobs=5))[0]
    assert r.logprobs is None and llm.gives_logprobs is False
    llm = OpenAILLM(_cfg(server(Script(logprobs=True))))
    r = llm.complete(_reqs(1, top_logprobs=5))[0]
    assert llm.gives_logprobs is True and r.logprobs[0].top == {"Yes": -0.1, "No": -2.4}


def test_a_rerun_from_the_cache_still_knows_the_backend_gives_no_logprobs(server, tmp_path):
    url = server(Script())
    first = make_llm(_cfg(url), cache_path=str(tmp_path / "c.sqlite"))
    first.complete(_reqs(2, top_logprobs=5))
    assert first.gives_logprobs is False
    again = make_llm(_cfg(url), cache_path=str(tmp_path / "c.sqlite"))
    assert again.gives_logprobs is None  # nothing asked yet
    again.complete(_reqs(2, top_logprobs=5))
    assert again.hit_rate() == 1.0 and again.gives_logprobs is False  # the scorers' fallback is still said


def test_a_server_dying_mid_run_loses_no_finished_work(server, tmp_path):
    url = server(Script("ok", "ok", "ok", "die"))
    cached = CachedLLM(OpenAILLM(_cfg(url, retries=1, concurrency=1)), tmp_path / "c.sqlite")
    with pytest.raises(LLMError, match=r"3 of 8 requests of this batch finished and were kept"):
        cached.complete(_reqs(8))
    assert len(cached) == 3  # the finished answers are on disk


def test_cache_rerun_is_all_hits_and_a_killed_run_resumes(server, tmp_path):
    script = Script()
    url = server(script)
    path = tmp_path / "cache.sqlite"
    first = make_llm(_cfg(url), cache_path=str(path))
    a = first.complete(_reqs(6))
    assert first.stats["misses"] == 6 and len(script.seen) == 6
    again = make_llm(_cfg(url), cache_path=str(path))  # a rerun, in a new process's worth of objects
    b = again.complete(_reqs(6))
    assert again.hit_rate() == 1.0 and len(script.seen) == 6 and all(r.cached for r in b)
    assert [r.text for r in a] == [r.text for r in b]
    # other sampling parameters are another call
    again.complete([Request.chat("sys", "question 0", max_tokens=6)])
    assert len(script.seen) == 7

    class Killed(Exception):
        pass

    class Dies:  # a backend killed after its third answer
        identity = "openai:m"
        gives_logprobs = None

        def complete(self, reqs, on_result=None):
            for i, r in enumerate(reqs):
                if i == 3:
                    raise Killed
                on_result(i, Response("done " + r.messages[-1][1]))

    c = CachedLLM(Dies(), tmp_path / "k.sqlite")
    with pytest.raises(Killed):
        c.complete(_reqs(8))
    resumed = CachedLLM(OpenAILLM(_cfg(url)), tmp_path / "k.sqlite")
    n0 = len(script.seen)
    out = resumed.complete(_reqs(8))
    assert resumed.stats["hits"] == 3 and len(script.seen) - n0 == 5
    assert [r.text for r in out[:3]] == [f"done question {i}" for i in range(3)]


def test_local_backend_shared_prefix_matches_a_plain_forward(tiny_model_dir):
    """The one-token path (shared-prefix KV cache, right-padded suffixes) gives the same answer and
    log-probabilities as running each prompt alone; generation stops at the token budget."""
    from saelab.interp.llm.local import LocalLLM
    from saelab.models.load import load_model

    loaded = load_model(str(tiny_model_dir))
    loaded.tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                      "{% if add_generation_prompt %}assistant:{% endif %}")
    llm = LocalLLM(LLMConfig(model=str(tiny_model_dir), dtype="float32", batch_size=4), loaded=loaded)
    system = "a fairly long shared system prompt that every request carries along with it"
    reqs = [Request.chat(system, f"item {w}", max_tokens=1, top_logprobs=3) for w in ("a", "bb", "ccc", "d", "ee")]
    got = llm.complete(reqs)
    for r, g in zip(reqs, got, strict=True):
        ids = torch.tensor([llm.prompt_ids(r)])
        lp = torch.log_softmax(loaded.model(input_ids=ids).logits[0, -1], -1)
        assert g.logprobs[0].logprob == pytest.approx(float(lp.max()), abs=1e-4)
        assert g.prompt_tokens == ids.shape[1] and g.completion_tokens == 1
    long = llm.complete([Request.chat(None, "x", max_tokens=7, top_logprobs=2)])[0]
    assert long.completion_tokens <= 7 and len(long.logprobs) == long.completion_tokens
    s = [llm.complete([Request.chat(None, "y", max_tokens=5, temperature=1.0, seed=4)])[0].text for _ in range(2)]
    assert s[0] == s[1]  # seeded sampling is reproducible


def test_local_backend_continues_a_prefill(tiny_model_dir):
    """A prefilled answer: the prompt ends with the prefill after the assistant header, the model's
    first token is the one it predicts after it, and the text starts with the prefill (so the
    explanation parser finds its tag); the cache key differs from the same request without one."""
    from saelab.interp.explain import parse_explanation
    from saelab.interp.llm.local import LocalLLM
    from saelab.models.load import load_model

    loaded = load_model(str(tiny_model_dir))
    loaded.tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                      "{% if add_generation_prompt %}assistant:{% endif %}")
    llm = LocalLLM(LLMConfig(model=str(tiny_model_dir), dtype="float32"), loaded=loaded)
    plain = Request.chat(None, "describe it", max_tokens=4)
    pre = Request.chat(None, "describe it", max_tokens=4, prefill="[EXPLANATION]:")
    ids_plain, ids_pre = llm.prompt_ids(plain), llm.prompt_ids(pre)
    tail = loaded.tokenizer("[EXPLANATION]:", add_special_tokens=False)["input_ids"]
    assert len(ids_pre) > len(ids_plain) and loaded.tokenizer.decode(ids_pre[len(ids_pre) - len(tail):]) \
        .endswith("[EXPLANATION]:")
    out = llm.complete([pre])[0]
    first = int(loaded.model(input_ids=torch.tensor([ids_pre])).logits[0, -1].argmax())
    assert out.text.startswith("[EXPLANATION]:") and out.prompt_tokens == len(ids_pre)
    assert out.text[len("[EXPLANATION]:"):].startswith(loaded.tokenizer.decode([first])[:1] or "")
    assert parse_explanation(out.text)[1] or not out.text[len("[EXPLANATION]:"):].strip()
    assert pre.key("b") != plain.key("b") and plain.key("b") == Request.chat(None, "describe it", max_tokens=4).key("b")


def test_the_local_backend_runs_bf16_only_where_the_cpu_computes_it(tiny_model_dir, monkeypatch, tmp_path):
    """dtype 'auto' (the default) loads the explainer in bfloat16 only on a CPU with native bf16
    (AVX512-BF16): emulated, a bf16 matmul ran ~150x slower than float32 on an AVX2-only CPU, and
    the quickstart's interpretation stage with it. The cache identity names the dtype that runs."""
    import shutil

    from transformers import AutoTokenizer

    from saelab.interp.llm.local import LocalLLM

    d = tmp_path / "chat"
    shutil.copytree(tiny_model_dir, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(d)
    assert LLMConfig().dtype == "auto"
    for native, want in ((False, "float32"), (True, "bfloat16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native, raising=False)
        llm = LocalLLM(LLMConfig(model=str(d)))
        assert str(next(llm.loaded.model.parameters()).dtype) == f"torch.{want}"
        assert llm.identity.endswith(f":{want}")
