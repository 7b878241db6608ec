"""The local backend: a transformers causal LM on this machine (the embedded SmolLM2-135M-Instruct
by default), its chat template applied, prompts batched.

Two paths. Requests for one token (the scorers' yes/no answers) take one forward pass: the
prompts of a batch are sorted so that shared beginnings sit together, the batch's common
prefix (system prompt, few-shot examples, often the explanation) is run once and its KV cache
reused for every row, and the rows' suffixes are right-padded (a causal model never looks
ahead, so the padding changes nothing). Longer requests go through `generate` with left
padding. Greedy at temperature 0; at temperature > 0 each request is sampled alone with its
own seeded generator, so the answer does not depend on what it was batched with.
Log-probabilities (with `top_logprobs` alternatives) come from the raw logits. A request's
`prefill` is appended after the chat template's assistant header, the model continues it, and
the answer's text starts with it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch

from saelab.interp.llm import LLM, LLMConfig, LLMError, OnResult, Request, Response, TokenLogprob

MIN_SHARED_PREFIX = 16  # tokens: below this the batch runs without a shared cache


class LocalLLM(LLM):
    gives_logprobs = True

    def __init__(self, cfg: LLMConfig, device: str = "cpu", loaded=None):
        from saelab.device import select_dtype
        from saelab.models.load import load_model

        self.cfg = cfg
        self.loaded = loaded or load_model(cfg.model, dtype=str(select_dtype(cfg.dtype, device)).removeprefix("torch."),
                                           device=device)
        dtype = str(next(self.loaded.model.parameters()).dtype).removeprefix("torch.")  # what runs
        self.tok = self.loaded.tokenizer
        if not getattr(self.tok, "chat_template", None):
            raise LLMError(f"model {cfg.model!r} has no chat template; the local backend needs an instruct/chat model")
        self.identity = f"local:{self.loaded.content_hash}:{dtype}"
        self.eos = {i for i in [self.tok.eos_token_id, *self._generation_eos()] if i is not None}
        self._prefix: tuple[tuple[int, ...], object] | None = None  # the last shared prefix and its KV cache
        # the KV-cache argument is `cache` from transformers 5.2x, `past_key_values` before
        params = inspect.signature(self.loaded.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _generation_eos(self) -> list[int]:
        gc = getattr(self.loaded.model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None)
        return list(e) if isinstance(e, list | tuple) else [e]

    def prompt_ids(self, r: Request) -> list[int]:
        text = self.tok.apply_chat_template([{"role": role, "content": c} for role, c in r.messages],
                                            add_generation_prompt=True, tokenize=False)
        return self.tok(text + r.prefill, add_special_tokens=False)["input_ids"]

    def complete(self, requests: Sequence[Request], on_result: OnResult | None = None) -> list[Response]:
        ids = [self.prompt_ids(r) for r in requests]
        out: list[Response | None] = [None] * len(requests)

        def done(i: int, resp: Response) -> None:
            out[i] = resp
            if on_result:
                on_result(i, resp)

        one = sorted((i for i, r in enumerate(requests) if r.max_tokens == 1), key=lambda i: ids[i])
        sampled = [i for i, r in enumerate(requests) if r.max_tokens > 1 and r.temperature > 0]
        greedy = sorted((i for i, r in enumerate(requests) if r.max_tokens > 1 and r.temperature <= 0),
                        key=lambda i: len(ids[i]))
        bs = self.cfg.batch_size
        for s in range(0, len(one), bs):
            chunk = one[s:s + bs]
            for i, resp in zip(chunk, self._one_token([ids[i] for i in chunk], [requests[i] for i in chunk]),
                               strict=True):
                done(i, resp)
        for s in range(0, len(greedy), bs):
            chunk = greedy[s:s + bs]
            for i, resp in zip(chunk, self._generate([ids[i] for i in chunk], [requests[i] for i in chunk]),
                               strict=True):
                done(i, resp)
        for i in sampled:
            g = torch.Generator(device="cpu").manual_seed(requests[i].seed)
            done(i, self._generate([ids[i]], [requests[i]], generator=g)[0])
        return out  # type: ignore[return-value]

    # --- one token: a forward pass over a shared prefix ---------------------------------------------------
    @torch.no_grad()
    def _prefix_cache(self, prefix: tuple[int, ...]):
        if self._prefix is None or self._prefix[0] != prefix:
            ids = torch.tensor([prefix], device=self.loaded.device)
            out = self.loaded.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            self._prefix = (prefix, _kv(out))
        return self._prefix[1]

    @torch.no_grad()
    def _one_token(self, ids: list[list[int]], reqs: list[Request]) -> list[Response]:
        model, dev = self.loaded.model, self.loaded.device
        p = _common_prefix(ids)
        p = min(p, min(len(x) for x in ids) - 1)  # every row keeps at least one token of its own
        cache = None
        if p >= MIN_SHARED_PREFIX:
            cache = copy.deepcopy(self._prefix_cache(tuple(ids[0][:p])))
            cache.batch_repeat_interleave(len(ids))
        else:
            p = 0
        suffix = [x[p:] for x in ids]
        S = max(len(x) for x in suffix)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        inp = torch.full((len(ids), S), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), p + S), dtype=torch.long)
        mask[:, :p] = 1
        for r, x in enumerate(suffix):
            inp[r, :len(x)] = torch.tensor(x)
            mask[r, p:p + len(x)] = 1
        last = [len(x) - 1 for x in suffix]
        keep = sorted(set(last))  # logits only where a row ends
        logits = model(input_ids=inp.to(dev), attention_mask=mask.to(dev), use_cache=cache is not None,
                       logits_to_keep=torch.tensor(keep, device=dev), **{self._cache_arg: cache}).logits
        where = torch.tensor([keep.index(k) for k in last], device=dev)
        lp = torch.log_softmax(logits[torch.arange(len(ids), device=dev), where].float(), dim=-1)
        out = []
        for r, req in enumerate(reqs):
            tid = int(lp[r].argmax())
            out.append(self._response([tid], lp[r:r + 1], req, len(ids[r])))
        return out

    # --- longer answers: generate ---------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, ids: list[list[int]], reqs: list[Request], generator=None) -> list[Response]:
        model, dev = self.loaded.model, self.loaded.device
        T = max(len(x) for x in ids)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        inp = torch.full((len(ids), T), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for r, x in enumerate(ids):  # left padding
            inp[r, T - len(x):] = torch.tensor(x)
            mask[r, T - len(x):] = 1
        inp, mask = inp.to(dev), mask.to(dev)
        want_lp = any(r.top_logprobs for r in reqs)
        max_new = max(r.max_tokens for r in reqs)
        if generator is None:
            gen = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                                 eos_token_id=sorted(self.eos), return_dict_in_generate=True, output_logits=want_lp)
            seqs, step_logits = gen.sequences[:, T:], gen.logits
        else:
            seqs, step_logits = self._sample(inp, mask, reqs[0], generator)
        out = []
        for r, req in enumerate(reqs):
            toks = seqs[r].tolist()[:req.max_tokens]
            n = next((k + 1 for k, t in enumerate(toks) if t in self.eos), len(toks))
            toks = toks[:n]
            lp = None
            if want_lp and step_logits is not None:
                lp = torch.log_softmax(torch.stack([step_logits[k][r] for k in range(len(toks))]).float(), dim=-1)
            out.append(self._response(toks, lp, req, len(ids[r])))
        return out

    def _sample(self, inp, mask, req: Request, g: torch.Generator):
        """Seeded multinomial sampling, one request at a time (the same answer in any batch)."""
        model = self.loaded.model
        out = model(input_ids=inp, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache, toks, logits_all = _kv(out), [], []
        logits = out.logits[:, -1]
        for _ in range(req.max_tokens):
            logits_all.append(logits[0])
            probs = torch.softmax(logits[0].float() / req.temperature, dim=-1).cpu()
            t = int(torch.multinomial(probs, 1, generator=g))
            toks.append(t)
            if t in self.eos:
                break
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            out = model(input_ids=torch.tensor([[t]], device=inp.device), attention_mask=mask, use_cache=True,
                        **{self._cache_arg: cache})
            cache, logits = _kv(out), out.logits[:, -1]
        return torch.tensor([toks]), [lg[None] for lg in logits_all]

    def _response(self, toks: list[int], lp: torch.Tensor | None, req: Request, n_prompt: int) -> Response:
        ended = bool(toks) and toks[-1] in self.eos
        text = req.prefill + self.tok.decode([t for t in toks if t not in self.eos], skip_special_tokens=True)
        logprobs = None
        if req.top_logprobs and lp is not None:
            logprobs = []
            for k, t in enumerate(toks):
                vals, idx = lp[k].topk(req.top_logprobs)
                top = {}
                for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
                    s = self.tok.decode([i])
                    top[s] = max(top.get(s, float("-inf")), v)  # tokens decoding alike keep the likelier
                logprobs.append(TokenLogprob(self.tok.decode([t]), float(lp[k, t]), top))
        return Response(text, logprobs, n_prompt, len(toks), "stop" if ended else "length")


def _kv(out):
    """The KV cache a forward returned (`cache` from transformers 5.2x, `past_key_values` before)."""
    return getattr(out, "cache", None) or out.past_key_values


def _common_prefix(ids: list[list[int]]) -> int:
    first, n = ids[0], min(len(x) for x in ids)
    for k in range(n):
        t = first[k]
        if any(x[k] != t for x in ids):
            return k
    return n
