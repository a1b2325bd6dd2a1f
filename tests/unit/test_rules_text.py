"""Text measurements of the rules judge. Every expected sentence count is NLTK's (nltk 3.10.4's Punkt with NLTK's
English parameters, computed once; the first four are also what IFEval's own ``instructions_util_test.py`` asserts).
Expected languages are langdetect's, as the reference uses it."""

from __future__ import annotations

import pytest

from pipeline_lib.judges.rules.text import capital_words, count_sentences, count_words, detect_language, split_sentences


@pytest.mark.parametrize("text,n", [
    ("word1, word2, word3, word4.", 4),
    ("Hyphenated-word has two word counts.", 6),  # \w+ splits at the hyphen, as nltk's RegexpTokenizer(r"\w+")
    ("don't stop", 3),
    ("", 0),
])
def test_count_words_matches_ifevals_regexp_tokenizer(text, n):
    assert count_words(text) == n


@pytest.mark.parametrize("text,n", [
    # IFEval's Punkt cases
    ("xx,x. xx,x! xx/x. x{x}x? x.", 5),
    ("xx,x! xxxx. x(x)x?", 3),
    ("xxxx. xx,x! xx|x. x&x x?", 4),
    ("xx-x]xx,x! x{x}xx,x.", 2),
    # known abbreviations, initials and decimals do not end sentences ...
    ("Dr. Smith met J. Doe at 3.5 miles out. They talked.", 2),
    ("The U.S. has many Ph.D. students. They study.", 2),
    # ... but Punkt's English model does not know "e.g.", and a list number is a sentence of its own
    ("Use tools, e.g. hammers. Done.", 3),
    ("1. Eat well.\n2. Sleep well.", 4),
    ("He was born in 1990. Then he grew up.", 2),
    ('She said "Stop!" Then she left.', 2),
    ("No terminal punctuation at all", 1),
    ("   ", 0),
])
def test_count_sentences(text, n):
    assert count_sentences(text) == n


def test_split_sentences_keeps_the_text():
    assert split_sentences("Google is a company. It was founded in 1998 by Larry Page\nand Sergey Brin.") == [
        "Google is a company.", "It was founded in 1998 by Larry Page\nand Sergey Brin."]


def test_capital_words():
    """"I" counts (nltk gives it too); a hyphenated capital word is one word; digits alone are not upper case."""
    assert capital_words("I saw a WELL-KNOWN NASA rocket in 2024, OK?") == ["I", "WELL-KNOWN", "NASA", "OK"]


@pytest.mark.parametrize("text,lang", [
    ("The response is English", "en"),
    ("Desayunamos en McDonald's hoy", "es"),  # IFEval's multi-language cases
    ("Today we visit the Louvre", "en"),
    ("O gato está em casa e não quer sair para o jardim.", "pt"),
    ("Le chat est dans la maison et il ne veut pas sortir.", "fr"),
    ("Die Katze ist im Haus und will nicht in den Garten.", "de"),
    ("Il gatto è in casa e non vuole uscire per il giardino.", "it"),
    ("Kot jest w domu i nie chce wyjść na dwór.", "pl"),
    ("Kissa on talossa ja se ei halua mennä ulos.", "fi"),
    ("Paka yuko nyumbani na hataki kwenda nje kwa sababu ya mvua.", "sw"),
    ("Con mèo đang ở trong nhà và không muốn ra ngoài.", "vi"),
    ("Кошка дома и не хочет выходить.", "ru"),
    ("Кішка вдома і не хоче виходити.", "uk"),
    ("Котката е вкъщи и не иска да излиза.", "bg"),
    ("القطة في المنزل ولا تريد الخروج.", "ar"),
    ("گربه در خانه است و نمی‌خواهد بیرون برود.", "fa"),
    ("بلی گھر میں ہے اور باہر نہیں جانا چاہتی۔", "ur"),
    ("बिल्ली घर में है और बाहर नहीं जाना चाहती।", "hi"),
    ("मांजर घरात आहे आणि तिला बाहेर जायचे नाही.", "mr"),
    ("बिरालो घरमा छ र बाहिर जान चाहँदैन।", "ne"),
    ("বিড়ালটি বাড়িতে আছে।", "bn"), ("ਬਿੱਲੀ ਘਰ ਵਿੱਚ ਹੈ।", "pa"), ("બિલાડી ઘરમાં છે.", "gu"),
    ("பூனை வீட்டில் உள்ளது.", "ta"), ("పిల్లి ఇంట్లో ఉంది.", "te"), ("ಬೆಕ್ಕು ಮನೆಯಲ್ಲಿದೆ.", "kn"),
    ("പൂച്ച വീട്ടിലുണ്ട്.", "ml"), ("แมวอยู่ในบ้าน", "th"), ("고양이는 집에 있습니다.", "ko"),
    ("猫は家にいます。", "ja"), ("猫在家里。", "zh-cn"), ("החתול בבית.", "he"),
    ("12345 !!! ...", None),
])
def test_detect_language(text, lang):
    assert detect_language(text) == lang
