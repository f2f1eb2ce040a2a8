"""Language identification and the language-dependent web rules on real translated pages: Debian's FAQ in German
and Simplified Chinese beside its English original (Debian's debian-faq, debian-faq-de, debian-faq-zh-cn)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmforge.config import load_recipe
from llmforge.config.data import C4_TERMINAL_PUNCTUATION, DataConfig, LineFilters, SourceSpec, WebFilters
from llmforge.config.loader import from_dict
from llmforge.config.recipe_base import ConfigError
from llmforge.data.clean import clean_text
from llmforge.data.filters import clean_lines, web_quality
from llmforge.data.language import GOPHER_STOP_WORDS, identify, stop_words
from llmforge.data.pipeline import document_pieces
from llmforge.data.prepare import prepare, train_tokenizer
from llmforge.data.sources.base import Document
from llmforge.data.sources.web import html_to_text
from tests.helpers import write_recipe
from tests.real_inputs import require, write_warc

FAQ = Path("/usr/share/doc/debian/FAQ")


def faq_page(lang: str, page: str = "nextrelease") -> Path:
    """The FAQ's chapter on the next release (a few paragraphs of ordinary prose) in `lang` (en: the original)."""
    if lang == "en":
        return require(FAQ / f"{page}.en.html", "debian-faq")
    return require(FAQ / lang / f"{page}.{lang}.html", f"debian-faq-{lang}")


def web_doc(path: Path, extractor: str = SourceSpec.extractor) -> Document:
    return Document(html_to_text(path.read_bytes(), extractor), str(path), {})


def verdict(path: Path, **spec) -> tuple[Document, str | None]:
    doc = web_doc(path)
    ((_, reason),) = document_pieces(doc, SourceSpec(type="html", paths=["x"], **spec), DataConfig(), set(), {})
    return doc, reason


def old_rules(path: Path) -> str | None:
    """The verdict before languages: the rules without a language (English stop words, every word rule) on the
    former defaults (resiliparse, C4's terminal-punctuation line rule)."""
    text = clean_text(web_doc(path, "resiliparse").text, "web")
    text = clean_lines(text, LineFilters(terminal_punctuation=C4_TERMINAL_PUNCTUATION))
    return web_quality(text, WebFilters())


def test_each_translation_is_identified_as_its_language():
    for lang, label in (("en", "en"), ("de", "de"), ("zh-cn", "zh")):
        for page in ("nextrelease", "faqinfo", "pkg-basics"):
            got, score = identify(clean_text(web_doc(faq_page(lang, page)).text, "web"))
            assert got == label and score > 0.9, (lang, page, got, score)
    assert identify("1234 5678 -- 42") == ("unknown", 0.0)


def test_a_german_page_is_kept_under_all_and_dropped_as_language_under_en():
    page = faq_page("de")
    assert old_rules(page) == "few_stop_words"  # English stop words judged a German page
    doc, reason = verdict(page)
    assert reason is None and doc.meta["language"] == "de" and doc.meta["language_score"] > 0.9
    assert verdict(page, languages=["en"])[1] == "language"
    assert verdict(page, languages=["en", "de"])[1] is None
    assert verdict(page, languages=["de"], min_language_score=0.9999)[1] == "language"
    assert verdict(faq_page("en"), languages=["en"])[1] is None


def test_an_english_page_short_on_stop_words_is_judged_by_gophers_rule():
    doc = web_doc(faq_page("en"))
    assert stop_words("en") == GOPHER_STOP_WORDS == stop_words(None)
    # the same page with every Gopher stop word removed (its other words unchanged)
    gopher = re.compile(r"\b(?:" + "|".join(sorted(GOPHER_STOP_WORDS)) + r")\b", re.I)
    stripped = Document(gopher.sub("", doc.text), "planted", {})
    spec = SourceSpec(type="html", paths=["x"])
    ((text, reason),) = document_pieces(stripped, spec, DataConfig(), set(), {})
    assert stripped.meta["language"] == "en" and reason == "few_stop_words"
    assert web_quality(text, DataConfig().web_filters) == "few_stop_words"  # the rule as it was, no language


def test_a_chinese_page_is_not_dropped_by_word_rules():
    page = faq_page("zh-cn")
    assert old_rules(page) == "mean_word_length_high"  # a whole sentence is one whitespace "word"
    stats: dict = {}
    doc = web_doc(page)
    ((text, reason),) = document_pieces(doc, SourceSpec(type="html", paths=["x"]), DataConfig(), set(), stats)
    assert doc.meta["language"] == "zh" and reason is None
    assert stats["rules_skipped:min_mean_word_length"] == 1 and stats["rules_skipped:min_stop_words"] == 1
    # the rules that do not count words still apply: a page of one line repeated is dropped
    assert web_quality("\n".join([text.split("\n")[0]] * 40), WebFilters(), "zh") == "duplicate_lines"
    # the line rules keep Chinese sentences (。 ends them; a line is not judged by its word count)
    assert clean_lines("这是一个很普通的中文句子。", LineFilters(), lang="zh") == "这是一个很普通的中文句子。"
    assert clean_lines("这是一个很普通的中文句子。", LineFilters()) == ""  # as one "word", before


def test_languages_key_is_checked():
    assert SourceSpec(type="jsonl", paths=["x"], languages=["en", "de"]).identifies_language
    assert not SourceSpec(type="jsonl", paths=["x"]).identifies_language
    assert SourceSpec(type="warc", paths=["x"]).identifies_language
    for bad in ([], ["English"], ["en", 3]):
        with pytest.raises(ConfigError, match="languages"):
            SourceSpec(type="warc", paths=["x"], languages=bad)
    with pytest.raises(ConfigError, match="min_language_score"):
        SourceSpec(type="warc", paths=["x"], min_language_score=1.5)
    # from a recipe: all, or a list
    assert from_dict(SourceSpec, {"type": "warc", "paths": ["x"], "languages": "all"}).languages == "all"
    assert from_dict(SourceSpec, {"type": "warc", "paths": ["x"], "languages": ["de"]}).languages == ["de"]
    with pytest.raises(ConfigError, match="languages: must be one of all or a list, got 'en'"):
        from_dict(SourceSpec, {"type": "warc", "paths": ["x"], "languages": "en"})


def test_prepare_counts_languages_in_the_manifest_and_summary(tmp_path):
    pages = [faq_page(lang, page) for lang in ("en", "de", "zh-cn") for page in ("nextrelease", "faqinfo")]
    (tmp_path / "crawl").mkdir()
    write_warc(tmp_path / "crawl" / "faq.warc.gz", pages)
    manifests, lines = {}, []
    for languages in ("all", ["en"]):
        out = tmp_path / str(len(manifests))
        out.mkdir()
        source = {"name": "web", "type": "warc", "paths": [str(tmp_path / "crawl")], "languages": languages}
        path = write_recipe(
            out / "r.yaml",
            out,
            out / "runs",
            data={"sources": [source], "prepared_dir": str(out / "prepared"), "dedup": {"near": False}},
        )
        recipe = load_recipe(str(path))
        train_tokenizer(recipe, str(path), progress=False)
        report: list[str] = []
        manifests[str(languages)] = prepare(recipe, str(path), progress=False, report=report.append)["web"]
        lines.append(report)
    every, english = manifests["all"]["stats"], manifests["['en']"]["stats"]
    for st in (every, english):
        assert st["lang:en"] == st["lang:de"] == st["lang:zh"] == 2
    assert every["lang_kept:de"] == every["lang_kept:zh"] == 2 and "dropped:language" not in every
    assert english["dropped:language"] == 4 and "lang_kept:de" not in english and english["lang_kept:en"] == 2
    assert english["lang_dropped_bytes:de:language"] > 0 and "lang_dropped_bytes:de:line_rules" not in english
    assert every["kept"] == 6 and english["kept"] == 2
    summary = "\n".join(lines[1])
    assert re.search(r"web: removed [\d.]+% of \d+ bytes: language [\d.]+%", summary), summary
    assert re.search(r"web \[de\]: 2 documents, [\d.]+% of the bytes; 0\.0% passed the rules", summary), summary
    on_disk = json.loads((tmp_path / "1" / "prepared" / "web" / "manifest.json").read_text())
    assert (
        on_disk["stats"]["lang_tokens:en"] == on_disk["splits"]["train"]["tokens"] + on_disk["splits"]["val"]["tokens"]
    )
