"""The judge interface: pointwise ``score``, pairwise ``compare`` and listwise ``rank``.

A judge implements what it can natively; the base class fills in the rest:
- from scores, ``compare`` is the Bradley-Terry probability sigma(s_a - s_b) and ``rank`` the K x K matrix of those;
- from pairwise comparisons, ``rank`` calls ``compare`` on every ordered pair (diagonal 0.5) and ``score`` is the
  mean win probability of each candidate against the others of the same prompt.

Judges register by kind (``@register_judge("rules")``; importing this module runs ``pipeline_lib/judges/__init__.py``
first, which imports every judge module, so they are all registered) and are built by :func:`build_judge` from their
options: the config's typed ``judge`` section (``judges/config.py``), or a mapping (``{"kind": "rules", ...options}``)
parsed here. Unknown kinds and options fail when the config loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from pipeline_lib.artifacts import sha256_json


@dataclass(frozen=True)
class Item:
    """One response to judge. ``meta`` carries per-prompt extras (IFEval instruction ids and kwargs, a
    reference answer, a category) that some judges need and others ignore."""

    prompt: str
    response: str
    meta: Mapping[str, Any] = field(default_factory=dict)


class JudgeOptions(BaseModel):
    """Options common to every judge; each judge subclasses this with its own fields (extra keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    kind: str


class Judge:
    kind: ClassVar[str] = ""
    Options: ClassVar[type[JudgeOptions]] = JudgeOptions
    # A judge that runs a model (or calls one): worth sharding over workers (``scale.shards``); a cheap judge (the
    # rules) annotates in one task whatever the shard count.
    model_based: ClassVar[bool] = True

    def __init__(self, options: JudgeOptions):
        self.options = options

    @property
    def native_score(self) -> bool:
        """Whether this judge scores natively (pointwise); False for a pairwise judge, whose scores are mean win
        probabilities and whose K x K matrix comes from ``rank``."""
        return type(self).score is not Judge.score

    # -- identity, recorded in lineage and used as the judgment cache key -------------------------------------
    def identity(self) -> dict[str, Any]:
        """What determines this judge's verdicts: kind, options, and (for model judges) the model hash and the
        prompt template hash. Subclasses extend this."""
        return {"kind": self.kind, "options": self.options.model_dump()}

    def identity_hash(self) -> str:
        return sha256_json(self.identity())[:16]

    # -- the three views; override at least one of score / compare ------------------------------------------
    def score(self, items: Sequence[Item]) -> np.ndarray:
        """Pointwise scores, higher is better. Default (pairwise-only judges): group items by prompt and give each
        its mean win probability against the others of its group."""
        if type(self).compare is Judge.compare:
            raise NotImplementedError(f"judge {self.kind!r} implements neither score nor compare")
        out = np.zeros(len(items))
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.prompt, []).append(i)
        for prompt, idx in groups.items():
            if len(idx) == 1:
                out[idx[0]] = 0.5
                continue
            m = self.rank(prompt, [items[i].response for i in idx], items[idx[0]].meta)
            k = len(idx)
            out[idx] = (m.sum(axis=1) - 0.5) / (k - 1)  # exclude the diagonal's 0.5
        return out

    def compare(self, prompt: str, a: str, b: str, meta: Mapping[str, Any] | None = None) -> float:
        """P(a is preferred to b). Default: Bradley-Terry on pointwise scores."""
        s = self.score([Item(prompt, a, meta or {}), Item(prompt, b, meta or {})])
        return _sigmoid(float(s[0] - s[1]))

    def rank(self, prompt: str, candidates: Sequence[str], meta: Mapping[str, Any] | None = None) -> np.ndarray:
        """K x K matrix with P(i beats j) at [i, j] and 0.5 on the diagonal."""
        if type(self).score is not Judge.score:  # pointwise judge: one batched call, then Bradley-Terry
            s = self.score([Item(prompt, c, meta or {}) for c in candidates])
            return _sigmoid_np(s[:, None] - s[None, :])
        return pairwise_matrix(len(candidates), lambda pairs: [
            self.compare(prompt, candidates[i], candidates[j], meta) for i, j in pairs])

    def close(self) -> None:
        """Release models or connections."""


def pairwise_matrix(k: int, probabilities: Callable[[list[tuple[int, int]]], Sequence[float]]) -> np.ndarray:
    """The K x K matrix of P(i beats j) from the judge's verdicts on the upper triangle: ``probabilities`` gets the
    pairs (i, j), i < j, in row order, in one call (a batching judge sends them together) and returns P(i beats j)
    for each; [j, i] is 1 - P(i beats j), the diagonal 0.5."""
    upper = [(i, j) for i in range(k) for j in range(i + 1, k)]
    m = np.full((k, k), 0.5)
    for (i, j), p in zip(upper, probabilities(upper) if upper else []):
        m[i, j], m[j, i] = p, 1.0 - p
    return m


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _sigmoid_np(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # numerically stable logistic


JUDGES: dict[str, type[Judge]] = {}


def register_judge(kind: str) -> Callable[[type[Judge]], type[Judge]]:
    def deco(cls: type[Judge]) -> type[Judge]:
        cls.kind = kind
        JUDGES[kind] = cls
        return cls

    return deco


def parse_judge_options(cfg: Mapping[str, Any] | JudgeOptions) -> JudgeOptions:
    """Validate a ``judge`` config mapping against the registered judge's options (raises ValueError); options
    already parsed are returned as they are."""
    if isinstance(cfg, JudgeOptions):
        return cfg
    kind = cfg.get("kind")
    if kind not in JUDGES:
        raise ValueError(f"judge.kind: unknown judge {kind!r}; known: {', '.join(sorted(JUDGES))}")
    return JUDGES[kind].Options.model_validate(dict(cfg))


def build_judge(cfg: Mapping[str, Any] | JudgeOptions) -> Judge:
    """The judge of ``cfg``: typed options (the config's ``judge`` section), or a mapping parsed first."""
    opts = parse_judge_options(cfg)
    return JUDGES[opts.kind](opts)
