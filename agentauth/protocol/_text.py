"""Text a person reads: names and filters an agent chooses, shown on the approval page.

The page draws such text as text, never as markup, but some characters still change what
a reader sees without being seen themselves: bidi overrides and isolates can reverse the
rest of a line (an amount included), zero-width characters make two different names look
the same, and line breaks can fake a line of the page's own wording. None of them belongs
in a name, so such text is refused where it enters rather than cleaned up where it is shown.
"""

from __future__ import annotations

import unicodedata

__all__ = ["check_display_text"]

# Cc: controls (newline, tab, DEL, C1). Cf: format characters (bidi embeddings, overrides
# and isolates, zero-width space and joiners, word joiner, BOM, soft hyphen...). Zl, Zp: the
# line and paragraph separators, line breaks outside Cc. Cs: surrogates, which cannot be
# encoded as UTF-8 at all. (Refusing Cf also refuses the joiner inside emoji sequences.)
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# And blanks the categories above miss: the Hangul fillers (letters, Lo, that draw
# nothing), the combining grapheme joiner and the Khmer inherent vowels (marks, Mn, that
# draw nothing). Variation selectors are kept: they choose how an emoji is drawn, and
# names hold emoji.
_BLANK = frozenset({"\u115f", "\u1160", "\u3164", "\uffa0", "\u034f", "\u17b4", "\u17b5"})


def check_display_text(text: str) -> str:
    """``text`` unchanged, or ValueError naming the first control or format character.

    Usable as a pydantic ``AfterValidator`` (the error becomes a validation error).
    """
    for char in text:
        if unicodedata.category(char) in _INVISIBLE or char in _BLANK:
            name = unicodedata.name(char, "a control character")
            raise ValueError(f"must not contain U+{ord(char):04X} ({name})")
    return text
