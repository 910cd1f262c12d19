"""Word lists shared by every stage that counts words: one rule, defined here.

The rule: a word matches **whole-word and case-insensitively**. "Wait" counts in "Wait,",
" wait." and "WAIT", not in "Waiting", "await" or "HmmWait". Whole-word means not preceded
or followed by a letter, digit or underscore, so a lexicon entry may also be punctuation
("=" counts in "a = b"). Case-insensitive because R1-style traces hesitate mid-sentence
("But wait, ...") and the transcoder's token rule already lower-cases tokens.

`steer` (hesitations in generated text), `transcoder_eval` (the same count) and the
`concepts` stage (the lexical `hesitation_word` concept) all use `HESITATION_WORDS` with
`word_pattern`; the configs' word lists default to it.
"""

from __future__ import annotations

import re
from typing import Iterable

HESITATION_WORDS: tuple[str, ...] = ("Wait", "Hmm")
"""The hesitation lexicon (steer.hesitation_tokens, transcoder_extract.hesitation.words and the
`hesitation_word` concept default to it)."""

_BEFORE = r"(?<![A-Za-z0-9_])"
_AFTER = r"(?![A-Za-z0-9_])"


def word_pattern(words: Iterable[str]) -> re.Pattern:
    """A compiled pattern matching any of `words` whole-word, case-insensitively."""
    words = sorted({w for w in words}, key=len, reverse=True)
    if not words or any(not w for w in words):
        raise ValueError(f"a word list must hold non-empty words, got {words!r}")
    return re.compile(_BEFORE + "(?:" + "|".join(re.escape(w) for w in words) + ")" + _AFTER, re.IGNORECASE)


def word_start_pattern(words: Iterable[str]) -> re.Pattern:
    """Matches (with `.match`) text that starts with one of `words` as a whole word."""
    words = sorted({w for w in words}, key=len, reverse=True)
    if not words or any(not w for w in words):
        raise ValueError(f"a word list must hold non-empty words, got {words!r}")
    return re.compile("(?:" + "|".join(re.escape(w) for w in words) + ")" + _AFTER, re.IGNORECASE)


def count_words(text: str, words: Iterable[str] | re.Pattern = HESITATION_WORDS) -> int:
    """Occurrences of any of `words` in `text` under the rule above."""
    if not text:
        return 0
    pat = words if isinstance(words, re.Pattern) else word_pattern(words)
    return len(pat.findall(text))
