"""LLM-as-judge (``kind: llm``): a chat model judges through a protocol (``alpaca_eval`` pairwise preferences read
from identifier log-probs, or ``mt_bench`` single-answer 1-10 ratings) over a backend (``http``: any
OpenAI-compatible endpoint; ``vllm``: an in-process engine).

The protocol decides the judge's native view, and so which class :func:`build_judge` returns: ``alpaca_eval`` gives a
pairwise judge (``compare`` and a batched ``rank``; ``score`` is the base adapter, the mean win probability within a
prompt), ``mt_bench`` a pointwise one (``score``; ``compare`` is Bradley-Terry on ratings). The split matters to
:class:`~pipeline_lib.judges.cache.CachedJudge` and the annotate stage, which tell the two apart by whether the
class overrides ``score``.

The API key never enters the options (only the name of its environment variable or Prefect Secret block), so it
cannot reach ``identity()``, a config dump or a log line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field, model_validator

from pipeline_lib.judges.base import Item, Judge, JudgeOptions, pairwise_matrix, register_judge
from pipeline_lib.judges.llm.client import BACKENDS, ChatClient
from pipeline_lib.judges.llm.protocols import PROTOCOLS
from pipeline_lib.judges.llm.secrets import resolve_api_key

log = logging.getLogger(__name__)


class LLMJudgeOptions(JudgeOptions):
    kind: Literal["llm"] = "llm"
    backend: Literal["http", "vllm"] = "http"
    model: str  # the served model name (http) or a model reference pipeline_lib.models.resolve accepts (vllm)
    base_url: str | None = None  # http: the API root, e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # name of the environment variable holding the key (never the key itself)
    api_key_secret: str | None = None  # or the name of a Prefect Secret block holding it
    protocol: Literal["alpaca_eval", "mt_bench"] = "alpaca_eval"
    template: str | None = None  # alpaca_eval: chat template file ({instruction} {output_1} {output_2}); default ours
    judge_prompts: str | None = None  # mt_bench: the judge-prompts JSONL (FastChat's judge_prompts.jsonl)
    swap_consistency: bool = False  # alpaca_eval: judge both orders; disagreement is a tie
    temperature: float = Field(0.0, ge=0.0)
    seed: int = 0  # output-order coin (alpaca_eval), engine seed (vllm), request seed when sampling (http)
    max_tokens: int = Field(2048, ge=1)  # mt_bench: room for the judge's explanation and rating (FastChat: 2048)
    top_logprobs: int = Field(20, ge=2, le=20)  # alpaca_eval: alternatives read for the identifiers (API max 20)
    max_concurrency: int = Field(8, ge=1)  # http: requests in flight at once
    max_retries: int = Field(5, ge=0)  # http: retries after the first attempt on 429 / 5xx / timeouts
    timeout_s: float = Field(120.0, gt=0)
    backoff_s: float = Field(1.0, ge=0)  # http: first backoff cap; doubles per attempt, full jitter
    max_backoff_s: float = Field(60.0, ge=0)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # vllm: extra vllm.LLM arguments (max_model_len...)

    @model_validator(mode="after")
    def _check(self) -> "LLMJudgeOptions":
        if self.backend == "http" and not self.base_url:
            raise ValueError("judge.base_url: required for backend 'http' (e.g. http://127.0.0.1:8000/v1)")
        if self.backend == "vllm" and (self.base_url or self.api_key_env or self.api_key_secret):
            raise ValueError("judge.base_url / api_key_env / api_key_secret: only for backend 'http'")
        if self.backend == "http" and self.engine_kwargs:
            raise ValueError("judge.engine_kwargs: only for backend 'vllm'")
        if self.api_key_env and self.api_key_secret:
            raise ValueError("judge: set api_key_env or api_key_secret, not both")
        if self.protocol == "mt_bench":
            if not self.judge_prompts:
                raise ValueError("judge.judge_prompts: required for protocol 'mt_bench' (a judge-prompts JSONL)")
            if self.swap_consistency or self.template:
                raise ValueError("judge.swap_consistency / judge.template: only for protocol 'alpaca_eval'")
        elif self.judge_prompts:
            raise ValueError("judge.judge_prompts: only for protocol 'mt_bench'")
        return self


# Options that change verdicts go into identity(); where the model is reached, how fast, and where the key lives
# do not.
_NOT_IN_IDENTITY = {"base_url", "api_key_env", "api_key_secret", "max_concurrency", "max_retries", "timeout_s",
                    "backoff_s", "max_backoff_s", "template", "judge_prompts", "model"}
_ONLY_FOR = {"alpaca_eval": {"max_tokens"}, "mt_bench": {"swap_consistency", "top_logprobs"}}  # the other's fields


@register_judge("llm")
class LLMJudge(Judge):
    Options = LLMJudgeOptions
    options: LLMJudgeOptions

    def __new__(cls, options: LLMJudgeOptions):
        # build_judge calls LLMJudge(options): hand back the class whose native view matches the protocol.
        if cls is LLMJudge:
            cls = LLMPairwiseJudge if PROTOCOLS[options.protocol].pairwise else LLMRatingJudge
        return super().__new__(cls)

    def __init__(self, options: LLMJudgeOptions):
        super().__init__(options)
        self.protocol = PROTOCOLS[options.protocol].from_options(options)
        self._client: ChatClient | None = None

    @property
    def client(self) -> ChatClient:
        if self._client is None:  # connect (and read the key) on first use, not when a config is validated
            o = self.options
            self._client = BACKENDS[o.backend](o, resolve_api_key(o.api_key_env, o.api_key_secret))
        return self._client

    def identity(self) -> dict[str, Any]:
        o = self.options
        verdict_options = o.model_dump(exclude=_NOT_IN_IDENTITY | _ONLY_FOR[o.protocol] | {"kind", "backend",
                                                                                          "protocol"})
        return {"kind": self.kind, "backend": o.backend, "model": o.model, "model_sha256": _model_hash(o),
                "protocol": o.protocol, "template_sha256": self.protocol.template_sha256, "options": verdict_options}

    @property
    def no_verdict(self) -> int:
        """Replies that held no usable verdict so far (see the protocols)."""
        return self.protocol.no_verdict

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class LLMPairwiseJudge(LLMJudge):
    """``alpaca_eval``: native ``compare``; ``rank`` sends every pair of a prompt at once."""

    def compare(self, prompt: str, a: str, b: str, meta: Mapping[str, Any] | None = None) -> float:
        return float(self.compare_many([(prompt, a, b)])[0])

    def rank(self, prompt: str, candidates: Sequence[str], meta: Mapping[str, Any] | None = None) -> np.ndarray:
        return pairwise_matrix(len(candidates), lambda pairs: self.compare_many(
            [(prompt, candidates[i], candidates[j]) for i, j in pairs]))

    def compare_many(self, pairs: Sequence[tuple[str, str, str]]) -> np.ndarray:
        """P(a better than b) for each (instruction, a, b); all requests go out together (bounded concurrency)."""
        plans = [[] if a == b else self.protocol.plan(p, a, b) for p, a, b in pairs]  # identical outputs tie
        flat = [req for plan in plans for req, _ in plan]
        before = self.protocol.no_verdict
        replies = iter(self.client.chat_many(flat))
        out = np.full(len(pairs), 0.5)
        for i, plan in enumerate(plans):
            if plan:
                out[i] = self.protocol.verdict([next(replies) for _ in plan], [first for _, first in plan])
        if self.protocol.no_verdict > before:
            log.warning("llm judge: %d of %d comparison(s) had neither identifier among the top log-probs; "
                        "counted as ties", self.protocol.no_verdict - before, len(pairs))
        return out


class LLMRatingJudge(LLMJudge):
    """``mt_bench``: native ``score`` (the 1-10 rating; NaN where the reply holds none)."""

    def score(self, items: Sequence[Item]) -> np.ndarray:
        reqs = [self.protocol.request(it.prompt, it.response, it.meta, i) for i, it in enumerate(items)]
        before = self.protocol.no_verdict
        out = np.array([self.protocol.rating(r) for r in self.client.chat_many(reqs)], dtype=float)
        if self.protocol.no_verdict > before:
            log.warning("llm judge: %d of %d judge reply(ies) held no [[rating]]; scored NaN",
                        self.protocol.no_verdict - before, len(items))
        return out


def _model_hash(o: LLMJudgeOptions) -> str | None:
    """The model's content hash where its files are here: always for ``vllm`` (the engine loads them), for ``http``
    when ``model`` names a local directory (``vllm serve <dir>`` serves it under that name). None for a hosted model,
    whose name is all there is to record."""
    from pipeline_lib import models

    if o.backend == "http" and not Path(o.model).expanduser().is_dir():
        return None
    return models.resolve(o.model).sha256
