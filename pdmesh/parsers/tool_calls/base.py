"""Tool-call parsers: the shared streaming machinery.

``ToolCallParser`` is the interface (``feed``/``finish`` streaming, ``parse`` non-streaming);
``JsonSectionParser`` is the machine every JSON-based format shares. A format is a
``SectionSyntax``: the markers that open a section of calls in free text, what surrounds the
call objects in a section, and how objects are separated. Text outside sections is content.

Streaming commits a call (sends its ``id``/``name``) as soon as its name is a known function
and its arguments object has begun; from then on argument fragments are the raw JSON text as
it arrives, so their concatenation is exactly the arguments text. What cannot be a call
(unknown function, not JSON) before that point is given back as content, marker included.
A committed call cannot be taken back: if its JSON breaks later (or the stream is cut), it
keeps the arguments sent so far and the rest of that section is dropped (not leaked as
content). ``parse`` runs the same machine with ``hold_calls=True``: calls are held until
complete and ``json.loads`` accepts them, so a broken call there is content instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from pdmesh.parsers._holdback import partial_suffix_len
from pdmesh.parsers.json_scan import skip_ws
from pdmesh.parsers.tool_calls.call_object import CallObjectError, CallObjectParser
from pdmesh.parsers.tool_calls.events import (
    ContentDelta,
    FunctionDelta,
    ParsedToolCalls,
    ToolCallDelta,
    ToolCallEvent,
    assemble,
    new_call_id,
)
from pdmesh.parsers.tool_spec import ToolsArg, ToolSpec, as_tool_specs


class ToolCallParser:
    """One output stream's tool calls. Not thread-safe; one per request."""

    name: ClassVar[str] = ""

    def __init__(self, tools: ToolsArg = None, *, hold_calls: bool = False) -> None:
        """``tools``: ToolSpecs or the request's raw OpenAI ``tools`` (validated here).
        ``hold_calls``: emit each call only once complete and valid (``parse`` uses it)."""
        self.tools: list[ToolSpec] = as_tool_specs(tools)
        self._names = frozenset(t.name for t in self.tools)
        self._hold = hold_calls
        self._out: list[ToolCallEvent] = []
        self._strip_ws = False  # drop whitespace before the next content (after a call)
        self._next_index = 0

    @property
    def has_calls(self) -> bool:
        """Whether a call was emitted (the gateway's ``finish_reason: "tool_calls"``)."""
        return self._next_index > 0

    def feed(self, delta: str) -> list[ToolCallEvent]:
        self._push(delta, final=False)
        return self._take()

    def finish(self) -> list[ToolCallEvent]:
        """End of the stream: release held-back content; an open call stays as sent."""
        self._push("", final=True)
        return self._take()

    def parse(self, text: str, tools: ToolsArg = None) -> ParsedToolCalls:
        """Non-streaming: the whole output's content and calls (``tools`` default: this
        parser's). Does not touch this parser's streaming state."""
        parser = self._fresh(self.tools if tools is None else tools)
        return assemble(parser.feed(text) + parser.finish())

    # ------------------------------------------------------------------ for subclasses

    def _fresh(self, tools: ToolsArg) -> ToolCallParser:
        return type(self)(tools, hold_calls=True)

    def _push(self, delta: str, final: bool) -> None:
        raise NotImplementedError

    def _emit_content(self, text: str) -> None:
        if self._strip_ws:
            text = text.lstrip()
            if text:
                self._strip_ws = False
        if not text:
            return
        if self._out and isinstance(self._out[-1], ContentDelta):
            self._out[-1] = ContentDelta(self._out[-1].text + text)
        else:
            self._out.append(ContentDelta(text))

    def _emit_header(self, name: str) -> int:
        index = self._next_index
        self._next_index += 1
        self._out.append(
            ToolCallDelta(index, FunctionDelta(name, ""), id=new_call_id(), type="function")
        )
        return index

    def _emit_arguments(self, index: int, fragment: str) -> None:
        if fragment:
            self._out.append(ToolCallDelta(index, FunctionDelta(None, fragment)))

    def _take(self) -> list[ToolCallEvent]:
        out, self._out = self._out, []
        return out


@dataclass(frozen=True)
class SectionSyntax:
    """How a format writes calls. A section starts at a marker (or, with ``implicit_start``,
    at the start of the output when its first character opens one), then ``open``, then call
    objects separated by ``separator``, then ``close``; a missing ``close`` is tolerated."""

    markers: tuple[str, ...]
    open: str = ""
    separator: str | None = None
    close: str = ""
    implicit_start: bool = False
    # after a committed call breaks, drop text up to this marker (None: to the end)
    resync: str | None = None
    args_keys: tuple[str, ...] = ("arguments", "parameters")


# states of JsonSectionParser
_START = 0  # output start, only with implicit_start: leading whitespace held
_TEXT = 1
_OPEN = 2  # after a marker: expect syntax.open
_OBJ_START = 3
_OBJ = 4
_AFTER_OBJ = 5  # expect separator, close, or anything else (back to text)
_DISCARD = 6


class JsonSectionParser(ToolCallParser):
    syntax: ClassVar[SectionSyntax]

    def __init__(self, tools: ToolsArg = None, *, hold_calls: bool = False) -> None:
        super().__init__(tools, hold_calls=hold_calls)
        self._state = _START if self.syntax.implicit_start else _TEXT
        self._buf = ""
        self._pos = 0  # next index of _buf to look at
        self._seg: int | None = None  # start of text to give back as content if this fails
        self._obj: CallObjectParser | None = None
        self._obj_begin = 0
        self._index = -1  # index of the committed call being streamed, -1: none

    def _push(self, delta: str, final: bool) -> None:
        if not self._names:  # no tools offered: nothing can be a call
            self._emit_content(self._buf[self._pos :] + delta)
            self._buf, self._pos = "", 0
            return
        self._compact()
        self._buf += delta
        self._pos = self._run(self._buf, self._pos, final)
        if final:
            self._buf, self._pos, self._seg = "", 0, None

    def _compact(self) -> None:
        # keep what may still be given back; amortised O(1) per character
        cut = self._pos if self._seg is None else min(self._seg, self._pos)
        if self._hold and self._obj is not None:
            cut = min(cut, self._obj_begin)
        if cut and cut * 2 >= len(self._buf):
            self._buf = self._buf[cut:]
            self._pos -= cut
            self._obj_begin -= cut
            if self._seg is not None:
                self._seg -= cut

    def _run(self, buf: str, i: int, final: bool) -> int:
        syntax = self.syntax
        n = len(buf)
        while True:
            state = self._state
            if state == _TEXT:
                j, length = _find_first(buf, i, syntax.markers)
                if j >= 0:
                    self._emit_content(buf[i:j])
                    self._seg = j
                    self._state = _OPEN if syntax.open else _OBJ_START
                    i = j + length
                    continue
                hold = 0 if final else min(partial_suffix_len(buf, syntax.markers), n - i)
                self._emit_content(buf[i : n - hold])
                return n - hold
            if state == _START:
                k = skip_ws(buf, i)
                if k == n:
                    if final:
                        self._emit_content(buf[i:])
                        return n
                    return i
                if buf[k] == (syntax.open[0] if syntax.open else "{"):
                    self._seg = i
                    self._state = _OPEN if syntax.open else _OBJ_START
                else:
                    self._state = _TEXT
                continue
            if state == _OPEN:
                k = skip_ws(buf, i)
                if buf.startswith(syntax.open, k):
                    self._state, i = _OBJ_START, k + len(syntax.open)
                    continue
                if syntax.open.startswith(buf[k:]) and not final:
                    return i
                i = self._fail(buf, k)
                continue
            if state == _OBJ_START:
                self._obj = CallObjectParser(self._names, syntax.args_keys)
                self._obj_begin = i
                self._state = _OBJ
                continue
            if state == _OBJ:
                assert self._obj is not None
                try:
                    end = self._obj.push(buf, i)
                except CallObjectError as e:
                    # whether the call was committed must not depend on how the text was cut
                    # into deltas: commit what a cut just before the error would have
                    self._stream_call()
                    i = self._fail(buf, e.at)
                    continue
                if end < 0:
                    self._stream_call()
                    if final:
                        self._fail(buf, n)  # cut off: content if not committed, else kept
                    return n
                i = self._complete_call(buf, end)
                continue
            if state == _AFTER_OBJ:
                k = skip_ws(buf, i)
                tokens = [t for t in (syntax.separator, syntax.close) if t]
                if k == n or (not final and any(t.startswith(buf[k:]) for t in tokens)):
                    if final:
                        return n  # a partial close marker at the end is dropped
                    return k
                if syntax.separator and buf.startswith(syntax.separator, k):
                    self._seg = k
                    self._state, i = _OBJ_START, k + len(syntax.separator)
                    continue
                if syntax.close and buf.startswith(syntax.close, k):
                    k += len(syntax.close)
                self._state, self._strip_ws, i = _TEXT, True, k
                continue
            # _DISCARD
            if syntax.resync is None:
                return n
            j = buf.find(syntax.resync, i)
            if j < 0:
                return n - (0 if final else partial_suffix_len(buf, (syntax.resync,)))
            self._state, self._strip_ws, i = _TEXT, True, j + len(syntax.resync)

    def _stream_call(self) -> None:
        """Streaming: commit the call once it is known to be one, then send new arguments."""
        obj = self._obj
        if self._hold or obj is None:
            return
        if self._index < 0 and obj.name is not None and (obj.args_started or obj.done):
            self._index = self._emit_header(obj.name)
            self._seg = None
        if self._index >= 0:
            self._emit_arguments(self._index, obj.take_pending())

    def _complete_call(self, buf: str, end: int) -> int:
        obj = self._obj
        assert obj is not None and obj.name is not None
        if self._hold:
            try:
                valid = isinstance(json.loads(buf[self._obj_begin : end]), dict)
            except ValueError:  # also RecursionError on absurd nesting
                valid = False
            if not valid:
                return self._fail(buf, end)
            self._index = self._emit_header(obj.name)
            self._emit_arguments(self._index, obj.take_pending())
        else:
            self._stream_call()
        if not obj.args_started:
            self._emit_arguments(self._index, "{}")  # no arguments key: OpenAI sends "{}"
        self._obj, self._seg, self._index = None, None, -1
        self._state = _AFTER_OBJ
        return end

    def _fail(self, buf: str, at: int) -> int:
        """The text stops being a call at ``at``; returns where to go on."""
        if self._index >= 0:
            self._state = _DISCARD  # committed: the call keeps what was sent
        else:
            if self._seg is not None:
                self._strip_ws = False
                self._emit_content(buf[self._seg : at])
            self._state = _TEXT
        self._obj, self._seg, self._index = None, None, -1
        return at


def _find_first(buf: str, start: int, markers: tuple[str, ...]) -> tuple[int, int]:
    best, length = -1, 0
    for marker in markers:
        j = buf.find(marker, start)
        if j >= 0 and (best < 0 or j < best):
            best, length = j, len(marker)
    return best, length
