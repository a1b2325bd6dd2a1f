"""Verifiable constraints for the builtin prompt generator: all 25 IFEval instruction types, each with its kwargs drawn
from an rng and several phrasings of our own.

A constraint maker takes ``(rng, task)`` and returns ``(kwargs, sentence)``; the sentence is appended to the base
task, and ``(instruction id, kwargs)`` is what the ``rules`` judge checks (:mod:`pipeline_lib.judges.rules`).

Why several phrasings, none of them IFEval's: a model trained on one wording learns that wording; IFEval states the
same instruction types in many ways, and is an evaluation set whose text must never be trained on. So every sentence
here is written for this project (``tests/unit/test_prompts_builtin.py`` checks that no generated prompt shares a run
of 10 consecutive words with any IFEval prompt), and each type has 3-4 phrasings drawn at random.

``GROUPS``: constraints sharing a group are never combined in one prompt because they contradict or make each other
unverifiable (two case rules; two length or layout counts; two rules about the last line; a reply that must start
with the repeated request cannot start with a quotation mark). ``ALONE``: JSON and the fixed-sentence reply admit no
other formatting. The fixed-sentence reply (``constrained_response``) only fits a yes/no question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

END_PHRASES = ["Is there anything else I can help with?", "Any other questions?", "That is all.",
               "Thank you for reading.", "Let me know if you have additional questions.", "Have a nice day!"]
KEYWORDS = ["simple", "important", "example", "because", "today", "happy", "together", "future", "family", "friend",
            "nature", "morning", "history", "science", "journey", "garden", "music", "light"]
FORBIDDEN = ["very", "really", "thing", "good", "many", "also", "just", "great", "like", "nice", "some", "big"]
FIRST_WORDS = ["first", "today", "however", "imagine", "finally", "sometimes", "people", "this", "when", "our"]
LETTERS = list("abcdeghilmnoprstuwy")
LANGUAGES = {"es": "Spanish", "fr": "French", "de": "German", "it": "Italian", "pt": "Portuguese"}
SPLITTERS = ["Section", "SECTION", "Part", "PART"]
PLACEHOLDER_EXAMPLES = ["[name]", "[city]", "[date]", "[address]", "[phone number]"]


@dataclass(frozen=True)
class ConstraintKind:
    make: Callable[[random.Random, str], tuple[dict, str]]
    groups: frozenset[str] = field(default_factory=frozenset)
    alone: bool = False  # never combined with another constraint
    fits: Callable[[str], bool] = lambda task: True  # noqa: E731  (which base tasks it can go with)


CONSTRAINTS: dict[str, ConstraintKind] = {}


def constraint(iid: str, groups: tuple[str, ...] = (), alone: bool = False,
               fits: Callable[[str], bool] | None = None):
    def deco(fn: Callable[[random.Random, str], tuple[dict, str]]):
        CONSTRAINTS[iid] = ConstraintKind(fn, frozenset(groups), alone, fits or (lambda task: True))
        return fn

    return deco


def _pick(rng: random.Random, phrasings: list[str], **values) -> str:
    return rng.choice(phrasings).format(**values)


def _quoted(words: list[str]) -> str:
    q = [f'"{w}"' for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + f" and {q[-1]}"


# ---- keywords ----------------------------------------------------------------------------------------------------

@constraint("keywords:existence")
def _keywords(rng, task):
    words = sorted(rng.sample(KEYWORDS, rng.choice([1, 2])))
    s = "s" if len(words) > 1 else ""
    return {"keywords": words}, _pick(rng, [
        "Make sure the word{s} {w} appear{v} somewhere in your answer.",
        "Your reply has to mention {w}.",
        "Use the keyword{s} {w} in what you write.",
    ], s=s, w=_quoted(words), v="" if s else "s")


@constraint("keywords:frequency")
def _keyword_frequency(rng, task):
    word = rng.choice(KEYWORDS)
    relation, n = rng.choice([("at least", 2), ("at least", 3), ("at least", 4), ("less than", 2), ("less than", 3)])
    text = _pick(rng, [
        'Use the word "{w}" at least {n} times.',
        'The word "{w}" should show up {n} or more times in your reply.',
        'Repeat the word "{w}" no fewer than {n} times.',
    ] if relation == "at least" else [
        'Use the word "{w}" fewer than {n} times.',
        'The word "{w}" may appear at most {m} time{s}.',
    ], w=word, n=n, m=n - 1, s="" if n == 2 else "s")
    return {"keyword": word, "frequency": n, "relation": relation}, text


@constraint("keywords:forbidden_words")
def _forbidden(rng, task):
    words = sorted(rng.sample(FORBIDDEN, rng.choice([2, 3])))
    return {"forbidden_words": words}, _pick(rng, [
        "Avoid the words {w} completely.",
        "Never use any of these words: {w}.",
        "Your reply must not contain the words {w}.",
    ], w=_quoted(words))


@constraint("keywords:letter_frequency")
def _letter_frequency(rng, task):
    letter = rng.choice(LETTERS)
    relation, n = rng.choice([("at least", 5), ("at least", 10), ("at least", 15), ("less than", 3),
                              ("less than", 6)])
    text = _pick(rng, [
        'The letter "{l}" has to appear at least {n} times in your reply.',
        'Write so that the letter "{l}" occurs {n} or more times.',
    ] if relation == "at least" else [
        'Use the letter "{l}" fewer than {n} times in total.',
        'The letter "{l}" may appear at most {m} times.',
    ], l=letter, n=n, m=n - 1)
    return {"letter": letter, "let_frequency": n, "let_relation": relation}, text


# ---- language and case -------------------------------------------------------------------------------------------

@constraint("language:response_language", groups=("case",))
def _language(rng, task):
    code = rng.choice(sorted(LANGUAGES))
    return {"language": code}, _pick(rng, [
        "Reply only in {lang}; no other language is allowed.",
        "Write the whole answer in {lang}.",
        "Use {lang} for your entire reply.",
    ], lang=LANGUAGES[code])


@constraint("change_case:english_lowercase", groups=("case",))
def _lowercase(rng, task):
    return {}, _pick(rng, [
        "Write in English using only lowercase letters, with no capitals anywhere.",
        "Do not use a single capital letter: everything must be lowercase English.",
        "Keep every letter of your English reply in lower case.",
    ])


@constraint("change_case:english_capital", groups=("case",))
def _capital(rng, task):
    return {}, _pick(rng, [
        "Write your reply in English using only capital letters.",
        "Every letter of your English answer must be uppercase.",
        "Answer in English, all in CAPITAL LETTERS.",
    ])


@constraint("change_case:capital_word_frequency", groups=("case",))
def _capital_words(rng, task):
    relation, n = rng.choice([("at least", 2), ("at least", 3), ("at least", 5), ("less than", 2),
                              ("less than", 4)])
    text = _pick(rng, [
        "Write at least {n} words fully in capital letters, like THIS.",
        "Include {n} or more words spelled entirely in uppercase.",
    ] if relation == "at least" else [
        "Use fewer than {n} words written entirely in capital letters.",
        "At most {m} word{s} may be written fully in uppercase.",
    ], n=n, m=n - 1, s="" if n == 2 else "s")
    return {"capital_frequency": n, "capital_relation": relation}, text


@constraint("punctuation:no_comma")
def _no_comma(rng, task):
    return {}, _pick(rng, [
        "Do not use any commas.",
        "Avoid commas completely; not a single one may appear.",
        "Write without using the comma character anywhere.",
    ])


# ---- length and layout -------------------------------------------------------------------------------------------

@constraint("length_constraints:number_words", groups=("length",))
def _number_words(rng, task):
    relation, n = rng.choice([("less than", 20), ("less than", 30), ("less than", 40), ("less than", 50),
                              ("less than", 80), ("less than", 120), ("at least", 20), ("at least", 40),
                              ("at least", 60), ("at least", 100)])
    return {"relation": relation, "num_words": n}, _pick(rng, [
        "Keep your reply under {n} words.",
        "Use fewer than {n} words in total.",
        "Your answer must be shorter than {n} words.",
    ] if relation == "less than" else [
        "Write {n} words or more.",
        "Your reply should be no shorter than {n} words.",
        "Use at least {n} words.",
    ], n=n)


@constraint("length_constraints:number_sentences", groups=("length",))
def _sentences(rng, task):
    relation, n = rng.choice([("less than", 2), ("less than", 3), ("less than", 4), ("less than", 6),
                              ("at least", 2), ("at least", 3), ("at least", 5)])
    return {"relation": relation, "num_sentences": n}, _pick(rng, [
        "Write fewer than {n} sentences.",
        "Your reply must have less than {n} sentences.",
        "Keep it to at most {m} sentence{s}.",
    ] if relation == "less than" else [
        "Write {n} sentences or more.",
        "Your reply needs at least {n} sentences.",
    ], n=n, m=n - 1, s="" if n == 2 else "s")


@constraint("length_constraints:number_paragraphs", groups=("length", "layout"))
def _paragraphs(rng, task):
    n = rng.randint(2, 4)
    return {"num_paragraphs": n}, _pick(rng, [
        "Write exactly {n} paragraphs, with a line holding only *** between one paragraph and the next.",
        "Split your answer into {n} paragraphs and separate them with the divider ***.",
    ], n=n)


@constraint("length_constraints:nth_paragraph_first_word", groups=("length", "layout"))
def _nth_paragraph(rng, task):
    n = rng.randint(2, 4)
    k = rng.randint(1, n)
    word = rng.choice(FIRST_WORDS)
    return {"num_paragraphs": n, "nth_paragraph": k, "first_word": word}, _pick(rng, [
        "Write {n} paragraphs separated by one blank line each; paragraph number {k} must begin with the word "
        '"{w}".',
        'Give {n} paragraphs (a blank line between them), and start paragraph {k} with "{w}".',
    ], n=n, k=k, w=word)


@constraint("detectable_format:number_bullet_lists", groups=("length", "layout"))
def _bullets(rng, task):
    n = rng.randint(2, 5)
    return {"num_bullets": n}, _pick(rng, [
        "Give exactly {n} markdown bullet points, each on its own line starting with *.",
        "Format the answer as a list of {n} bullets (lines that begin with * ), no more and no fewer.",
        "Use precisely {n} bullet points like:\n* first point\n* second point",
    ], n=n)


@constraint("detectable_format:multiple_sections", groups=("length", "layout"))
def _sections(rng, task):
    n, word = rng.randint(2, 4), rng.choice(SPLITTERS)
    return {"section_spliter": word, "num_sections": n}, _pick(rng, [
        "Organize the reply into {n} sections, each headed {w} followed by its number ({w} 1, {w} 2, ...).",
        "Break your answer into {n} parts and label each one {w} X, where X is the part's number.",
    ], n=n, w=word)


@constraint("detectable_format:number_highlighted_sections")
def _highlights(rng, task):
    n = rng.randint(1, 4)
    return {"num_highlights": n}, _pick(rng, [
        "Highlight at least {n} part{s} of the answer with markdown, like *an important part*.",
        "Mark {n} or more phrases in italics by putting single asterisks around them, for example *this*.",
    ], n=n, s="s" if n > 1 else "")


# ---- content -----------------------------------------------------------------------------------------------------

@constraint("detectable_content:number_placeholders")
def _placeholders(rng, task):
    n = rng.randint(1, 4)
    return {"num_placeholders": n}, _pick(rng, [
        "Include at least {n} placeholder{s} in square brackets, such as {ex}.",
        "Leave {n} or more blanks for the reader to fill in, written in square brackets like {ex}.",
    ], n=n, s="s" if n > 1 else "", ex=rng.choice(PLACEHOLDER_EXAMPLES))


@constraint("detectable_content:postscript", groups=("end",))
def _postscript(rng, task):
    marker = rng.choice(["P.S.", "P.P.S"])
    return {"postscript_marker": marker}, _pick(rng, [
        "End with a postscript that begins with {m}",
        "After the main text, add a short note starting with {m}",
        "Close the reply with a line that starts with {m}",
    ], m=marker)


# ---- format ------------------------------------------------------------------------------------------------------

@constraint("detectable_format:title")
def _title(rng, task):
    return {}, _pick(rng, [
        "Give the answer a title inside double angle brackets, like <<a good title>>.",
        "Start with a title written between << and >>.",
        "Put a title in your reply, wrapped as <<Title Here>>.",
    ])


@constraint("detectable_format:json_format", alone=True)
def _json(rng, task):
    return {}, _pick(rng, [
        "Give the whole reply as valid JSON.",
        "Format your entire answer as a JSON object; you may wrap it in a ```json code block.",
        "Your output must be parseable JSON and nothing else.",
    ])


@constraint("detectable_format:constrained_response", alone=True, fits=lambda task: task.endswith("?"))
def _constrained(rng, task):
    return {}, _pick(rng, [
        'Reply with exactly one of these sentences: "My answer is yes.", "My answer is no.", or '
        '"My answer is maybe."',
        'Choose your reply from "My answer is yes.", "My answer is no." and "My answer is maybe." and write only '
        "that sentence.",
    ])


@constraint("combination:two_responses", groups=("layout", "start", "end"))
def _two(rng, task):
    return {}, _pick(rng, [
        "Write two different answers, separated by a line of six asterisks: ******",
        "Give two alternative replies and put ****** (six asterisks) between them.",
    ])


@constraint("combination:repeat_prompt", groups=("start",))
def _repeat(rng, task):
    return {"prompt_to_repeat": task}, _pick(rng, [
        "Start by copying the request above word for word (only its first sentence), then answer it.",
        "Begin your reply with the exact text of the first sentence of this request, unchanged, and then respond.",
    ])


@constraint("startend:end_checker", groups=("end",))
def _end_phrase(rng, task):
    phrase = rng.choice(END_PHRASES)
    return {"end_phrase": phrase}, _pick(rng, [
        'The very last words of your reply must be "{p}" with nothing after them.',
        "Finish with the exact sentence {p} and write nothing after it.",
        'Close your answer with "{p}" as its final words.',
    ], p=phrase)


@constraint("startend:quotation", groups=("start", "end"))
def _quotation(rng, task):
    return {}, _pick(rng, [
        "Put the whole reply inside double quotation marks.",
        'Begin and end your answer with a double quote character (").',
        "Enclose everything you write in one pair of double quotes.",
    ])


def compatible(chosen: list[str], candidate: str) -> bool:
    """Whether ``candidate`` can join the constraints already ``chosen`` for one prompt."""
    c = CONSTRAINTS[candidate]
    if c.alone or candidate in chosen:
        return False
    return all(not CONSTRAINTS[i].alone and not (c.groups & CONSTRAINTS[i].groups) for i in chosen)
