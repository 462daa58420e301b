"""``FastDetokenizer``: ``StreamDetokenizer``'s contract on the Rust incremental decoder.

Same inputs, same ``StreamDelta``s, token for token, as ``pdmesh.tokenizer.StreamDetokenizer``
(tests/unit/test_fast_detokenizer.py holds them equal on the default model's real tokenizer),
but a token costs one call into ``tokenizers.decoders.DecodeStream`` (Rust) instead of two
Python-driven decodes plus window bookkeeping. The router runs one per request stream, so the
per-token path never leaves its process.

NOTE: ``DecodeStream.step`` runs ``IncrementalDetokenizer``'s algorithm: it keeps the ids of
the last emitted text as context, decodes context + new ids and emits the difference unless
it ends in U+FFFD (an incomplete UTF-8 character). Where the two part, this module follows the
old one:

- Flush: DecodeStream has none, so the ids it holds back (and the context before them) are
  tracked here, and ``final`` decodes them with the backend, an incomplete character as U+FFFD.
- A context whose text is no prefix of the text with more ids: a token-id prompt that ends
  inside a character (its U+FFFD turns into the real character), or a decoder that rewrites
  across tokens. The old algorithm then cuts ``decode(context + new)`` at the *length* of
  ``decode(context)``, which drops the completed character's text with the prompt; DecodeStream
  emits the whole decoded window (prompt text included) when the stream starts that way and
  raises "Invalid prefix" mid-stream. Such a stream switches to ``_Window``, the old algorithm
  over the Rust backend's ``decode``: a prompt context that decodes to a trailing U+FFFD starts
  there, and a step that raises moves there with the state DecodeStream had. (Byte-level BPE
  never gets there mid-stream: text is emitted only when it does not end in U+FFFD.)
- Ids outside the vocabulary: the Rust decoder drops them silently, so callers that may see
  such ids check them first (the tokenizer service and the router do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tokenizers
from tokenizers.decoders import DecodeStream

from pdmesh.tokenizer.detokenizer import PROMPT_CONTEXT_TOKENS, REPLACEMENT_CHAR, StreamDelta
from pdmesh.tokenizer.stop_strings import StopStringMatcher

# a step: (backend, token id) -> the new text, or None while it is held back
Step = Callable[[tokenizers.Tokenizer, int], str | None]


class FastDetokenizer:
    """Incremental, UTF-8-safe detokenization plus stop strings for one generation stream."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._backend = backend
        self._skip = skip_special_tokens
        # without stop strings the matcher would only copy text through: skip it entirely
        self._stops = StopStringMatcher(stop) if stop else None
        self.stop_string: str | None = None
        self.num_tokens = 0  # consumed so far, up to the one that completed a stop string
        self._context: list[int] = []  # ids whose text is out already (or the prompt's tail)
        self._held: list[int] = []  # ids after them whose text is not out yet
        self._window: _Window | None = None  # the old algorithm, where DecodeStream can't go
        self._step: Step
        self._start(list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]))

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    def add(self, token_ids: Sequence[int], final: bool = False) -> StreamDelta:
        """Consume token ids until a stop string matches (ids after it are ignored). ``final``:
        no more ids will come, so held-back text is released too (it may still complete a stop
        string; an incomplete character decodes as U+FFFD)."""
        if self._stops is None:  # the common case, kept to the fewest Python steps
            count = len(token_ids)
            self.num_tokens += count
            # one token per engine step is what a stream carries: no loop, no join
            text = self._decode_one(token_ids[0]) if count == 1 else self._decode(token_ids)
            if final:
                text += self._flush()
            return StreamDelta(text, False, None, self.num_tokens)
        text = self._feed_stops(self._stops, token_ids, final)
        return StreamDelta(text, self.stop_string is not None, self.stop_string, self.num_tokens)

    def _decode(self, token_ids: Sequence[int]) -> str:
        # the per-token loop: one Rust call and one append
        step, backend, held = self._step, self._backend, self._held
        parts = []
        for token_id in token_ids:
            try:
                piece = step(backend, token_id)
            except Exception:  # tokenizers raises a bare Exception for "Invalid prefix"
                piece = self._to_window(held, token_id)
                step = self._step
            held.append(token_id)
            if piece is not None:
                parts.append(piece)
                self._context, held = held, []  # the ids of emitted text: the next context
        self._held = held
        return "".join(parts)

    def _decode_one(self, token_id: int) -> str:
        """``_decode((token_id,))``, without its loop."""
        held = self._held
        try:
            piece = self._step(self._backend, token_id)
        except Exception:  # tokenizers raises a bare Exception for "Invalid prefix"
            piece = self._to_window(held, token_id)
        held.append(token_id)
        if piece is None:
            return ""
        self._context, self._held = held, []  # the ids of emitted text: the next context
        return piece

    def _feed_stops(self, stops: StopStringMatcher, token_ids: Sequence[int], final: bool) -> str:
        # one token at a time: num_tokens must end at the token that completes a stop string
        parts = []
        for token_id in token_ids:
            if stops.matched is not None:
                break
            self.num_tokens += 1
            piece = self._decode_one(token_id)
            if piece:
                parts.append(stops.feed(piece).text)
        if final and stops.matched is None:
            parts.append(stops.feed(self._flush()).text)
            parts.append(stops.flush())
        self.stop_string = stops.matched
        return "".join(parts)

    def _flush(self) -> str:
        """The held-back ids' text (an incomplete character as U+FFFD); they become the
        context of whatever comes next, as in ``IncrementalDetokenizer.flush``."""
        if not self._held:
            return ""
        if self._window is not None:
            text = self._window.flush()
        else:
            decode, skip, context = self._backend.decode, self._skip, self._context
            text = decode(context + self._held, skip)[len(decode(context, skip)) :]
        self._start(self._held)
        return text

    def _start(self, context: list[int]) -> None:
        self._context, self._held, self._window = context, [], None
        if context and self._backend.decode(context, self._skip).endswith(REPLACEMENT_CHAR):
            self._window = _Window(self._backend, self._skip, context, ())  # see the NOTE
            self._step = self._window.step
        else:
            self._step = DecodeStream(context, self._skip).step

    def _to_window(self, held: list[int], token_id: int) -> str | None:
        """DecodeStream refused ``token_id`` (see the NOTE): go on with the old algorithm from
        the state it had, and step ``token_id`` there."""
        self._window = _Window(self._backend, self._skip, self._context, held)
        self._step = self._window.step
        return self._window.step(self._backend, token_id)


class _Window:
    """``IncrementalDetokenizer``'s algorithm on the Rust backend's ``decode``, started from any
    context and held-back ids: what a stream runs that DecodeStream cannot follow."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        skip_special_tokens: bool,
        context: Sequence[int],
        held: Sequence[int],
    ) -> None:
        self._decode = backend.decode
        self._skip = skip_special_tokens
        self._ids = [*context, *held]
        self._num_context = len(context)

    def step(self, backend: tokenizers.Tokenizer, token_id: int) -> str | None:
        self._ids.append(token_id)
        delta = self._pending_text()
        if delta and not delta.endswith(REPLACEMENT_CHAR):
            return self._emit(delta)
        return None

    def flush(self) -> str:
        return self._emit(self._pending_text())

    def _pending_text(self) -> str:
        context = self._decode(self._ids[: self._num_context], self._skip)
        return self._decode(self._ids, self._skip)[len(context) :]

    def _emit(self, delta: str) -> str:
        del self._ids[: self._num_context]
        self._num_context = len(self._ids)
        return delta
