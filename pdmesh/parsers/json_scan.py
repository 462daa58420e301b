"""Finding where one JSON value ends in text that arrives in pieces, in O(new chars).

Tool-call parsers stream an ``arguments`` value as its raw text grows, so they need to know
where the value ends without re-parsing the buffer on every delta. The scanner tracks only
what decides that: inside a string or not, a pending backslash escape, and bracket depth. It
does not validate the value (``{"a": tru}`` scans fine); whoever needs validity checks the
finished text once with ``json.loads``.
"""

from __future__ import annotations

import re

_IN_STRING_STOP = re.compile(r'["\\]')
_STRUCTURAL = re.compile(r'["{}\[\]]')
_SCALAR_END = re.compile(r"[^-+.0-9a-zA-Z]")
WHITESPACE = " \t\n\r"


def skip_ws(text: str, i: int) -> int:
    """Index of the first non-whitespace character of ``text`` at or after ``i``."""
    n = len(text)
    while i < n and text[i] in WHITESPACE:
        i += 1
    return i


class JsonValueScanner:
    """Scans one JSON value; feed it consecutive pieces with :meth:`push`."""

    __slots__ = ("_depth", "_in_string", "_escape", "_started", "_scalar", "done")

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._started = False
        self._scalar = False  # a number / true / false / null: it ends at the next other char
        self.done = False

    @property
    def is_scalar(self) -> bool:
        return self._scalar

    def push(self, text: str, i: int) -> int:
        """Scan ``text[i:]`` (the first call must start at the value's first character).

        Returns the index just past the value when it ends in this piece, else -1 (all of it
        consumed). A scalar's end is the first character that cannot belong to it, which is
        not consumed; at the end of the stream a scalar simply ends (see ``is_scalar``).
        """
        n = len(text)
        if not self._started and i < n:
            self._started = True
            c = text[i]
            if c in "{[":
                self._depth, i = 1, i + 1
            elif c == '"':
                self._in_string, i = True, i + 1
            else:
                self._scalar = True
        if self._scalar:
            m = _SCALAR_END.search(text, i)
            if m is None:
                return -1
            self.done = True
            return m.start()
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape, i = False, i + 1
                    continue
                m = _IN_STRING_STOP.search(text, i)
                if m is None:
                    return -1
                i = m.end()
                if m.group() == "\\":
                    self._escape = True
                    continue
                self._in_string = False
                if self._depth == 0:  # the value was a string
                    self.done = True
                    return i
                continue
            m = _STRUCTURAL.search(text, i)
            if m is None:
                return -1
            i, c = m.end(), m.group()
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return i
        return -1
