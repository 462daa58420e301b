"""Incremental ``text/event-stream`` parsing: bytes as they arrive in, event data out.

Network reads split the stream anywhere (mid-line, mid-UTF-8 character), so bytes are buffered
until a whole line is there and only then decoded. Of the SSE fields only ``data`` matters to
an OpenAI stream; ``event``, ``id``, ``retry`` and ``:`` comments (keep-alives) are skipped.
Lines end with ``\\n`` or ``\\r\\n`` (a lone ``\\r`` is not treated as a line end: no OpenAI-style
server sends one, and honouring it would need one byte of look-ahead across reads).
"""

from __future__ import annotations


class SSEDecoder:
    """Feed it raw chunks; it returns the ``data`` of every event they complete."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events: list[str] = []
        while (end := self._buf.find(b"\n")) >= 0:
            raw = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if event := self._line(raw.decode("utf-8", errors="replace")):
                events.append(event)
        return events

    def flush(self) -> list[str]:
        """At end of stream: the last event even without its closing blank line (lenient)."""
        events = self.feed(b"\n") if self._buf else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str) -> str | None:
        if not line:  # a blank line dispatches the event
            if not self._data:
                return None
            event = "\n".join(self._data)
            self._data = []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            # the spec strips exactly one space after the colon
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None
