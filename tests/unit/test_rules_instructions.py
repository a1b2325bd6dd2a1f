"""Every IFEval instruction type on hand-written responses: one that passes, one that fails, and where loose mode
can matter, one that only loose mode accepts (a preamble line, a trailing line, or markdown ``*``).

Each case is (instruction id, kwargs, response, strict verdict, loose verdict); the comment says why.
"""

from __future__ import annotations

import pytest

from pipeline_lib.judges.rules import INSTRUCTIONS, follow_list

KW = {"keywords": ["river", "Boat"]}
FREQ3 = {"keyword": "tea", "frequency": 3, "relation": "at least"}
FREQ_LT2 = {"keyword": "tea", "frequency": 2, "relation": "less than"}
FORBID = {"forbidden_words": ["very", "good"]}
LETTER = {"letter": "z", "let_frequency": 2, "let_relation": "at least"}
LETTER_LT = {"letter": "a", "let_frequency": 3, "let_relation": "less than"}
CAPS2 = {"capital_frequency": 2, "capital_relation": "at least"}
CAPS_LT2 = {"capital_frequency": 2, "capital_relation": "less than"}
WORDS_LT5 = {"num_words": 5, "relation": "less than"}
SENT_LT2 = {"num_sentences": 2, "relation": "less than"}
SENT_GE3 = {"num_sentences": 3, "relation": "at least"}
NTH = {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}
SECTIONS = {"section_spliter": "Section", "num_sections": 2}
SPANISH = "El perro come en la casa y los niños juegan con la pelota."
ENGLISH_PREAMBLE = "Sure, here is the answer that you asked for and it is in the language of the request:"

CASES = [
    # keywords:existence: every keyword, case-insensitive substring
    ("keywords:existence", KW, "The river carried a boat.", True, True),
    ("keywords:existence", KW, "The river was calm.", False, False),  # no "boat"
    ("keywords:existence", KW, "The ri*ver carried a boat.", False, True),  # loose removes the "*"
    # keywords:frequency: case-insensitive substring count
    ("keywords:frequency", FREQ3, "Tea, tea and more TEA.", True, True),  # 3 >= 3
    ("keywords:frequency", FREQ3, "tea and tea", False, False),  # 2 < 3
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"}, "category cat", True, True),
    ("keywords:frequency", FREQ_LT2, "I like tea.\nTea is great.", False, True),  # 2 not < 2; last line alone: 1
    # keywords:forbidden_words: whole words, case-insensitive
    ("keywords:forbidden_words", FORBID, "This is fine.", True, True),
    ("keywords:forbidden_words", FORBID, "This is VERY nice.", False, False),
    ("keywords:forbidden_words", FORBID, "Goodness me.", True, True),  # "good" only inside a longer word
    ("keywords:forbidden_words", FORBID, "Very well, here it is:\nA calm answer.", False, True),
    # keywords:letter_frequency: count of the letter, case-insensitive
    ("keywords:letter_frequency", LETTER, "Zebras zoom.", True, True),  # z, z: 2 >= 2
    ("keywords:letter_frequency", LETTER, "A zebra.", False, False),  # 1
    ("keywords:letter_frequency", LETTER_LT, "Banana.\nOk", False, True),  # 3 a's; "Ok" alone has 0
    # language:response_language (heuristic detector)
    ("language:response_language", {"language": "es"}, SPANISH, True, True),
    ("language:response_language", {"language": "es"}, "The dog eats in the house and the kids play.", False, False),
    ("language:response_language", {"language": "es"}, f"{ENGLISH_PREAMBLE}\n{SPANISH}", False, True),
    ("language:response_language", {"language": "ru"}, "Привет, как дела? Это очень хорошо.", True, True),
    ("language:response_language", {"language": "uk"}, "Привет, как дела? Это очень хорошо.", False, False),
    ("language:response_language", {"language": "uk"}, "Привіт, як справи? Це добре і гарно.", True, True),
    ("language:response_language", {"language": "ja"}, "こんにちは、元気ですか。", True, True),
    ("language:response_language", {"language": "hi"}, "यह एक अच्छा दिन है और मैं खुश हूँ।", True, True),
    ("language:response_language", {"language": "fr"}, "123 456", True, True),  # no letters: undetectable
    # change_case:english_capital / english_lowercase: case and English
    ("change_case:english_capital", {}, "HELLO WORLD. THIS IS FINE.", True, True),
    ("change_case:english_capital", {}, "Hello world.", False, False),
    ("change_case:english_capital", {}, "Sure:\nTHIS IS THE ANSWER.", False, True),  # only the preamble is cased
    # upper-case Spanish passes, as in the reference: langdetect skips n-grams inside all-capital words (its
    # NGram.capitalword), so what is left reads as English
    ("change_case:english_capital", {}, SPANISH.upper(), True, True),
    ("change_case:english_lowercase", {}, "hello world, this is fine.", True, True),
    ("change_case:english_lowercase", {}, "Hello world.", False, False),
    ("change_case:english_lowercase", {}, "Here you go:\nthis is the answer.", False, True),
    ("change_case:english_lowercase", {}, SPANISH.lower(), False, False),
    # change_case:capital_word_frequency: words all in capitals (hyphenated words are one word)
    ("change_case:capital_word_frequency", CAPS2, "This is VERY IMPORTANT.", True, True),  # 2
    ("change_case:capital_word_frequency", CAPS2, "This is VERY nice.", False, False),  # 1
    ("change_case:capital_word_frequency", CAPS_LT2, "a WELL-KNOWN fact", True, True),  # 1 word, not WELL + KNOWN
    ("change_case:capital_word_frequency", CAPS_LT2, "NOTE: IT WORKS.\nit works", False, True),  # 3, then 0
    # punctuation:no_comma
    ("punctuation:no_comma", {}, "No commas here.", True, True),
    ("punctuation:no_comma", {}, "Yes, commas.", False, False),
    ("punctuation:no_comma", {}, "Sure, here it is:\nNo commas here.", False, True),
    # length_constraints:number_words: \w+ tokens
    ("length_constraints:number_words", WORDS_LT5, "One two three four.", True, True),  # 4 < 5
    ("length_constraints:number_words", WORDS_LT5, "One two three four five.", False, False),  # 5
    ("length_constraints:number_words", WORDS_LT5, "Sure here is my short answer:\nOne two three.", False, True),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "don't stop", True, True),  # don,t,stop
    # length_constraints:number_sentences
    ("length_constraints:number_sentences", SENT_LT2, "Dr. Smith waited 3.5 hours.", True, True),  # 1 sentence
    ("length_constraints:number_sentences", SENT_LT2, "It rains. It pours!", False, False),  # 2
    ("length_constraints:number_sentences", SENT_LT2, "Here is my answer.\nIt rains.", False, True),
    ("length_constraints:number_sentences", SENT_GE3, "One. Two? Three!", True, True),
    # NLTK's Punkt makes each list number a sentence: 4 here, as the reference counts
    ("length_constraints:number_sentences", SENT_GE3, "1. Eat well.\n2. Sleep well.", True, True),
    ("length_constraints:number_sentences", SENT_GE3, "Eat well. Sleep well.", False, False),  # 2
    # length_constraints:number_paragraphs: *** dividers, empty paragraphs only at the ends
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nA\n***\nB\n***", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\n\n***\nB", False, False),  # empty middle
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A *** B *** C", False, False),  # 3 (one line)
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\nB\n***\nAnything else?", False, True),
    # length_constraints:nth_paragraph_first_word: paragraphs split by blank lines
    ("length_constraints:nth_paragraph_first_word", NTH, "First we wait.\n\nThen, we go.", True, True),
    ("length_constraints:nth_paragraph_first_word", NTH, 'First.\n\n"Then" we go.', True, True),  # quotes dropped
    ("length_constraints:nth_paragraph_first_word", NTH, "First.\n\nAfter that we go.", False, False),
    ("length_constraints:nth_paragraph_first_word", NTH, "A.\n\nThen go.\n\nB.\n\nC.", False, False),  # 4
    ("length_constraints:nth_paragraph_first_word", NTH, "Sure!\n\nFirst.\n\nThen go.", False, True),
    # detectable_content:number_placeholders: [...] spans
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False, False),
    # detectable_content:postscript
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. see you", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\np. s. see you", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi. PS see you", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n**P**.S. see you", False, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S thanks", True, True),
    ("detectable_content:postscript", {"postscript_marker": "Note:"}, "Hi.\nnote: thanks", True, True),
    # detectable_format:number_bullet_lists: lines starting with "* " or "-"; exact count
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "- a\n- b", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b\n* c\n* d\n* e", False, False),  # 5
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Two points:\n* a\n* b\n* Anything else?", False, True),
    # detectable_format:constrained_response
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, True),
    ("detectable_format:constrained_response", {}, "Hmm. My answer is maybe. Hard to say", True, True),
    ("detectable_format:constrained_response", {}, "Yes.", False, False),
    # detectable_format:number_highlighted_sections: *x* and **x** with non-blank content
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** and *it*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and * *", False, False),
    # detectable_format:multiple_sections: "<splitter> <n>", case-sensitive
    ("detectable_format:multiple_sections", SECTIONS, "Section 1\nIntro\nSection 2\nBody", True, True),
    ("detectable_format:multiple_sections", SECTIONS, "Section 1\nIntro only", False, False),
    ("detectable_format:multiple_sections", SECTIONS, "SECTION 1\nIntro\nSECTION 2\nBody", False, False),
    # detectable_format:json_format: the whole response (markdown fences allowed)
    ("detectable_format:json_format", {}, '{"a": 1}', True, True),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True, True),
    ("detectable_format:json_format", {}, "a: 1", False, False),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}', False, True),
    # detectable_format:title: <<non-blank>>
    ("detectable_format:title", {}, "<<My Poem>>\nRoses are red.", True, True),
    ("detectable_format:title", {}, "<<  >>\nRoses are red.", False, False),
    ("detectable_format:title", {}, "My Poem\nRoses are red.", False, False),
    # combination:two_responses: exactly two different non-empty parts around ******
    ("combination:two_responses", {}, "Answer A.\n******\nAnswer B.", True, True),
    ("combination:two_responses", {}, "******\nAnswer A.\n******\nAnswer B.", True, True),  # empty first part ok
    ("combination:two_responses", {}, "Same.\n******\nSame.", False, False),
    ("combination:two_responses", {}, "A\n******\n\n******\nB", False, False),  # empty middle part
    # combination:repeat_prompt: starts with the request, case-insensitive
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku."}, "write a haiku. Leaves fall.", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku."}, "A haiku: Leaves fall.", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku."}, "Sure!\nWrite a haiku. Leaves.", False, True),
    # startend:end_checker: ends with the phrase (case-insensitive, outer quotes ignored)
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, '"Done. any other questions?"', True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Bye.", False, False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?\n(end)", False, True),
    # startend:quotation
    ("startend:quotation", {}, '"Hello there."', True, True),
    ("startend:quotation", {}, 'Hello "there"', False, False),
    ("startend:quotation", {}, '"', False, False),
    ("startend:quotation", {}, 'Sure:\n"Hello."', False, True),
]


@pytest.mark.parametrize("iid,kwargs,response,strict,loose", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_instruction_verdicts(iid, kwargs, response, strict, loose):
    assert follow_list("prompt", response, [iid], [kwargs], loose=False) == [strict]
    assert follow_list("prompt", response, [iid], [kwargs], loose=True) == [loose]


def test_every_ifeval_instruction_has_a_passing_and_a_failing_case():
    """All 25 ids of IFEval's registry are implemented, and each has at least one case of each verdict."""
    assert len(INSTRUCTIONS) == 25
    for iid in INSTRUCTIONS:
        verdicts = {c[3] for c in CASES if c[0] == iid}
        assert verdicts == {True, False}, iid


def test_loose_only_cases_cover_the_three_forgiven_forms():
    """Loose accepts what strict rejects for a preamble line, a trailing line and markdown stars."""
    loose_only = [c for c in CASES if c[4] and not c[3]]
    assert any("*" in c[2] and "\n" not in c[2] for c in loose_only)  # stars only
    assert any(c[2].startswith(("Sure", "Here", "Very")) for c in loose_only)  # preamble
    assert any(c[2].endswith(("(end)", "Anything else?")) for c in loose_only)  # trailing line
