"""The built-in prompt source: a base task ("Write a short poem about honeybees.") plus one or two verifiable
constraints phrased like IFEval's instruction descriptions, with IFEval instruction ids and kwargs, so the
``rules`` judge can score responses.

The constraints are the ones a small (~135M) instruction model can sometimes satisfy (word limits, lower case, no
commas, an end phrase, a keyword, a bullet count, a title, ...): a reward that is never earned teaches nothing.
Train and held-out prompts draw on disjoint topic pools, so held-out scores measure constraint following on unseen
tasks. Each split has len(TASK_TEMPLATES) x 25 = 150 base tasks; a split's first 150 prompts use distinct base
tasks.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Callable, Literal

import pandas as pd

from pipeline_lib.artifacts import sha256_json

TASK_TEMPLATES = [
    "Write a short paragraph about {}.",
    "Explain {} in simple words.",
    "Write a short poem about {}.",
    "Describe {} to a ten-year-old.",
    "Give some practical advice about {}.",
    "Write a short story that involves {}.",
]

TOPICS = {
    "train": [
        "honeybees", "the water cycle", "volcanoes", "learning to ride a bicycle", "the moon", "rainforests",
        "making bread at home", "recycling", "the ocean tides", "a visit to the library", "growing tomatoes",
        "friendship", "the history of the printing press", "saving money", "thunderstorms", "penguins",
        "a train journey", "the human heart", "learning a new language", "autumn leaves", "electric cars",
        "a city park", "playing chess", "deserts", "the first day at a new school",
    ],
    "heldout": [
        "dolphins", "the solar system", "earthquakes", "learning to swim", "the sun", "coral reefs",
        "cooking pasta", "composting", "mountain glaciers", "a trip to a museum", "keeping houseplants",
        "teamwork", "the invention of the telephone", "planning a budget", "snowfall", "owls",
        "an airplane flight", "the human brain", "practicing the piano", "spring flowers", "solar panels",
        "a farmers market", "playing football", "wetlands", "moving to a new city",
    ],
}

END_PHRASES = ["Is there anything else I can help with?", "Any other questions?", "That is all.",
               "Thank you for reading."]
KEYWORDS = ["simple", "important", "example", "because", "today", "happy", "together", "future"]
FORBIDDEN = ["very", "really", "thing", "good", "many", "also"]

# A constraint maker draws kwargs from an rng and returns (instruction_id, kwargs, sentence for the prompt).
Constraint = tuple[str, dict, str]
CONSTRAINTS: dict[str, Callable[[random.Random], Constraint]] = {}
# Constraints of the same group are never combined (they conflict, or two length limits confuse).
GROUPS = {"change_case:english_lowercase": "case", "change_case:english_capital": "case",
          "length_constraints:number_words": "length", "length_constraints:number_sentences": "length",
          "detectable_format:number_bullet_lists": "length"}


def constraint(iid: str):
    def deco(fn: Callable[[random.Random], tuple[dict, str]]):
        CONSTRAINTS[iid] = lambda rng: (iid, *fn(rng))
        return fn

    return deco


@constraint("length_constraints:number_words")
def _number_words(rng):
    relation, n = rng.choice([("less than", 20), ("less than", 30), ("less than", 40), ("less than", 50),
                              ("less than", 80), ("at least", 10), ("at least", 20), ("at least", 40)])
    return {"relation": relation, "num_words": n}, f"Answer with {relation} {n} words."


@constraint("change_case:english_lowercase")
def _lowercase(rng):
    return {}, ("Your entire response should be in English, and in all lowercase letters. "
                "No capital letters are allowed.")


@constraint("change_case:english_capital")
def _capital(rng):
    return {}, "Your entire response should be in English, and in all capital letters."


@constraint("punctuation:no_comma")
def _no_comma(rng):
    return {}, "In your entire response, refrain from the use of any commas."


@constraint("startend:end_checker")
def _end_phrase(rng):
    phrase = rng.choice(END_PHRASES)
    return {"end_phrase": phrase}, (f"Finish your response with this exact phrase {phrase} "
                                    "No other words should follow this phrase.")


@constraint("keywords:existence")
def _keywords(rng):
    words = sorted(rng.sample(KEYWORDS, rng.choice([1, 2])))
    quoted = " and ".join(f'"{w}"' for w in words)
    return {"keywords": words}, f"Include the keyword{'s' if len(words) > 1 else ''} {quoted} in the response."


@constraint("keywords:forbidden_words")
def _forbidden(rng):
    words = sorted(rng.sample(FORBIDDEN, 2))
    return {"forbidden_words": words}, f'Do not include the words "{words[0]}" or "{words[1]}" in the response.'


@constraint("detectable_format:number_bullet_lists")
def _bullets(rng):
    n = rng.randint(2, 5)
    return {"num_bullets": n}, (f"Your answer must contain exactly {n} bullet points. "
                                "Use the markdown bullet points such as:\n* This is point 1.\n* This is point 2")


@constraint("detectable_format:title")
def _title(rng):
    return {}, "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."


@constraint("length_constraints:number_sentences")
def _sentences(rng):
    relation, n = rng.choice([("less than", 3), ("less than", 4), ("less than", 6), ("at least", 2),
                              ("at least", 3)])
    return {"relation": relation, "num_sentences": n}, f"Your response should contain {relation} {n} sentences."


@constraint("detectable_content:postscript")
def _postscript(rng):
    return {"postscript_marker": "P.S."}, ("At the end of your response, please explicitly add a postscript "
                                           "starting with P.S.")


@constraint("startend:quotation")
def _quotation(rng):
    return {}, "Wrap your entire response with double quotation marks."


def base_tasks(split: str) -> list[str]:
    if split not in TOPICS:
        raise ValueError(f"split must be one of {sorted(TOPICS)}, got {split!r}")
    return [t.format(topic) for topic in TOPICS[split] for t in TASK_TEMPLATES]


def _rng(seed: int, split: str, purpose: str) -> random.Random:
    digest = hashlib.sha256(f"alignflow-builtin:{seed}:{split}:{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw_constraints(rng: random.Random) -> list[Constraint]:
    ids = sorted(CONSTRAINTS)
    first = rng.choice(ids)
    chosen = [first]
    if rng.random() < 0.5:
        compatible = [i for i in ids if i != first and (GROUPS.get(i) is None or GROUPS.get(i) != GROUPS.get(first))]
        chosen.append(rng.choice(compatible))
    return [CONSTRAINTS[i](rng) for i in chosen]


def generate_prompts(n: int, seed: int, split: Literal["train", "heldout"]) -> pd.DataFrame:
    """``n`` distinct prompts of ``split``, deterministic in (n, seed, split); a prefix of a longer draw with the
    same seed and split. Columns: prompt_id, prompt, instruction_id_list, kwargs (JSON), base_task, split."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tasks = base_tasks(split)
    _rng(seed, split, "tasks").shuffle(tasks)
    rng = _rng(seed, split, "constraints")
    rows, seen = [], set()
    for i in range(n):
        task = tasks[i % len(tasks)]
        for _ in range(100):  # redraw the rare duplicate (same task and constraints) so prompt ids are unique
            cons = sorted(_draw_constraints(rng), key=lambda c: "\n" in c[2])  # a multi-line example goes last
            prompt = " ".join([task, *(text for _, _, text in cons)])
            if prompt not in seen:
                break
        else:  # the generator's combinations are used up: a one-line data error, not a traceback
            from pipeline_lib.prompts.validate import DataError

            raise DataError("builtin prompts", None, f"the generator ran out of distinct {split} prompts after {i} "
                                                     f"of {n}; lower the prompt count or use a file or hub source")
        seen.add(prompt)
        ids, kwargs = [c[0] for c in cons], [c[1] for c in cons]
        rows.append({"prompt_id": sha256_json({"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs})[:16],
                     "prompt": prompt, "instruction_id_list": ids, "kwargs": json.dumps(kwargs),
                     "base_task": task, "split": split})
    return pd.DataFrame(rows, columns=["prompt_id", "prompt", "instruction_id_list", "kwargs", "base_task", "split"])
