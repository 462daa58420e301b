"""Incremental parser of one call object, ``{"name": "f", "arguments": {...}}``.

It consumes characters as they arrive and exposes what the owner needs to stream: the name
once its string closes, and the raw text of the arguments object as it grows (``pending``).
Keys may come in any order; other keys' values are skipped. ``CallObjectError`` says where
the text stops being such an object (that character is not consumed), so the owner can give
the text back as content.
"""

from __future__ import annotations

import json
from collections.abc import Container

from pdmesh.parsers.json_scan import WHITESPACE, JsonValueScanner


class CallObjectError(Exception):
    """The text is not a call object to a known function; ``at`` is the first index not
    consumed (the offending character, or the end of the unknown name)."""

    def __init__(self, at: int, reason: str) -> None:
        super().__init__(reason)
        self.at = at
        self.reason = reason


# states
_OPEN = 0  # expect "{"
_FIRST_KEY = 1  # expect a key or "}"
_KEY_START = 2  # expect a key (after ",")
_KEY = 3  # inside a key string
_COLON = 4
_VALUE = 5  # expect a value
_NAME = 6  # inside the name string
_ARGS = 7  # inside the arguments object (streamed)
_SKIP = 8  # inside another key's value (ignored)
_AFTER_VALUE = 9  # expect "," or "}"
_DONE = 10


class CallObjectParser:
    def __init__(self, known_names: Container[str], args_keys: tuple[str, ...]) -> None:
        self._known = known_names
        self._args_keys = args_keys
        self._state = _OPEN
        self._key_parts: list[str] = []  # raw text of the key (or name) string being read
        self._key = ""
        self._escape = False
        self._value: JsonValueScanner | None = None
        self.name: str | None = None
        self.args_started = False  # the arguments value began (with "{")
        self.args_done = False
        self.pending: list[str] = []  # arguments text not yet taken by the owner

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def take_pending(self) -> str:
        text = "".join(self.pending)
        self.pending.clear()
        return text

    def push(self, text: str, i: int) -> int:
        """Consume ``text[i:]``; the index past the closing ``}`` when the object ends here,
        else -1. Raises CallObjectError."""
        n = len(text)
        while i < n:
            state = self._state
            if state in (_KEY, _NAME):
                i = self._read_string(text, i)
                continue
            if state in (_ARGS, _SKIP):
                assert self._value is not None
                start = i
                end = self._value.push(text, i)
                if state == _ARGS:
                    self.pending.append(text[start : n if end < 0 else end])
                if end < 0:
                    return -1
                if state == _ARGS:
                    self.args_done = True
                self._value, self._state, i = None, _AFTER_VALUE, end
                continue
            c = text[i]
            if c in WHITESPACE:
                i += 1
                continue
            if state == _OPEN:
                if c != "{":
                    raise CallObjectError(i, "expected '{'")
                self._state = _FIRST_KEY
            elif state in (_FIRST_KEY, _KEY_START):
                if c == '"':
                    self._key_parts = ['"']
                    self._state = _KEY
                elif c == "}" and state == _FIRST_KEY:
                    return self._close(i)
                else:
                    raise CallObjectError(i, "expected a key")
            elif state == _COLON:
                if c != ":":
                    raise CallObjectError(i, "expected ':'")
                self._state = _VALUE
            elif state == _VALUE:
                i = self._start_value(c, i)
                continue
            elif state == _AFTER_VALUE:
                if c == ",":
                    self._state = _KEY_START
                elif c == "}":
                    return self._close(i)
                else:
                    raise CallObjectError(i, "expected ',' or '}'")
            i += 1
        return -1

    # ------------------------------------------------------------------------- helpers

    def _read_string(self, text: str, i: int) -> int:
        n = len(text)
        start = i
        while i < n:
            c = text[i]
            if self._escape:
                self._escape = False
            elif c == "\\":
                self._escape = True
            elif c == '"':
                self._key_parts.append(text[start : i + 1])
                return self._string_done(i + 1)
            i += 1
        self._key_parts.append(text[start:])
        return n

    def _string_done(self, end: int) -> int:
        raw = "".join(self._key_parts)
        self._key_parts = []
        try:
            value = json.loads(raw)
        except ValueError:
            raise CallObjectError(end, "bad string") from None
        if self._state == _KEY:
            self._key = value
            self._state = _COLON
            return end
        # the name
        if value not in self._known:
            # SGLang drops calls to undefined functions (logging a warning) and vLLM's
            # parsers pass them through; here they are given back as content, so nothing
            # the model wrote is lost and no call the client did not offer reaches it.
            raise CallObjectError(end, f"unknown function {value!r}")
        self.name = value
        self._state = _AFTER_VALUE
        return end

    def _start_value(self, c: str, i: int) -> int:
        """Enter the state that reads the value starting with ``c`` at ``i``; returns where
        that state goes on reading."""
        key = self._key
        if key == "name":
            if self.name is not None or c != '"':
                raise CallObjectError(i, "the name must be one string")
            self._key_parts = ['"']
            self._state = _NAME
            return i + 1  # the opening quote is consumed here
        if key in self._args_keys:
            if self.args_started or c != "{":
                raise CallObjectError(i, "the arguments must be one JSON object")
            self.args_started = True
            self._state = _ARGS
        elif c in '{["-0123456789tfn':
            self._state = _SKIP
        else:
            raise CallObjectError(i, "expected a value")
        self._value = JsonValueScanner()
        return i  # the scanner reads the first character itself

    def _close(self, i: int) -> int:
        if self.name is None:
            raise CallObjectError(i, "no function name")
        self._state = _DONE
        return i + 1
