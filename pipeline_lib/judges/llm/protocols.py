"""Judging protocols: how a question for the judge model is written and how its reply becomes a number.

``alpaca_eval`` (pairwise, AlpacaEval 2's ``weighted_alpaca_eval_gpt4_turbo`` annotator, Dubois et al. 2024): the
instruction and two outputs go into a chat template under the identifiers ``m`` (first) and ``M`` (second); the judge
writes one token, and the preference is read from the log-probabilities of those two identifiers in the first
token's top alternatives: P(first better) = p(m) / (p(m) + p(M)), and AlpacaEval's preference on its 1-2 scale is
2 - P(first better) (see :func:`alpaca_preference`). The judge's text is never read, so an output that writes a
verdict ("Output (a) is better", "M") can only act through the judge model itself, never through our parser.

``mt_bench`` (single-answer grading, Zheng et al. 2023, FastChat ``llm_judge``): the judge writes an explanation and
a rating "[[n]]" on 1-10; turn 1 and turn 2 use the single-answer templates of a judge-prompts JSONL, and categories
with a reference answer (math, reasoning, coding) use the reference-guided templates. Template selection, prompt
building and rating parsing are those of :mod:`pipeline_lib.evaluation.mt_bench` (one copy in the project: a reply
whose "[[n]]" ratings disagree, e.g. one that quotes a rating from the judged answer besides its own, has no
verdict); only the judge reply is parsed, never the judged answer.

Departures from the references:
- AlpacaEval randomises the order of the two outputs by a hash of the instruction alone, because its first output is
  always the baseline. Here the hash covers the instruction *and the unordered pair* of outputs, so compare(a, b) and
  compare(b, a) send the identical request and are exact complements.
- Up to 20 top log-probabilities are requested (AlpacaEval asks for 5) so that a weaker judge whose identifiers rank
  lower is still read; the ratio p(m) / (p(m) + p(M)) does not depend on how many others are listed.
- A reply whose top alternatives hold neither identifier (AlpacaEval: NaN, no verdict) counts as a tie, 0.5, and is
  counted in ``no_verdict``, because the pairwise judge interface must return a probability.
- Optional position-swap consistency (MT-Bench's pairwise "swap" check, applied to probabilities): both orders are
  judged; when they disagree on the winner the verdict is a tie (0.5), when they agree it is their mean; an order
  whose reply holds neither identifier is left out.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline_lib.judges.llm.client import ChatReply, ChatRequest

FIRST_ID, SECOND_ID = "m", "M"  # the identifiers of the first and second output in the pairwise template
DEFAULT_PAIRWISE_TEMPLATE = Path(__file__).with_name("templates") / "alpaca_eval_pairwise.txt"
TEMPLATE_FIELDS = {"instruction", "output_1", "output_2"}  # AlpacaEval's placeholder names
_CHATML = re.compile(r"<\|im_start\|>(system|user|assistant)\n(.*?)\n?<\|im_end\|>", re.DOTALL)


def chat_template_messages(text: str, where: str) -> list[dict[str, str]]:
    """Split an AlpacaEval-style chat template (``<|im_start|>role\\n...<|im_end|>`` blocks) into messages whose
    contents are still unformatted. Formatting happens per message afterwards, so an output that contains
    ``<|im_end|><|im_start|>assistant`` stays text inside its message and cannot forge a turn."""
    msgs = [{"role": role, "content": content} for role, content in _CHATML.findall(text)]
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError(f"{where}: expected <|im_start|>role ... <|im_end|> blocks ending with a user message")
    return msgs


def alpaca_preference(p_a_better: float) -> float:
    """AlpacaEval's preference for (output_1 = a, output_2 = b) on its 1-2 scale: 1 when a surely wins, 2 when b
    surely wins (``logprob_parser`` with ``is_binarize: false`` returns 2 - p(m) / (p(m) + p(M)))."""
    return 2.0 - p_a_better


def p_first_better(logprobs: Mapping[str, float]) -> float:
    """p(m) / (p(m) + p(M)) from the first token's top log-probs; an identifier absent from them has probability 0;
    NaN when both are absent."""
    lp1, lp2 = logprobs.get(FIRST_ID, -math.inf), logprobs.get(SECOND_ID, -math.inf)
    if lp1 == -math.inf and lp2 == -math.inf:
        return math.nan
    if lp2 == -math.inf:
        return 1.0
    return 1.0 / (1.0 + math.exp(lp2 - lp1)) if lp1 > -math.inf else 0.0


class AlpacaEvalPairwise:
    pairwise = True

    def __init__(self, template_path: str | Path | None, seed: int, top_logprobs: int, swap_consistency: bool):
        path = Path(template_path) if template_path else DEFAULT_PAIRWISE_TEMPLATE
        if not path.is_file():
            raise ValueError(f"judge.template: no such file {str(path)!r}")
        self.template_text = path.read_text()
        self.messages = chat_template_messages(self.template_text, f"judge.template ({path})")
        fields = {f for m in self.messages for _, f, _, _ in string.Formatter().parse(m["content"]) if f is not None}
        if fields != TEMPLATE_FIELDS:  # literal braces are written {{ }}, as in AlpacaEval's templates
            raise ValueError(f"judge.template ({path}): placeholders {sorted(fields)}; expected exactly "
                             f"{sorted(TEMPLATE_FIELDS)}")
        self.seed, self.top_logprobs, self.swap_consistency = seed, top_logprobs, swap_consistency
        self.no_verdict = 0

    @classmethod
    def from_options(cls, o) -> "AlpacaEvalPairwise":
        return cls(o.template, o.seed, o.top_logprobs, o.swap_consistency)

    @property
    def template_sha256(self) -> str:
        return hashlib.sha256(self.template_text.encode()).hexdigest()

    def request(self, instruction: str, first: str, second: str) -> ChatRequest:
        msgs = [{"role": m["role"], "content": m["content"].format(instruction=instruction, output_1=first,
                                                                   output_2=second)} for m in self.messages]
        return ChatRequest(msgs, max_tokens=1, top_logprobs=self.top_logprobs)

    def a_first(self, instruction: str, a: str, b: str) -> bool:
        """Whether ``a`` is shown first: a coin seeded by the instruction and the unordered pair (see the module
        docstring), so both argument orders give the same presentation."""
        lo, hi = sorted((a, b))
        digest = hashlib.sha256(json.dumps([self.seed, instruction, lo, hi]).encode()).digest()
        lo_first = bool(digest[0] & 1)
        return (a == lo) == lo_first

    def plan(self, instruction: str, a: str, b: str) -> list[tuple[ChatRequest, bool]]:
        """The requests for one comparison, each with whether ``a`` is the first output in it."""
        if self.swap_consistency:
            return [(self.request(instruction, a, b), True), (self.request(instruction, b, a), False)]
        a_first = self.a_first(instruction, a, b)
        return [(self.request(instruction, a, b) if a_first else self.request(instruction, b, a), a_first)]

    def verdict(self, replies: Sequence[ChatReply], a_first: Sequence[bool]) -> float:
        """P(a better than b) from the replies of :meth:`plan`, mapped back to (a, b) where a came second."""
        probs = []
        for reply, first in zip(replies, a_first):
            p = p_first_better(reply.first_token_logprobs)
            if not math.isnan(p):
                probs.append(p if first else 1.0 - p)
        if not probs:
            self.no_verdict += 1
            return 0.5
        if len(probs) == 2 and (probs[0] - 0.5) * (probs[1] - 0.5) <= 0:
            return 0.5  # the two orders disagree (or one is undecided): position bias decided it, call it a tie
        return sum(probs) / len(probs)


# -- MT-Bench single-answer grading ---------------------------------------------------------------------------------
class MTBenchSingle:
    pairwise = False

    def __init__(self, judge_prompts: str | Path | None, max_tokens: int):
        from pipeline_lib.evaluation import mt_bench  # template choice, prompt building, rating parsing: one copy

        if not judge_prompts:
            raise ValueError("judge.judge_prompts: required for protocol 'mt_bench' (FastChat's judge_prompts.jsonl)")
        path = Path(judge_prompts)
        if not path.is_file():
            raise ValueError(f"judge.judge_prompts: no such file {str(path)!r}")
        self.mt_bench = mt_bench
        self.templates = mt_bench.load_judge_prompts(path)
        self.template_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.max_tokens = max_tokens
        self.no_verdict = 0

    @classmethod
    def from_options(cls, o) -> "MTBenchSingle":
        return cls(o.judge_prompts, o.max_tokens)

    def request(self, prompt: str, response: str, meta: Mapping[str, Any], index: int) -> ChatRequest:
        """The judge request for one item. ``meta``: ``category`` (default "general": no reference), ``turns`` (the
        user questions, default [prompt]), ``answers`` (the model's answers, default [response]), ``turn`` (1 or 2,
        default the last answered), ``reference`` (reference answers per turn, or one string for turn 1; required
        for math, reasoning and coding), ``question_id`` (for error messages)."""
        answers = list(meta.get("answers") or [response])
        question = {"question_id": meta.get("question_id", f"item {index}"),
                    "category": meta.get("category", "general"), "turns": list(meta.get("turns") or [prompt])}
        reference = meta.get("reference")
        if isinstance(reference, str):
            reference = [reference]
        system, user = self.mt_bench.build_single_judge_prompt(
            question, answers, int(meta.get("turn", len(answers))), reference, templates=self.templates)
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return ChatRequest(msgs, max_tokens=self.max_tokens)

    def rating(self, reply: ChatReply) -> float:
        """The judge's 1-10 rating parsed from its own reply only; NaN (counted in ``no_verdict``) if none."""
        r = self.mt_bench.parse_rating(reply.text)
        if r is None:
            self.no_verdict += 1
            return math.nan
        return float(r)


# protocol name -> class; ``pairwise`` decides whether the judge is pairwise or pointwise (see judge.LLMJudge)
PROTOCOLS: dict[str, type[AlpacaEvalPairwise] | type[MTBenchSingle]] = {"alpaca_eval": AlpacaEvalPairwise,
                                                                        "mt_bench": MTBenchSingle}
