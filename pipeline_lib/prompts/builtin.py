"""The built-in prompt source: a base task ("Write a short poem about honeybees.") plus one to three verifiable
constraints of the 25 IFEval instruction types (:mod:`pipeline_lib.prompts.constraints`: kwargs drawn at random,
several phrasings of our own each), with IFEval instruction ids and kwargs, so the ``rules`` judge can score
responses.

Train and held-out prompts draw on disjoint topic pools, so held-out scores measure constraint following on unseen
tasks. Each split has len(TASK_TEMPLATES) x 25 = 500 base tasks; a split's first 500 prompts use distinct base
tasks. No prompt copies IFEval's text (see the constraints module), so IFEval stays a held-out benchmark.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Literal

import pandas as pd

from pipeline_lib.artifacts import sha256_json
from pipeline_lib.prompts.constraints import CONSTRAINTS, compatible

TASK_TEMPLATES = [
    "Write a short paragraph about {}.",
    "Explain {} in simple words.",
    "Write a short poem about {}.",
    "Describe {} to a ten-year-old.",
    "Give some practical advice about {}.",
    "Write a short story that involves {}.",
    "Write a blog post about {}.",
    "Write an email to a friend about {}.",
    "Write a short speech about {}.",
    "Write a diary entry about {}.",
    "Write a product description for a book about {}.",
    "Write a dialogue between two classmates about {}.",
    "Write a song about {}.",
    "List some interesting facts about {}.",
    "Write a short essay about {}.",
    "Write a riddle about {}.",
    "Write an advertisement for a class about {}.",
    "Summarize what a beginner should know about {}.",
    # yes/no questions: the only tasks the fixed-sentence reply (detectable_format:constrained_response) goes with
    "Is it worth learning about {}?",
    "Would you recommend a school trip about {}?",
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

# How many constraints a prompt carries: IFEval's 541 prompts have one (56%), two (33%) or three (11%).
N_CONSTRAINTS = [(1, 0.5), (2, 0.35), (3, 0.15)]
Constraint = tuple[str, dict, str]  # (instruction id, kwargs, sentence for the prompt)
MAX_PER_TASK = 100  # prompts per base task a split may draw: beyond that, the same 500 tasks over and over


def base_tasks(split: str) -> list[str]:
    if split not in TOPICS:
        raise ValueError(f"split must be one of {sorted(TOPICS)}, got {split!r}")
    return [t.format(topic) for topic in TOPICS[split] for t in TASK_TEMPLATES]


def _rng(seed: int, split: str, purpose: str) -> random.Random:
    digest = hashlib.sha256(f"alignflow-builtin:{seed}:{split}:{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw_constraints(rng: random.Random, task: str) -> list[Constraint]:
    """One to three mutually compatible constraints that fit ``task`` (see ``constraints.GROUPS``)."""
    ids = sorted(CONSTRAINTS)
    n = rng.choices([k for k, _ in N_CONSTRAINTS], weights=[w for _, w in N_CONSTRAINTS])[0]
    chosen: list[str] = []
    for _ in range(n):
        options = [i for i in ids if CONSTRAINTS[i].fits(task) and (not chosen or compatible(chosen, i))]
        if not options:
            break
        chosen.append(rng.choice(options))
        if CONSTRAINTS[chosen[0]].alone:
            break
    return [(i, *CONSTRAINTS[i].make(rng, task)) for i in chosen]


def generate_prompts(n: int, seed: int, split: Literal["train", "heldout"]) -> pd.DataFrame:
    """``n`` distinct prompts of ``split``, deterministic in (n, seed, split); a prefix of a longer draw with the
    same seed and split. Columns: prompt_id, prompt, instruction_id_list, kwargs (JSON), base_task, split."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tasks = base_tasks(split)
    if n > MAX_PER_TASK * len(tasks):  # refused before drawing: 10 million prompts would take minutes and GiBs
        from pipeline_lib.prompts.validate import DataError

        raise DataError("builtin prompts", None, f"{n} {split} prompts asked for; the generator draws at most "
                                                 f"{MAX_PER_TASK * len(tasks)} ({MAX_PER_TASK} per base task): lower "
                                                 "the prompt count or use a file or hub source")
    _rng(seed, split, "tasks").shuffle(tasks)
    rng = _rng(seed, split, "constraints")
    rows, seen = [], set()
    for i in range(n):
        task = tasks[i % len(tasks)]
        for _ in range(100):  # redraw the rare duplicate (same task and constraints) so prompt ids are unique
            cons = sorted(_draw_constraints(rng, task), key=lambda c: "\n" in c[2])  # a multi-line example goes last
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
