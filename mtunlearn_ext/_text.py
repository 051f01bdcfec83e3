"""User-named text (task, method and file names, a record's fields) made safe to show: in a
terminal, a Markdown report or a plot; and Python's messages about such text put in a user's
terms."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

__all__ = ["display_width", "listed_first", "pad_to", "visible_controls",
           "without_digit_limit_advice"]

#: Characters that act instead of being shown. C0 / C1 controls and DEL: a terminal obeys them
#: (ESC starts a sequence that recolours, moves the cursor or clears the screen; CR returns to
#: the line's start, so what follows overwrites what came before; BEL rings). Bidirectional
#: formatting characters (marks, embeddings, overrides, isolates): they reorder the text around
#: them, so that ``u\u202egp.kcab.pt`` reads as a name ending in ``.pt`` it does not end in.
#: Letters of right-to-left scripts are not among them: they show as they are. Lone
#: surrogates are, which are no characters at all: Python decodes a file name's bytes that are not
#: UTF-8 as them (``u\udcff.pt``), and writing one as UTF-8 fails (the report of a record
#: naming such a checkpoint failed with UnicodeEncodeError, a terminal's output too).
_ACTING = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")


def visible_controls(text: str, keep: str = "") -> str:
    """``text`` with every control or bidirectional formatting character (or lone surrogate)
    written as its Python escape (``\\x1b``, ``\\n``, ``\\u202e``, ``\\udcff``), so that it
    is seen rather than obeyed; the characters of ``keep`` (``"\\n"`` for a text of several
    lines) stay as they are. Text without such characters is returned unchanged."""
    return _ACTING.sub(lambda m: m[0] if m[0] in keep else ascii(m[0])[1:-1], text)


def display_width(text: str) -> int:
    """The columns ``text`` takes in a terminal: two for an East Asian wide or fullwidth
    character (CJK ideographs, most emoji), none for a combining mark, one for the others.
    ``len`` counted one for each, so a table row holding such a name was shifted."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF"
               else 1 for c in text)


def pad_to(text: str, width: int, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` terminal columns (:func:`display_width`), on
    the right (``str.ljust``) or, with ``right``, on the left (``str.rjust``)."""
    fill = " " * max(0, width - display_width(text))
    return fill + text if right else text + fill


def without_digit_limit_advice(error: ValueError) -> str:
    """Python's refusal to read an integer past its digit limit (a JSON number or an id of
    more than 4300 digits), without its advice to raise the limit
    (``sys.set_int_max_str_digits``), which a user of a command or a file cannot follow."""
    return str(error).split("; use sys.set_int_max_str_digits")[0]


def listed_first(values: Sequence[object], shown: int) -> str:
    """The first ``shown`` of ``values``, comma-separated, for a message; ``, ...`` after them
    when there are more."""
    return ", ".join(str(v) for v in values[:shown]) + (", ..." if len(values) > shown else "")
