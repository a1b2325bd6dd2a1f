"""MT-Bench single-answer grading (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena"),
following FastChat's ``fastchat/llm_judge`` (common.py, gen_model_answer.py, gen_judgment.py, show_result.py).

- Questions: 80, two turns each, 8 categories. Answers are generated turn by turn, turn 2 with turn 1's question and
  answer in context, at a per-category temperature (:data:`TEMPERATURE`, FastChat's ``temperature_config``; greedy
  below 1e-4), up to 1024 new tokens.
- Judging: one judge call per (question, turn). Turn 1 uses the ``single-v1`` template (question + answer), turn 2
  ``single-v1-multi-turn`` (the whole two-turn conversation, judged on the second answer). Categories in
  :data:`REFERENCE_CATEGORIES` (math, reasoning, coding) use the reference-guided ``single-math-v1`` /
  ``single-math-v1-multi-turn`` templates with GPT-4's reference answers. Templates are read from the judge-prompts
  JSONL, never written here.
- Rating: FastChat reads ``[[n]]`` from the judge's reply, falling back to ``[n]``. Scores: the mean of valid ratings
  per turn, per category, and overall (all valid ratings of both turns, as ``show_result.py``).

Departures from FastChat:
- :func:`parse_rating` needs the reply's ``[[n]]`` ratings on 1-10 to agree (FastChat takes the first match). A
  judge that quotes the judged answer ("... the answer says 'output [[10]]'") before or after its own verdict
  leaves two different ratings in its reply, and neither the first nor the last is safe to read: such a reply has
  no verdict. Ratings outside 1-10 are not ratings (FastChat keeps them) and are ignored, so a stray ``[[100]]``
  does not discard a valid ``[[8]]``. With one rating in the reply, the rules agree.
- The ``[n]`` fallback is read only right after "Rating:" (FastChat reads any ``[n]``, so "source [3]" was a 3).
- :func:`aggregate` reports the number of invalid ratings per group instead of dropping them silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline_lib.evaluation.data import read_jsonl

HUB_QUESTIONS = "lighteval/mt-bench"  # FastChat's question.jsonl as a hub dataset (question_id, category, turns)
CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding"})  # FastChat NEED_REF_CATS
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7  # FastChat's value for a category not in its table
MAX_NEW_TOKENS = 1024
# (reference-guided, turn) -> judge template name in judge_prompts.jsonl (FastChat make_judge_single)
SINGLE_TEMPLATES = {(False, 1): "single-v1", (True, 1): "single-math-v1",
                    (False, 2): "single-v1-multi-turn", (True, 2): "single-math-v1-multi-turn"}
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_FALLBACK = re.compile(r"\brating\s*:?\s*\[(\d+\.?\d*)\]", re.IGNORECASE)  # "Rating: [7]" only


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str  # "single" or "pairwise"
    system_prompt: str
    prompt_template: str
    output_format: str


# -- data -----------------------------------------------------------------------------------------------------------
def load_questions(path: str | Path | None = None) -> list[dict[str, Any]]:
    """MT-Bench questions (``question_id``, ``category``, ``turns``, any other fields kept). From the hub without
    ``path``, else FastChat's ``question.jsonl``. ValueError naming the file and question for a malformed one."""
    if path is None:
        from datasets import load_dataset

        rows, where = [dict(r) for r in load_dataset(HUB_QUESTIONS, split="train")], HUB_QUESTIONS
    else:
        rows, where = read_jsonl(path), str(path)
    seen = set()
    for n, q in enumerate(rows, start=1):
        for key in ("question_id", "category", "turns"):
            if key not in q:
                raise ValueError(f"{where} question {n}: missing field {key!r}")
        turns = q["turns"] = list(q["turns"])
        if not turns or len(turns) > 2 or not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{where} question {q['question_id']}: 'turns' must be one or two strings")
        if q["question_id"] in seen:
            raise ValueError(f"{where}: question_id {q['question_id']} appears more than once")
        seen.add(q["question_id"])
    if not rows:
        raise ValueError(f"{where}: no questions")
    return rows


def load_reference_answers(path: str | Path) -> dict[Any, list[str]]:
    """question_id -> the reference answer for each turn (FastChat's ``reference_answer/gpt-4.jsonl``:
    ``choices[0].turns``)."""
    out = {}
    for n, row in enumerate(read_jsonl(path), start=1):
        try:
            turns = row["choices"][0]["turns"]
            qid = row["question_id"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{path} line {n}: expected question_id and choices[0].turns") from None
        if not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{path} line {n}: reference turns must be strings")
        out[qid] = list(turns)
    return out


def load_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """Judge templates by name from FastChat's ``judge_prompts.jsonl``."""
    out = {}
    for n, row in enumerate(read_jsonl(path), start=1):
        missing = [k for k in ("name", "type", "system_prompt", "prompt_template", "output_format") if k not in row]
        if missing:
            raise ValueError(f"{path} line {n}: missing field(s) {', '.join(missing)}")
        out[row["name"]] = JudgePrompt(row["name"], row["type"], row["system_prompt"], row["prompt_template"],
                                       row["output_format"])
    return out


# -- answering ------------------------------------------------------------------------------------------------------
def sampling_temperature(category: str) -> float:
    """FastChat's per-category temperature; 0.0 means greedy decoding."""
    return TEMPERATURE.get(category, DEFAULT_TEMPERATURE)


def conversation(question: Mapping[str, Any], answers: Sequence[str], turn: int) -> list[dict[str, str]]:
    """Chat messages that ask for the model's answer to ``turn`` (1-based): each earlier turn's question and the
    model's own answer to it, then this turn's question. No system message (FastChat uses the model's default
    conversation template)."""
    turns = question["turns"]
    if not 1 <= turn <= len(turns):
        raise ValueError(f"question {question.get('question_id')}: turn {turn} not in 1..{len(turns)}")
    if len(answers) < turn - 1:
        raise ValueError(f"question {question.get('question_id')}: turn {turn} needs the answers to the "
                         f"{turn - 1} earlier turn(s), got {len(answers)}")
    msgs = []
    for t in range(turn - 1):
        msgs += [{"role": "user", "content": turns[t]}, {"role": "assistant", "content": answers[t]}]
    return msgs + [{"role": "user", "content": turns[turn - 1]}]


# -- judging --------------------------------------------------------------------------------------------------------
def judge_template_name(category: str, turn: int) -> str:
    """The single-answer template for a category and turn (reference-guided for math, reasoning, coding)."""
    if turn not in (1, 2):
        raise ValueError(f"turn {turn}: MT-Bench judges turn 1 or 2")
    return SINGLE_TEMPLATES[(category in REFERENCE_CATEGORIES, turn)]


def build_single_judge_prompt(question: Mapping[str, Any], answers: Sequence[str], turn: int,
                              reference: Sequence[str] | None = None, *,
                              templates: Mapping[str, JudgePrompt]) -> tuple[str, str]:
    """(system prompt, user prompt) asking the judge to rate the model's answer to ``turn`` of ``question``
    (``category``, ``turns``). ``answers``: the model's answers per turn; ``reference``: the reference answers per
    turn, required for the reference-guided categories and ignored for the others (FastChat passes none there)."""
    qid = question.get("question_id", "?")
    category, turns = question["category"], question["turns"]
    name = judge_template_name(category, turn)
    if name not in templates:
        raise ValueError(f"judge prompts: no template {name!r} (needed for {category} turn {turn})")
    t = templates[name]
    if t.type != "single" or t.output_format != "[[rating]]":
        raise ValueError(f"judge prompts: template {name!r} is not a single-answer [[rating]] template")
    if len(turns) < turn or len(answers) < turn:
        raise ValueError(f"question {qid}: turn {turn} needs {turn} question(s) and answer(s), got {len(turns)} "
                         f"and {len(answers)}")
    fields: dict[str, str] = {}
    if category in REFERENCE_CATEGORIES:
        if reference is None or len(reference) < turn:
            raise ValueError(f"question {qid} ({category}): the reference-guided template needs reference answers "
                             f"for turn(s) 1..{turn}")
        fields.update({f"ref_answer_{i + 1}": reference[i] for i in range(turn)})
    if turn == 1:
        fields.update(question=turns[0], answer=answers[0])
    else:
        fields.update(question_1=turns[0], question_2=turns[1], answer_1=answers[0], answer_2=answers[1])
    # str.format substitutes each value once and never re-reads it, so braces inside an answer stay text
    return t.system_prompt, t.prompt_template.format(**fields)


def parse_rating(judge_reply: str) -> float | None:
    """The rating in the judge's reply: the one value on 1-10 that its ``[[n]]`` give (repeats allowed), else the
    one that its "Rating: [n]" give; None if there is none, or more than one distinct value (a reply that quotes a
    rating besides its own verdict, see the module docstring). Only the judge's reply is parsed; the judged answer
    is part of the prompt and never read here."""
    for pattern in (_RATING, _RATING_FALLBACK):
        found = pattern.findall(judge_reply or "")
        if found:
            values = {float(v) for v in found if 1.0 <= float(v) <= 10.0}
            return values.pop() if len(values) == 1 else None
    return None


# -- scores ---------------------------------------------------------------------------------------------------------
def aggregate(ratings: pd.DataFrame) -> dict[str, Any]:
    """Scores of one model from a table with ``category``, ``turn`` (1 or 2) and ``rating`` (1-10; None, NaN or
    FastChat's -1 = the judge gave no valid rating). Each group reports ``score`` (mean of its valid ratings, NaN if
    none), ``n_valid`` and ``n_invalid``: ``overall`` (all ratings of both turns, as FastChat's average),
    ``per_turn`` and ``per_category`` (categories in MT-Bench's order, unknown ones after, by name)."""
    missing = [c for c in ("category", "turn", "rating") if c not in ratings.columns]
    if missing:
        raise ValueError(f"ratings: missing column(s) {', '.join(missing)}")
    if "model" in ratings.columns and ratings["model"].nunique() > 1:
        raise ValueError(f"ratings: {ratings['model'].nunique()} models in one table; aggregate one model at a time")
    df = ratings.reset_index(drop=True)
    turn = pd.to_numeric(df["turn"], errors="coerce")
    bad = np.flatnonzero(~turn.isin([1, 2]).to_numpy())
    if bad.size:
        raise ValueError(f"ratings row {bad[0]}: turn {df['turn'].tolist()[bad[0]]!r} is not 1 or 2")
    raw = df["rating"]
    num = pd.to_numeric(raw, errors="coerce")
    bad = np.flatnonzero((num.isna() & raw.notna()).to_numpy() | ((num != -1) & ((num < 1) | (num > 10))).to_numpy())
    if bad.size:
        raise ValueError(f"ratings row {bad[0]}: rating {raw.tolist()[bad[0]]!r} is not in 1-10 "
                         "(use None or -1 for no valid rating)")
    rating = num.where(num != -1)
    table = pd.DataFrame({"category": df["category"].astype(str), "turn": turn.astype(int),
                          "rating": rating.astype(float)})

    def group(g: pd.DataFrame) -> dict[str, Any]:
        valid = g["rating"].dropna()
        return {"score": float(valid.mean()) if len(valid) else float("nan"), "n_valid": int(len(valid)),
                "n_invalid": int(g["rating"].isna().sum())}

    order = [c for c in CATEGORIES if c in set(table["category"])]
    order += sorted(set(table["category"]) - set(CATEGORIES))
    return {"overall": group(table),
            "per_turn": {str(t): group(table[table["turn"] == t]) for t in sorted(table["turn"].unique())},
            "per_category": {c: group(table[table["category"] == c]) for c in order}}


def category_chart(summary: Mapping[str, Any], path: str | Path, title: str = "MT-Bench") -> Path:
    """A horizontal bar chart of the per-category scores (0-10) written as PNG, invalid counts in the labels.
    Uses matplotlib's Agg canvas directly, so no global backend is switched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cats = list(summary["per_category"])
    scores = [summary["per_category"][c]["score"] for c in cats]
    labels = [c + (f" ({summary['per_category'][c]['n_invalid']} invalid)"
                   if summary["per_category"][c]["n_invalid"] else "") for c in cats]
    fig = Figure(figsize=(7, 0.45 * len(cats) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = np.arange(len(cats))[::-1]
    ax.barh(y, np.nan_to_num(scores), color="#4C72B0")
    for yi, s in zip(y, scores):
        ax.text(min(s, 9.3) + 0.1 if np.isfinite(s) else 0.1, yi, f"{s:.2f}" if np.isfinite(s) else "n/a",
                va="center")
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 10)
    ax.set_xlabel("mean rating (1-10)")
    ax.set_title(f"{title}: overall {summary['overall']['score']:.2f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
