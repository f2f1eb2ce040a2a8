"""The quality rules against hand-computed values (Gopher's repetition definitions as datatrove computes them,
C4's line and document rules, FineWeb's document rules), and on real pages: the Python documentation's HTML
through the default extractor."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmforge.config.data import C4_TERMINAL_PUNCTUATION, DataConfig, LineFilters, SourceSpec, WebFilters
from llmforge.data.filters import clean_lines, duplicate_ngram_chars, duplicates, top_ngram_chars, web_quality
from llmforge.data.pipeline import document_pieces
from llmforge.data.sources.base import Document
from llmforge.data.sources.web import html_to_text
from tests.real_inputs import python_doc_pages

REPO = Path(__file__).resolve().parents[2]

OFF = WebFilters(**{k: None for k in WebFilters.__dataclass_fields__})


def only(**rules) -> WebFilters:
    return WebFilters(**{**{k: None for k in WebFilters.__dataclass_fields__}, **rules})


def test_duplicate_elements_count_from_the_second_occurrence():
    assert duplicates(["a", "bb", "a", "a", "bb", "c"]) == (3, 4)  # a, a, bb repeat: 1 + 1 + 2 characters
    assert duplicates(["x", "y"]) == (0, 0)


def test_duplicate_ngram_chars_by_hand():
    words = ["one", "two", "three", "four", "five", "one", "two", "three", "four", "five", "six"]
    # the second "one two three four five" repeats the first: 3+3+5+4+4 = 19 characters (words without spaces);
    # the first occurrence is not a duplicate (the old rule counted it too: 38)
    assert duplicate_ngram_chars(words, 5) == 19
    assert duplicate_ngram_chars(words, 6) == 0  # no 6-gram repeats
    # overlapping repeats are counted once: "a"*7 holds the 5-gram (a a a a a) at 0, then again at 1 -> +5, jump to 6
    assert duplicate_ngram_chars(["a"] * 7, 5) == 5
    text = " ".join(words)
    assert len(text) == 51
    assert web_quality(text, only(max_duplicate_ngram_chars={5: 0.38})) is None  # 19 / 51 = 0.3725
    assert web_quality(text, only(max_duplicate_ngram_chars={5: 0.37})) == "duplicate_5gram_chars"


def test_top_ngram_chars_by_hand():
    words = ["a", "b", "a", "b", "a", "b", "c"]
    assert top_ngram_chars(words, 2) == 9  # "a b" (3 characters with its space) occurs 3 times
    assert top_ngram_chars(words, 3) == 10  # "a b a" and "b a b" twice each: the first seen wins, 5 x 2
    assert top_ngram_chars(["a"], 2) == 0
    text = " ".join(words)  # 13 characters
    assert web_quality(text, only(max_top_ngram_chars={2: 0.70})) is None  # 9 / 13 = 0.69
    assert web_quality(text, only(max_top_ngram_chars={2: 0.69})) == "top_2gram_chars"


def test_duplicate_lines_and_paragraphs_by_hand():
    text = "alpha line\nbeta line\nalpha line\n\nalpha line\ngamma"
    # lines (blank ones dropped): alpha, beta, alpha, alpha, gamma -> 2 of 5 repeat, 20 of 49 characters
    assert len(text) == 49
    assert web_quality(text, only(max_duplicate_lines=0.4)) is None
    assert web_quality(text, only(max_duplicate_lines=0.39)) == "duplicate_lines"
    assert web_quality(text, only(max_duplicate_line_chars=0.41)) is None  # 20 / 49 = 0.408
    assert web_quality(text, only(max_duplicate_line_chars=0.40)) == "duplicate_line_chars"
    para = "first para\n\nsecond\n\nfirst para"  # 1 of 3 paragraphs repeats: 10 of 30 characters
    assert web_quality(para, only(max_duplicate_paragraphs=0.34)) is None
    assert web_quality(para, only(max_duplicate_paragraphs=0.33)) == "duplicate_paragraphs"
    assert web_quality(para, only(max_duplicate_paragraph_chars=0.33)) == "duplicate_paragraph_chars"
    assert web_quality(para, only(max_duplicate_paragraph_chars=0.34)) is None


def test_stop_words():
    assert web_quality("cats and dogs", only(min_stop_words=2)) == "few_stop_words"
    assert web_quality("The cat and the dog.", only(min_stop_words=2)) is None


C4 = LineFilters(terminal_punctuation=C4_TERMINAL_PUNCTUATION)  # C4's line rules as published (plus ":")
LINES = [
    ("The council met on Tuesday to debate the budget.", None),
    ("Share article", "no_terminal_punctuation"),
    ("Advertisement", "no_terminal_punctuation"),
    ("Download PDF Print Share Feedback", "no_terminal_punctuation"),
    ("Read more...", "no_terminal_punctuation"),
    ("Yes.", "few_words"),
    ("Please enable JavaScript to view the comments.", "javascript"),
    ("This site uses cookies to improve your experience.", "policy"),
    ("By using it you agree to our Terms of Use.", "policy"),
    ("A line with a " + "x" * 1001 + " word.", "long_word"),
    ('He said it was "the end of an era."', None),
    ("The river floods every spring.[1][citation needed]", None),
    ("The budget has three parts:", None),  # introduces a list: kept (':' is added to C4's set)
]


def test_c4_line_rules_remove_and_count_each_line():
    stats: dict = {}
    text = "\n".join(line for line, _ in LINES)
    out = clean_lines(text, C4, stats)
    assert out.split("\n") == [LINES[0][0], LINES[10][0], "The river floods every spring.", LINES[12][0]]
    c4_exact = clean_lines(text, LineFilters(terminal_punctuation=".!?\"'"), {})
    assert LINES[12][0] not in c4_exact and LINES[0][0] in c4_exact
    expected: dict = {}
    for line, reason in LINES:
        if reason:
            expected[f"lines_removed:{reason}"] = expected.get(f"lines_removed:{reason}", 0) + 1
            nbytes = len(line.encode()) + 1
            expected[f"lines_removed_bytes:{reason}"] = expected.get(f"lines_removed_bytes:{reason}", 0) + nbytes
    assert stats == expected
    # FineWeb keeps lines without terminal punctuation; every rule can be turned off
    kept = clean_lines(text, LineFilters(), {})  # the default
    assert "Download PDF Print Share Feedback" in kept and "Share article" not in kept  # 2 words < 3
    none = LineFilters(
        min_words=None, terminal_punctuation="", max_word_length=None, javascript=False, policy=False, citations=False
    )
    assert clean_lines(text, none) == text


def test_c4_and_fineweb_document_rules():
    good = "The water budget grew again this year. " * 6
    assert web_quality(good, only(lorem_ipsum=True, curly_bracket=True, min_sentences=5)) is None
    assert web_quality(good + "Lorem ipsum dolor sit amet.", only(lorem_ipsum=True)) == "lorem_ipsum"
    assert web_quality(good + "Use {name} here.", only(curly_bracket=True)) == "curly_bracket"
    assert web_quality("One sentence. Two sentences! Three?", only(min_sentences=4)) == "too_few_sentences"
    assert web_quality("One sentence. Two sentences! Three?\nFour", only(min_sentences=4)) is None
    # FineWeb: 1 of 10 lines ends in punctuation (< 0.12); 8 of 10 lines are 30 characters or fewer (> 0.67)
    lines = ["A complete sentence that is long enough to count."] + ["menu item"] * 7 + ["x" * 40] * 2
    text = "\n".join(lines)
    assert web_quality(text, only(min_punct_line_fraction=0.12)) == "few_punctuated_lines"
    assert web_quality(text, only(min_punct_line_fraction=0.10)) is None
    assert web_quality(text, only(max_short_line_fraction=0.67)) == "short_lines"
    assert web_quality(text, only(max_short_line_fraction=0.8)) is None
    # 9 line breaks over 9 + 14 + 2 = 25 words = 0.36
    assert web_quality(text, only(max_newline_word_ratio=0.35)) == "newline_word_ratio"
    assert web_quality(text, only(max_newline_word_ratio=0.37)) is None
    # 6 repeated "menu item" lines (54 characters) and 1 repeated x-line (40), line breaks not counted
    chars = len(text) - text.count("\n")
    assert chars == 49 + 7 * 9 + 2 * 40
    ratio = (6 * 9 + 40) / chars  # 94 / 192 = 0.490
    assert web_quality(text, only(max_repeated_line_chars=0.48)) == "repeated_line_chars"
    assert web_quality(text, only(max_repeated_line_chars=0.49)) is None and 0.48 < ratio < 0.49


def test_n_gram_tables_are_validated():
    from llmforge.config.recipe_base import ConfigError

    with pytest.raises(ConfigError, match="max_top_ngram_chars.2: must be a fraction"):
        WebFilters(max_top_ngram_chars={2: 1.5})
    with pytest.raises(ConfigError, match="keys are n-gram sizes"):
        WebFilters(max_duplicate_ngram_chars={"five": 0.1})


def _reference_duplicate_fraction(text: str, n: int) -> float:
    """Gopher's duplicate n-gram fraction written the way datatrove writes it (strings, not tuples)."""
    words = text.split()
    unique, repeated, i = set(), 0, 0
    while i < len(words) - n + 1:
        gram = "".join(words[i : i + n])
        if gram in unique:
            repeated += len(gram)
            i += n
        else:
            unique.add(gram)
            i += 1
    return repeated / len(text)


def _first_occurrences_counted(text: str, n: int) -> float:
    """The rule this replaces: every word inside any n-gram that occurs more than once, first occurrence included."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    seen: dict = {}
    for g in grams:
        seen[g] = seen.get(g, 0) + 1
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if seen[g] > 1:
            covered[i : i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / max(1, sum(len(w) for w in words))


def test_real_pages_repetition_matches_the_reference_and_no_longer_counts_first_occurrences():
    texts = [html_to_text(p.read_bytes()) for p in python_doc_pages(40)]
    texts = [t for t in texts if len(t.split()) > 200]
    assert len(texts) >= 30
    rescued = 0
    for text in texts:
        words = text.split()
        for n in range(5, 11):
            assert duplicate_ngram_chars(words, n) / len(text) == pytest.approx(_reference_duplicate_fraction(text, n))
        now = duplicate_ngram_chars(words, 5) / len(text)
        before = _first_occurrences_counted(text, 5)
        assert now <= before
        rescued += before > 0.15 >= now
    assert rescued >= 3  # real documentation pages the old rule dropped and Gopher's definition keeps


def test_line_rules_on_real_pages_remove_leaked_navigation_and_keep_the_sentences():
    """Node.js API pages through trafilatura leak navigation links ('View on single page', module names); the
    line rules remove them, and on resiliparse's text they keep >= 90% of the main-text sentences."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from real_pages import FAMILIES, pages, score

    from llmforge.data.clean import clean_text

    if not (Path(FAMILIES["nodejs-docs"][0])).is_dir():
        pytest.skip("the Node.js documentation is not installed (/usr/share/doc/nodejs/api)")
    node = pages(12, families=("nodejs-docs",))
    leaked_before = leaked_after = 0.0
    for page in node:
        text = clean_text(html_to_text(page.html, "trafilatura"), "web")
        leaked_before += score(text, page)[1]
        leaked_after += score(clean_lines(text, C4), page)[1]
    assert leaked_before / len(node) > 0.03 and leaked_after == 0.0
    docs = pages(20, families=("python-docs",)) + node
    recall = [score(clean_lines(clean_text(html_to_text(p.html, "resiliparse"), "web"), C4), p)[0] for p in docs]
    assert sum(recall) / len(recall) >= 0.9


def test_a_source_can_have_its_own_line_rules():
    """A documentation site read with resiliparse keeps C4's terminal-punctuation rule while the crawl beside it uses
    data.line_filters (the rule off by default)."""
    page = python_doc_pages(1)[0].read_bytes()
    counts = []
    for spec in (
        SourceSpec(type="html", paths=["x"], extractor="resiliparse"),
        SourceSpec(type="html", paths=["x"], extractor="resiliparse", line_filters=C4),
    ):
        stats: dict = {}
        document_pieces(Document(html_to_text(page, spec.extractor), "p", {}), spec, DataConfig(), set(), stats)
        counts.append(stats.get("lines_removed:no_terminal_punctuation", 0))
    assert counts[0] == 0 and counts[1] > 10
