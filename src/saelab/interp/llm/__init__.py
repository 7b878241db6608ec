"""LLM backends for explaining and scoring latents, behind one small interface.

    llm.complete(requests) -> responses      (same order; each maybe with token log-probabilities)

A `Request` is chat messages plus sampling parameters; a `Response` is the text, the
log-probabilities of the generated tokens with their top alternatives when the backend
gives them (None when it does not: scorers then fall back and say so), and the token usage.

Backends: `local` (any transformers causal LM on this machine, the embedded SmolLM2 by
default: batched, chat template applied, greedy or seeded sampling; saelab/interp/llm/local.py)
and `openai` (any OpenAI-compatible HTTP endpoint: vLLM, llama.cpp server, ollama, hosted
APIs, `transformers serve`; saelab/interp/llm/openai.py). `make_llm` wraps either in the
on-disk SQLite cache (saelab/interp/llm/cache.py), keyed by backend, model, prompt and
sampling parameters, so a rerun costs nothing and a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from saelab.config import Config


class LLMError(RuntimeError):
    """A backend that cannot answer: a dead or failing server, a malformed response, a bad setting."""


@dataclass(frozen=True)
class Request:
    """One chat completion: messages as (role, content) pairs, and how to sample."""

    messages: tuple[tuple[str, str], ...]
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_logprobs: int = 0  # alternatives per generated token to return with their log-probabilities; 0: none
    seed: int = 0
    prefill: str = ""  # the start of the answer, written for the model (a backend that can continues it)

    @classmethod
    def chat(cls, system: str | None, user: str, **kw) -> Request:
        msgs = ((("system", system),) if system else ()) + (("user", user),)
        return cls(msgs, **kw)

    def key(self, backend: str) -> str:
        """The cache key: backend identity, prompt and sampling parameters."""
        d = {"backend": backend, "messages": self.messages, "max_tokens": self.max_tokens,
             "temperature": self.temperature, "top_logprobs": self.top_logprobs, "seed": self.seed}
        if self.prefill:  # only when set, so answers cached before the field existed keep their keys
            d["prefill"] = self.prefill
        blob = json.dumps(d, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)  # alternatives (token -> log-probability)


@dataclass
class Response:
    text: str
    logprobs: list[TokenLogprob] | None = None  # None: the backend gave none (asked or not)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    cached: bool = False

    def to_dict(self) -> dict:
        return {"text": self.text, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason,
                "logprobs": None if self.logprobs is None else
                [[t.token, t.logprob, t.top] for t in self.logprobs]}

    @classmethod
    def from_dict(cls, d: dict, cached: bool = False) -> Response:
        lp = d.get("logprobs")
        return cls(d["text"], None if lp is None else [TokenLogprob(t, float(v), dict(top)) for t, v, top in lp],
                   int(d.get("prompt_tokens", 0)), int(d.get("completion_tokens", 0)), d.get("finish_reason", ""),
                   cached)


OnResult = Callable[[int, Response], None]


class LLM:
    """The interface. `identity` names what answers (backend and model) for the cache key."""

    identity: str = ""
    gives_logprobs: bool | None = None  # None: not known until a response says

    def complete(self, requests: Sequence[Request], on_result: OnResult | None = None) -> list[Response]:
        """Responses in request order. on_result(i, response) is called as each one finishes, so a
        caller can keep finished work when a later request fails."""
        raise NotImplementedError


class LLMConfig(Config):
    """Which LLM explains or scores, and how it is called."""

    backend: Literal["local", "openai"] = Field("local", description="local: a transformers causal LM on this "
                                                "machine; openai: an OpenAI-compatible HTTP endpoint")
    model: str = Field("smollm2", description="local: 'smollm2' (embedded), a local folder or .gguf, or a hub id; "
                       "openai: the model name the endpoint serves")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai: the endpoint's base URL (…/v1)")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key "
                             "(unset: no key is sent, as local servers need none)")
    concurrency: int = Field(4, gt=0, description="openai: requests in flight at once")
    timeout: float = Field(120.0, gt=0, description="openai: seconds before one request is abandoned (and retried)")
    retries: int = Field(5, ge=0, description="openai: retries of a request on 429, 5xx, timeouts and refused "
                         "connections, with exponential backoff")
    backoff: float = Field(1.0, ge=0, description="openai: seconds before the first retry (doubled each time, at "
                           "most 60)")
    batch_size: int = Field(8, gt=0, description="local: prompts per batch")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="local: model dtype; 'auto' = bfloat16 where the device computes it natively (a GPU "
        "that supports it, a CPU with AVX512-BF16), else float32 (emulated bf16 matmuls ran ~150x slower than "
        "float32 on an AVX2-only CPU)")
    cache: str = Field("", description="SQLite cache file of every call (default: beside the results, "
                       "RUN/interp/llm_cache.sqlite); 'none' turns it off")


def make_llm(cfg: LLMConfig, device: str = "cpu", cache_path: str | None = None, loaded=None) -> LLM:
    """The backend cfg names, wrapped in the on-disk cache at cache_path (None or 'none': uncached)."""
    if cfg.backend == "local":
        from saelab.interp.llm.local import LocalLLM
        llm: LLM = LocalLLM(cfg, device=device, loaded=loaded)
    else:
        from saelab.interp.llm.openai import OpenAILLM
        llm = OpenAILLM(cfg)
    if cache_path and str(cache_path).lower() != "none":
        from saelab.interp.llm.cache import CachedLLM
        llm = CachedLLM(llm, cache_path)
    return llm
