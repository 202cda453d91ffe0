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
# The Braille blank (So) draws nothing either.
_BLANK = frozenset({"\u115f", "\u1160", "\u3164", "\uffa0", "\u034f", "\u17b4", "\u17b5", "\u2800"})
# Unassigned code points that Unicode reserves as default ignorable (DerivedCoreProperties:
# U+2065, U+FFF0..FFF8 and those of U+E0000..E0FFF): a renderer draws them as nothing,
# whatever they are assigned later. Other unassigned ones stay: a newer emoji is unassigned
# to an older Python.
_IGNORABLE_UNASSIGNED = ((0x2065, 0x2065), (0xFFF0, 0xFFF8), (0xE0000, 0xE0FFF))
# Marks stack on the letter before them, above and below: scripts need a few on one letter
# (Vietnamese two, Hebrew points and cantillation or Tibetan stacks up to four), while a
# pile of them draws over the page's lines above and below the name (the one that tells
# look-alike agents apart among them).
_MAX_MARKS = 4
# Spaces of any width in a row push the rest of a line (an amount) away; a name or filter
# has no use for more than a few.
_MAX_SPACES = 3


def check_display_text(text: str) -> str:
    """``text`` unchanged, or ValueError naming the first control or format character, or
    a pile of combining marks or of spaces.

    Usable as a pydantic ``AfterValidator`` (the error becomes a validation error).
    """
    marks = spaces = 0
    for char in text:
        category = unicodedata.category(char)
        if category == "Cn" and any(lo <= ord(char) <= hi for lo, hi in _IGNORABLE_UNASSIGNED):
            raise ValueError(f"must not contain U+{ord(char):04X} (an unassigned invisible one)")
        if category in _INVISIBLE or char in _BLANK:
            name = unicodedata.name(char, "a control character")
            raise ValueError(f"must not contain U+{ord(char):04X} ({name})")
        marks = marks + 1 if category in ("Mn", "Me") else 0
        if marks > _MAX_MARKS:
            raise ValueError(f"must not stack more than {_MAX_MARKS} combining marks")
        spaces = spaces + 1 if category == "Zs" else 0
        if spaces > _MAX_SPACES:
            raise ValueError(f"must not hold more than {_MAX_SPACES} spaces in a row")
    return text
