"""The built-in prompt generator: determinism, disjoint splits, variety, and constraints that the rules judge can
check and a response can satisfy."""

from __future__ import annotations

import json

import pytest

from pipeline_lib.artifacts import sha256_json
from pipeline_lib.judges.rules import follow_list
from pipeline_lib.prompts.builtin import TASK_TEMPLATES, base_tasks, generate_prompts
from pipeline_lib.prompts.constraints import CONSTRAINTS


def test_deterministic_and_prefix_stable():
    a, b = generate_prompts(60, 7, "train"), generate_prompts(60, 7, "train")
    assert a.equals(b)
    longer = generate_prompts(90, 7, "train")
    assert longer.head(60).equals(a)  # a larger draw extends, never reshuffles, a smaller one
    assert not generate_prompts(60, 8, "train")["prompt"].equals(a["prompt"])  # the seed matters


def test_columns_types_and_stable_ids():
    df = generate_prompts(20, 0, "heldout")
    assert list(df.columns) == ["prompt_id", "prompt", "instruction_id_list", "kwargs", "base_task", "split"]
    assert (df["split"] == "heldout").all()
    for r in df.itertuples():
        kwargs = json.loads(r.kwargs)
        assert len(kwargs) == len(r.instruction_id_list) in (1, 2, 3)
        assert r.prompt.startswith(r.base_task)
        # the id is a hash of the content, so the same prompt gets the same id in any run or split position
        assert r.prompt_id == sha256_json({"prompt": r.prompt, "instruction_id_list": list(r.instruction_id_list),
                                           "kwargs": kwargs})[:16]
    assert df["prompt_id"].is_unique


def test_splits_use_disjoint_base_tasks_and_each_has_many():
    train, heldout = set(base_tasks("train")), set(base_tasks("heldout"))
    assert not train & heldout
    assert len(train) >= 40 and len(heldout) >= 40
    df_train, df_heldout = generate_prompts(300, 1, "train"), generate_prompts(300, 1, "heldout")
    assert not set(df_train["base_task"]) & set(df_heldout["base_task"])
    n = len(TASK_TEMPLATES) * 25
    assert len(base_tasks("train")) == n
    assert generate_prompts(n, 1, "heldout")["base_task"].nunique() == n  # the first n prompts: n different tasks


def test_constraint_mix():
    """Half the prompts carry one constraint, about a third two, the rest three (IFEval: 56/33/11%); never two of
    one conflict group, an `alone` kind always alone, the yes/no reply only on questions; all 25 IFEval kinds appear
    in 3000 prompts."""
    df = generate_prompts(3000, 0, "train")
    sizes = df["instruction_id_list"].map(len)
    assert 0.45 < (sizes == 1).mean() < 0.6 and 0.28 < (sizes == 2).mean() < 0.4 and 0.08 < (sizes == 3).mean() < 0.2
    for task, ids in zip(df["base_task"], df["instruction_id_list"]):
        assert len(set(ids)) == len(ids)
        groups = [g for i in ids for g in CONSTRAINTS[i].groups]
        assert len(groups) == len(set(groups)), ids
        assert len(ids) == 1 or not any(CONSTRAINTS[i].alone for i in ids), ids
        assert "detectable_format:constrained_response" not in ids or task.endswith("?")
    assert set(i for ids in df["instruction_id_list"] for i in ids) == set(CONSTRAINTS)
    assert len(CONSTRAINTS) == 25


def _ifeval_ngrams(n: int = 10) -> set[tuple[str, ...]]:
    from pipeline_lib.evaluation.ifeval import load_rows
    from tests.conftest import shared_dir

    rows, _ = load_rows(str(shared_dir() / "data" / "ifeval" / "input_data.jsonl"))
    out = set()
    for p in rows["prompt"]:
        w = p.lower().split()
        out |= {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    return out


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_no_prompt_shares_ten_consecutive_words_with_ifeval(split):
    """IFEval is an evaluation set: no generated prompt (3000 per split and seed, two seeds: every phrasing of every
    kind drawn many times) contains a run of 10 words of any IFEval prompt. The test has teeth: IFEval's own
    lowercase instruction, as the old generator phrased it, is caught."""
    grams = _ifeval_ngrams()
    leaked = ("Write a poem. Your entire response should be in English, and in all lowercase letters. No capital "
              "letters are allowed.").lower().split()
    assert any(tuple(leaked[i:i + 10]) in grams for i in range(len(leaked) - 9))
    for seed in (0, 1):
        for p in generate_prompts(3000, seed, split)["prompt"]:
            w = p.lower().split()
            hits = [" ".join(w[i:i + 10]) for i in range(len(w) - 9) if tuple(w[i:i + 10]) in grams]
            assert not hits, (p, hits)


def _complying_response(iid: str, kw: dict) -> str:
    """A response that follows one constraint, built from its kwargs."""
    relation = kw.get("relation")
    paragraphs = lambda n, sep, first="": sep.join(  # noqa: E731
        (f"{first} para." if i == kw.get("nth_paragraph", 0) - 1 else "Para.") for i in range(n))
    build = {
        "length_constraints:number_words":
            lambda: " ".join(["word"] * (kw["num_words"] - 1 if relation == "less than" else kw["num_words"])),
        "length_constraints:number_sentences":
            lambda: "One." if relation == "less than" else " ".join(["One."] * kw["num_sentences"]),
        "length_constraints:number_paragraphs": lambda: paragraphs(kw["num_paragraphs"], "\n***\n"),
        "length_constraints:nth_paragraph_first_word":
            lambda: paragraphs(kw["num_paragraphs"], "\n\n", kw["first_word"].capitalize()),
        "change_case:english_lowercase": lambda: "this is all lower case english and it is fine.",
        "change_case:english_capital": lambda: "THIS IS ALL CAPITAL ENGLISH AND IT IS FINE.",
        "change_case:capital_word_frequency": lambda: " ".join(
            ["LOUD"] * (kw["capital_frequency"] - 1 if kw["capital_relation"] == "less than"
                        else kw["capital_frequency"]) + ["quiet words."]),
        "language:response_language": lambda: {
            "es": "El perro come la comida en la casa con su familia todos los días.",
            "fr": "Le chien mange la nourriture dans la maison avec sa famille tous les jours.",
            "de": "Der Hund isst das Essen im Haus mit seiner Familie jeden Tag.",
            "it": "Il cane mangia il cibo nella casa con la sua famiglia tutti i giorni.",
            "pt": "O cachorro come a comida na casa com a sua família todos os dias."}[kw["language"]],
        "punctuation:no_comma": lambda: "No commas here.",
        "startend:end_checker": lambda: f"Done. {kw.get('end_phrase')}",
        "startend:quotation": lambda: '"Quoted."',
        "keywords:existence": lambda: " ".join(kw.get("keywords", [])),
        "keywords:frequency": lambda: " ".join(
            [kw["keyword"]] * (kw["frequency"] - 1 if relation == "less than" else kw["frequency"])),
        "keywords:forbidden_words": lambda: "Nothing forbidden here.",
        "keywords:letter_frequency": lambda: "x" + kw["letter"] * (
            kw["let_frequency"] - 1 if kw["let_relation"] == "less than" else kw["let_frequency"]),
        "detectable_format:number_bullet_lists": lambda: "\n".join(["* point"] * kw.get("num_bullets", 0)),
        "detectable_format:number_highlighted_sections": lambda: " ".join(["*key*"] * kw["num_highlights"]),
        "detectable_format:multiple_sections": lambda: "\n".join(
            f"{kw['section_spliter']} {i + 1}\ntext" for i in range(kw["num_sections"])),
        "detectable_format:json_format": lambda: '```json\n{"answer": 1}\n```',
        "detectable_format:constrained_response": lambda: "My answer is maybe.",
        "detectable_format:title": lambda: "<<A title>>\nText.",
        "detectable_content:postscript": lambda: f"Text.\n{kw['postscript_marker']} bye",
        "detectable_content:number_placeholders": lambda: " ".join(["[blank]"] * kw["num_placeholders"]),
        "combination:two_responses": lambda: "First answer.\n******\nSecond answer.",
        "combination:repeat_prompt": lambda: kw["prompt_to_repeat"] + " And here is my answer.",
    }
    return build[iid]()


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_generated_constraint_is_checkable_and_satisfiable(split):
    """Every (id, kwargs) the generator writes binds to a checker (through the JSON column) and accepts a
    response written to follow it (strict mode)."""
    df = generate_prompts(1500, 2, split)
    seen = set()
    for r in df.itertuples():
        seen |= set(r.instruction_id_list)
        for iid, kw in zip(r.instruction_id_list, json.loads(r.kwargs)):
            assert follow_list(r.prompt, _complying_response(iid, kw), [iid], [kw]) == [True], (iid, kw)
            assert follow_list(r.prompt, "", [iid], [kw]) == [False]  # an empty reply follows nothing (strict)
    assert seen == set(CONSTRAINTS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        generate_prompts(3, 0, "test")
    with pytest.raises(ValueError, match="n must be"):
        generate_prompts(-1, 0, "train")
    assert len(generate_prompts(0, 0, "train")) == 0
