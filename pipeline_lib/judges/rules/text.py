"""Text measurements the IFEval checkers need.

The reference (google-research ``instruction_following_eval``) counts words with nltk's ``RegexpTokenizer(r"\\w+")``
(reproduced exactly here), sentences with nltk's pretrained Punkt model, capital words with ``nltk.word_tokenize``
and languages with ``langdetect``. Languages use langdetect itself (1.0.9: its profiles ship inside the package, so
it works offline), seeded. nltk's data cannot be downloaded at run time, so:

- :func:`count_sentences` splits at ``. ! ?`` followed by whitespace or the end, except after a known abbreviation,
  a single-letter initial, a dotted abbreviation (``e.g.``, ``U.S.``, ``Ph.D.``) or a list number at the start of a
  line. It agrees with Punkt on ordinary prose (and on the sentence-count cases of IFEval's own tests); Punkt may
  differ on unusual abbreviations it learned from its corpus.
- :func:`capital_words` takes ``\\w+`` runs joined by hyphens as words (nltk also keeps hyphenated words whole but
  splits ``DON'T`` into ``DO`` + ``N'T`` and keeps ``U.S.`` whole; we give ``DON``, ``T`` and ``U``, ``S``).
"""

from __future__ import annotations

import re

WORD_RE = re.compile(r"\w+")


def count_words(text: str) -> int:
    return len(WORD_RE.findall(text))


# Words whose trailing period does not end a sentence (lower case, without the period).
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "inc", "ltd", "co", "fig", "approx",
                  "no", "vol", "capt", "lt", "gen", "col", "mt", "ave", "dept", "est", "al"}
_TERMINATOR_RE = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


def split_sentences(text: str) -> list[str]:
    sentences, start = [], 0
    for m in _TERMINATOR_RE.finditer(text):
        if m.group().startswith(".") and not _ends_sentence(text, m.start()):
            continue
        sentences.append(text[start:m.end()])
        start = m.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if re.search(r"\w", s)]


def _ends_sentence(text: str, dot: int) -> bool:
    """Whether the period at ``dot`` ends a sentence, judged by the word just before it."""
    line_start = text.rfind("\n", 0, dot) + 1
    word_start = max(text.rfind(" ", 0, dot), text.rfind("\t", 0, dot), line_start - 1) + 1
    word = text[word_start:dot].lower().lstrip("([\"'")
    if word in _ABBREVIATIONS or re.fullmatch(r"[^\W\d_]", word):  # "Dr. Smith", "J. Doe"
        return False
    if re.fullmatch(r"[a-z]{1,2}(\.[a-z]{1,2})+", word):  # "e.g.", "U.S.", "Ph.D."
        return False
    if word.isdigit() and not text[line_start:word_start].strip():  # "1. First item" (a numbered list)
        return False
    return True


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def capital_words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+(?:-\w+)*", text) if w.isupper()]


# ---- language -------------------------------------------------------------------------------------------------

def detect_language(text: str) -> str | None:
    """The language code langdetect gives the text (``en``, ``fr``, ``zh-cn``, ...), as the reference does, or None
    when langdetect finds no features (text without letters; the reference then counts the instruction as
    followed). langdetect samples n-grams at random: ``DetectorFactory.seed = 0`` makes every call reproducible."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None
