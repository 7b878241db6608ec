"""Every LLM call cached on disk (SQLite, WAL), keyed by backend, model, prompt and sampling
parameters: a rerun costs nothing, and a killed run resumes where it stopped, because each
response is committed as soon as it arrives (not when the whole batch ends)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from saelab.interp.llm import LLM, OnResult, Request, Response

SCHEMA = """CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY, backend TEXT NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL,
    time_unix REAL NOT NULL)"""


class CachedLLM(LLM):
    def __init__(self, inner: LLM, path: str | Path):
        self.inner = inner
        self.identity = inner.identity
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stats = {"requests": 0, "hits": 0, "misses": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self._cached_logprobs: bool | None = None  # what cached answers that asked for log-probabilities got
        with self._db() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(SCHEMA)

    @property
    def gives_logprobs(self) -> bool | None:  # type: ignore[override]
        """The backend's own answer; on a rerun served from the cache, what the cached answers say."""
        inner = self.inner.gives_logprobs
        return inner if inner is not None else self._cached_logprobs

    def _db(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60)
        con.execute("PRAGMA busy_timeout = 60000")
        return con

    def hit_rate(self) -> float:
        return self.stats["hits"] / self.stats["requests"] if self.stats["requests"] else float("nan")

    def complete(self, requests: Sequence[Request], on_result: OnResult | None = None) -> list[Response]:
        keys = [r.key(self.identity) for r in requests]
        out: list[Response | None] = [None] * len(requests)
        con = self._db()
        try:
            for i, k in enumerate(keys):
                row = con.execute("SELECT response FROM calls WHERE key = ?", (k,)).fetchone()
                if row is not None:
                    out[i] = Response.from_dict(json.loads(row[0]), cached=True)
                    if requests[i].top_logprobs and self._cached_logprobs is not True:
                        self._cached_logprobs = out[i].logprobs is not None
                    if on_result:
                        on_result(i, out[i])
            todo = [i for i, r in enumerate(out) if r is None]
            self.stats["requests"] += len(requests)
            self.stats["hits"] += len(requests) - len(todo)
            self.stats["misses"] += len(todo)

            bar = tqdm(total=len(todo), unit="call", desc="LLM calls", disable=not todo, leave=False)

            def store(j: int, resp: Response) -> None:  # commit each answer the moment it arrives
                bar.update(1)
                i = todo[j]
                con.execute("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?)",
                            (keys[i], self.identity, json.dumps(requests[i].__dict__), json.dumps(resp.to_dict()),
                             time.time()))
                con.commit()
                self.stats["prompt_tokens"] += resp.prompt_tokens
                self.stats["completion_tokens"] += resp.completion_tokens
                out[i] = resp
                if on_result:
                    on_result(i, resp)

            with bar:
                if todo:
                    got = self.inner.complete([requests[i] for i in todo], on_result=store)
                    for j, resp in enumerate(got):
                        if out[todo[j]] is None:  # a backend that returned it without reporting it
                            store(j, resp)
        finally:
            con.close()
        return out  # type: ignore[return-value]

    def __bool__(self) -> bool:  # an empty cache is still a backend
        return True

    def __len__(self) -> int:
        with self._db() as con:
            return int(con.execute("SELECT COUNT(*) FROM calls").fetchone()[0])
