"""Which language a chain of thought is in, by Unicode script: R1's language-consistency measure.

DeepSeek-R1 (§2.3.2) rewards "the proportion of target language words in the CoT" to stop
reasoning that drifts between languages (its RL mixed Chinese and English). Here a text is
cut into words and each word is in the target language when all its letters are in the
language's script(s) (`regex`'s `\\p{Script=...}`, the Unicode Script property):

    words   runs of letters (and their combining marks); in scripts written without spaces
            (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar, Tibetan) each character is a
            word, as word processors count East Asian text. Digits, symbols and punctuation
            are not words, so "47 + 85 = 132" counts for no language.
    share   target-language words / all words; None for a text without words.

Why scripts and not a language-identification model (langid, lingua, fastText): the
drift R1 fights is between scripts, CoTs are short and full of numbers and symbols where
models trained on prose misjudge, and a script table is exact, deterministic and needs no
model data. What it cannot do: tell apart languages that share a script (English from
French, Russian from Ukrainian); those codes map to the same script here.
"""

from __future__ import annotations

from functools import lru_cache

import regex

# language code -> the scripts its words are written in
LANGUAGE_SCRIPTS: dict[str, tuple[str, ...]] = {
    **{code: ("Latin",) for code in ("en", "fr", "de", "es", "it", "pt", "nl", "pl", "tr", "vi", "id",
                                     "sv", "cs", "ro")},
    **{code: ("Cyrillic",) for code in ("ru", "uk", "bg", "sr", "kk", "be")},
    "zh": ("Han",),
    "ja": ("Han", "Hiragana", "Katakana"),
    "ko": ("Hangul", "Han"),
    "ar": ("Arabic",), "fa": ("Arabic",), "he": ("Hebrew",), "el": ("Greek",),
    "hi": ("Devanagari",), "bn": ("Bengali",), "th": ("Thai",), "ka": ("Georgian",),
    "hy": ("Armenian",),
}
# scripts written without spaces between words: one character, one word
UNSPACED_SCRIPTS = ("Han", "Hiragana", "Katakana", "Thai", "Lao", "Khmer", "Myanmar", "Tibetan")

_UNSPACED = "".join(rf"\p{{Script={s}}}" for s in UNSPACED_SCRIPTS)
# a character of an unspaced script, or a run of other letters with their combining marks
_WORD = regex.compile(rf"[{_UNSPACED}]|(?:(?![{_UNSPACED}])\p{{L}}\p{{M}}*)+")


@lru_cache(maxsize=None)
def _script_pattern(target: str) -> regex.Pattern:
    """A word made only of the target's scripts' letters (and marks, which belong to any script)."""
    scripts = LANGUAGE_SCRIPTS.get(target)
    if scripts is None:
        try:  # a script name itself: "Cyrillic", "Han", "Arabic" ...
            regex.compile(rf"\p{{Script={target}}}")
        except regex.error:
            raise ValueError(f"unknown language {target!r}: use a code ({', '.join(sorted(LANGUAGE_SCRIPTS))}) "
                             "or a Unicode script name (e.g. Cyrillic, Han, Devanagari)") from None
        scripts = (target,)
    letters = "".join(rf"\p{{Script={s}}}" for s in scripts)
    return regex.compile(rf"[{letters}\p{{M}}]+")


def words(text: str) -> list[str]:
    """The text's words: letter runs, and single characters of unspaced scripts."""
    return _WORD.findall(text)


def language_share(text: str, language: str) -> float | None:
    """The share of the text's words written in `language`'s script(s) (a code from
    LANGUAGE_SCRIPTS or a Unicode script name); None when the text has no words."""
    pattern = _script_pattern(language)
    found = words(text)
    if not found:
        return None
    return sum(pattern.fullmatch(w) is not None for w in found) / len(found)
