"""The `openai` backend: any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server,
ollama, hosted APIs, `transformers serve`), over the standard library's HTTP client.

- base URL and model from the config, the API key from an environment variable (none sent
  when it is unset: local servers need none);
- `concurrency` requests in flight (threads); each retried on 429, 5xx, timeouts and refused
  or dropped connections with exponential backoff (`backoff` seconds, doubled, at most 60);
- token usage taken from each response's `usage`;
- log-probabilities asked for with `logprobs` / `top_logprobs`; a server that ignores them
  (transformers serve does) is noticed (`gives_logprobs` False) and the scorers fall back;
- a malformed response (not JSON, no choices, no message text) raises LLMError at once, naming
  the endpoint and quoting the body; a server that stops answering raises LLMError after the
  retries. Either way the requests that finished were already handed to `on_result` (the
  cache commits each one), so nothing finished is lost.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait

from saelab.interp.llm import LLM, LLMConfig, LLMError, OnResult, Request, Response, TokenLogprob

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF = 60.0


class Malformed(LLMError):
    """The endpoint answered, but not with a chat completion."""


class OpenAILLM(LLM):
    def __init__(self, cfg: LLMConfig):
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.identity = f"openai:{cfg.model}"
        self.gives_logprobs: bool | None = None
        self.retried = 0  # requests retried (any cause)

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env) if self.cfg.api_key_env else None
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def _body(self, r: Request) -> bytes:
        # a request's prefill is not sent: servers differ in whether they continue a final assistant
        # message, so the model writes the whole answer (and the parsers read it as usual)
        body = {"model": self.cfg.model, "messages": [{"role": role, "content": c} for role, c in r.messages],
                "max_tokens": r.max_tokens, "temperature": r.temperature, "seed": r.seed}
        if r.top_logprobs:
            body |= {"logprobs": True, "top_logprobs": r.top_logprobs}
        return json.dumps(body).encode()

    def _once(self, r: Request) -> Response:
        """One request with retries; LLMError when it cannot be answered."""
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(min(self.cfg.backoff * 2 ** (attempt - 1), MAX_BACKOFF))
            req = urllib.request.Request(self.url, data=self._body(r), headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code in RETRY_STATUS:
                    last = f"HTTP {e.code}: {detail}"
                    continue
                raise LLMError(f"{self.url} refused the request: HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                continue
            return self._parse(raw, r)
        raise LLMError(f"{self.url} did not answer after {self.cfg.retries + 1} attempts (last: {last})")

    def _parse(self, raw: bytes, r: Request) -> Response:
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("message content is not text")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise Malformed(f"malformed response from {self.url} ({type(e).__name__}: {e}): "
                            f"{raw[:300].decode(errors='replace')!r}") from None
        logprobs = None
        content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
        if r.top_logprobs:
            if content:
                logprobs = [TokenLogprob(t["token"], float(t["logprob"]),
                                         {a["token"]: float(a["logprob"]) for a in t.get("top_logprobs") or []})
                            for t in content]
                self.gives_logprobs = True
            elif self.gives_logprobs is None:
                self.gives_logprobs = False
        usage = data.get("usage") or {}
        return Response(text, logprobs, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                        str(choice.get("finish_reason") or ""))

    def complete(self, requests: Sequence[Request], on_result: OnResult | None = None) -> list[Response]:
        out: list[Response | None] = [None] * len(requests)
        if not requests:
            return []
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        futures: dict[Future, int] = {pool.submit(self._once, r): i for i, r in enumerate(requests)}
        error: BaseException | None = None
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    if f.exception() is not None:
                        error = error or f.exception()
                        continue
                    i = futures[f]
                    out[i] = f.result()
                    if on_result:
                        on_result(i, out[i])  # handed on (and cached) before anything else can fail
                if error is not None:
                    for f in pending:
                        f.cancel()
                    # requests already running may still finish: keep them too
                    done, _ = wait(pending)
                    for f in done:
                        if not f.cancelled() and f.exception() is None:
                            i = futures[f]
                            out[i] = f.result()
                            if on_result:
                                on_result(i, out[i])
                    pending = set()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            n_done = sum(o is not None for o in out)
            raise LLMError(f"{error} — {n_done} of {len(requests)} requests of this batch finished and were kept; "
                           "rerun to resume from the cache") from error
        return out  # type: ignore[return-value]
