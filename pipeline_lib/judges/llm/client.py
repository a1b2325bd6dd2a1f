"""Chat backends for the LLM judge, behind one interface: ``ChatClient.chat_many(requests) -> replies``.

- ``http``: any OpenAI-compatible ``/chat/completions`` endpoint (``vllm serve``, a hosted API) through ``httpx``.
  Requests run on a thread pool of ``max_concurrency`` workers, so at most that many are in flight. A request is
  retried with capped exponential backoff and full jitter (delay ~ U(0, min(cap, base * 2**attempt)), honouring a
  server's ``Retry-After`` as a floor) on 429, 5xx, timeouts and dropped connections; any other 4xx (a malformed
  request, a wrong model name, a bad key) fails at once with :class:`JudgeRequestError`, since sending it again
  cannot help.
- ``vllm``: an in-process ``vllm.LLM`` engine (``LLM.chat``), for a judge model on the same machine. vLLM batches
  all requests itself; the engine is seeded once (a per-request seed crashes vLLM's CPU sampler). Unlike the
  generation stage's child-process worker, the engine lives in the caller's process and holds its memory until that
  process ends; for a long pipeline process prefer ``vllm serve`` and the ``http`` backend.

Why ``httpx`` and not the ``openai`` SDK (in the lock; issue 20 asked): the SDK's retry loop breaks two guarantees
this client keeps, measured against a loopback server (openai 3.54): a server header ``x-should-retry: true`` makes
it resend any request, a 401 (bad key) or a 400 included (3 requests with ``max_retries=2``), and it retries 409;
its backoff is fixed (0.5 s doubling to 8 s, jitter 0-25 %), so ``backoff_s`` / ``max_backoff_s`` could not be
honoured; and a ``Retry-After`` over 120 s ends retries at once. Keeping it would mean turning its loop off
(``max_retries=0``) and keeping ours, i.e. a second HTTP stack for nothing: the token usage it exposes is the
``usage`` object of the reply, which this client reads itself (``stats``). Error bodies are redacted before they
are cut (a key near the cut cannot leave a fragment), and those of 401/403 are never quoted.

Token usage: ``HttpChatClient.stats`` adds up ``prompt_tokens``, ``completion_tokens`` and ``total_tokens`` of the
successful replies as the endpoint reports them (``replies_without_usage`` counts replies that carry none; retried
failures carry none); ``VllmChatClient.stats`` counts the same from the engine's token ids.

Both return, per request, the reply text and the top log-probabilities of the *first* generated token, keyed by the
token's text with surrounding whitespace stripped (variants such as ``"m"`` and ``" m"`` are merged by log-sum-exp).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from pydantic import SecretStr

from pipeline_lib.judges.llm.secrets import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": ...}]
    max_tokens: int
    top_logprobs: int = 0  # 0: no log-probabilities wanted


@dataclass(frozen=True)
class ChatReply:
    text: str
    first_token_logprobs: dict[str, float] = field(default_factory=dict)  # stripped token text -> log-prob


class JudgeRequestError(ValueError):
    """The judge endpoint rejected a request (4xx other than 429): retrying cannot help."""


class JudgeUnavailableError(RuntimeError):
    """The judge endpoint kept failing (429 / 5xx / timeouts) after every allowed retry."""


def merge_top_logprobs(pairs: Sequence[tuple[str, float]]) -> dict[str, float]:
    """{stripped token text: log-prob}, adding the probabilities of tokens that differ only by whitespace."""
    out: dict[str, float] = {}
    for token, lp in pairs:
        key = token.strip()
        out[key] = lp if key not in out else _logaddexp(out[key], lp)
    return out


def _logaddexp(x: float, y: float) -> float:
    hi, lo = max(x, y), min(x, y)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


class ChatClient:
    """Send chat requests to a judge model; subclasses are registered in :data:`BACKENDS`."""

    def chat_many(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- OpenAI-compatible HTTP ----------------------------------------------------------------------------------------
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500  # rate limited, or the server's own failure: worth another try


class HttpChatClient(ChatClient):
    def __init__(self, options, api_key: SecretStr | None = None):
        import httpx

        self.options = options
        self.url = options.base_url.rstrip("/") + "/chat/completions"
        self._key = api_key
        headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key is not None else {}
        # The key lives only in this client's default headers; httpx does not log header values.
        self._http = httpx.Client(headers=headers, timeout=options.timeout_s,
                                  limits=httpx.Limits(max_connections=options.max_concurrency))
        self._jitter = random.Random()  # jitter spreads retries in time; it never touches a verdict
        self._lock = threading.Lock()
        # requests / attempts / retries, and the token usage the endpoint reported for the successful replies (the
        # OpenAI `usage` object; vLLM and hosted APIs send it; replies without it are counted apart)
        self.stats = {"requests": 0, "attempts": 0, "retries": 0, **{k: 0 for k in USAGE_FIELDS},
                      "replies_without_usage": 0}

    def __repr__(self) -> str:
        return f"HttpChatClient(url={self.url!r}, model={self.options.model!r})"

    def payload(self, req: ChatRequest) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {"model": o.model, "messages": req.messages, "max_tokens": req.max_tokens,
                                "temperature": o.temperature}
        if req.top_logprobs:
            body.update(logprobs=True, top_logprobs=req.top_logprobs)
        if o.temperature > 0:
            # Greedy decoding needs no seed; and vLLM's CPU sampler crashes on per-request seeds, so send one only
            # when sampling, where it makes a hosted API's replies repeatable.
            body["seed"] = o.seed
        return body

    def chat_many(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        if len(requests) <= 1:
            return [self.chat(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.options.max_concurrency, len(requests))) as pool:
            return list(pool.map(self.chat, requests))

    def chat(self, req: ChatRequest) -> ChatReply:
        return parse_chat_completion(self._post(self.payload(req)), self.url)

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        o = self.options
        with self._lock:
            self.stats["requests"] += 1
        last = ""
        for attempt in range(o.max_retries + 1):
            with self._lock:
                self.stats["attempts"] += 1
            retry_after = 0.0
            try:
                resp = self._http.post(self.url, json=body)
            except httpx.TransportError as e:  # timeouts, refused or dropped connections
                last = type(e).__name__ + (f" after {o.timeout_s:g} s" if isinstance(e, httpx.TimeoutException) else "")
            else:
                if resp.status_code == 200:
                    try:
                        data = resp.json()
                    except ValueError:
                        raise JudgeRequestError(f"judge endpoint {self.url}: HTTP 200 with a body that is not JSON: "
                                                f"{redact(resp.text, self._key, limit=200)}") from None
                    self._count_usage(data)
                    return data
                excerpt = _error_excerpt(resp, self._key)
                if not _retryable(resp.status_code):
                    raise JudgeRequestError(
                        f"judge endpoint {self.url} rejected the request with HTTP {resp.status_code} "
                        f"(not retried; check judge.model={o.model!r}, the API key and the request limits): {excerpt}")
                last = f"HTTP {resp.status_code}: {excerpt}"
                retry_after = _retry_after_s(resp.headers.get("retry-after"))
            if attempt == o.max_retries:
                break
            delay = min(o.max_backoff_s,
                        max(retry_after, self._jitter.uniform(0.0, min(o.max_backoff_s, o.backoff_s * 2 ** attempt))))
            log.warning("llm judge: attempt %d/%d failed (%s); retrying in %.2f s",
                        attempt + 1, o.max_retries + 1, last, delay)
            with self._lock:
                self.stats["retries"] += 1
            time.sleep(delay)
        raise JudgeUnavailableError(f"judge endpoint {self.url} failed {o.max_retries + 1} time(s); last: {last}")

    def _count_usage(self, data: Any) -> None:
        usage = data.get("usage") if isinstance(data, dict) else None
        with self._lock:
            if not isinstance(usage, dict):
                self.stats["replies_without_usage"] += 1
                return
            for k in USAGE_FIELDS:
                v = usage.get(k)
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    self.stats[k] += v

    def close(self) -> None:
        self._http.close()


def _error_excerpt(resp, key: SecretStr | None) -> str:
    """What an error message may quote of a failed reply: nothing of a 401/403 (an authentication error is where a
    server echoes the credentials it got), else the body redacted *then* cut to 300 characters."""
    if resp.status_code in (401, 403):
        return "(body not shown: authentication errors may echo the credentials)"
    return redact(resp.text, key, limit=300)


def _retry_after_s(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:  # an HTTP date: fall back to our own backoff
        return 0.0


def parse_chat_completion(data: dict[str, Any], where: str = "judge") -> ChatReply:
    """Reply text and first-token top log-probs from an OpenAI chat completion (``logprobs.content[0]``)."""
    try:
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise JudgeRequestError(f"{where}: response has no choices[0].message (keys: {sorted(data)[:8]})") from None
    content = ((choice.get("logprobs") or {}).get("content")) or []
    top = (content[0].get("top_logprobs") or []) if content else []
    return ChatReply(text, merge_top_logprobs([(t["token"], float(t["logprob"])) for t in top]))


# -- in-process vLLM ------------------------------------------------------------------------------------------------
class VllmChatClient(ChatClient):
    def __init__(self, options, api_key: SecretStr | None = None):  # no key: the engine runs in this process
        self.options = options
        self._llm = None
        self.stats = {"requests": 0, **{k: 0 for k in USAGE_FIELDS}}

    def _engine(self):
        if self._llm is None:
            import os

            from pipeline_lib import models

            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU: the default reservation fails on small hosts
            # keep the engine core in this process: a spawned one needs an importable __main__ guard in the caller
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            import torch
            from vllm import LLM

            from pipeline_lib.generation import kv_blocks

            # judge prompts share their long instructions: CPU blocks of 32 let the prefix cache share them
            kwargs = {"enforce_eager": True, **kv_blocks.engine_args(None, torch.cuda.is_available()),
                      **self.options.engine_kwargs}
            self._llm = LLM(model=models.resolve(self.options.model).path, seed=self.options.seed, **kwargs)
        return self._llm

    def chat_many(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        from vllm import SamplingParams

        if not requests:
            return []
        llm = self._engine()
        params = [SamplingParams(temperature=self.options.temperature, max_tokens=r.max_tokens,
                                 logprobs=r.top_logprobs or None) for r in requests]
        outs = llm.chat([r.messages for r in requests], params, use_tqdm=False)
        replies = []
        for out in outs:
            c = out.outputs[0]
            prompt_n, completion_n = len(out.prompt_token_ids or []), len(c.token_ids or [])
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += prompt_n
            self.stats["completion_tokens"] += completion_n
            self.stats["total_tokens"] += prompt_n + completion_n
            first = c.logprobs[0] if c.logprobs else {}
            replies.append(ChatReply(c.text, merge_top_logprobs(
                [(lp.decoded_token or "", float(lp.logprob)) for lp in first.values()])))
        return replies

    def close(self) -> None:
        self._llm = None


BACKENDS: dict[str, type[ChatClient]] = {"http": HttpChatClient, "vllm": VllmChatClient}
