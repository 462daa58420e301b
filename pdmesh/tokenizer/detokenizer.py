"""Incremental detokenization: generated token ids in, text deltas out, UTF-8 safe.

``IncrementalDetokenizer`` turns one token at a time into new text; ``StreamDetokenizer`` adds
stop strings on top and is what the tokenizer service's ``DetokenizeStream`` runs per call.
Both are pure Python over any ``Decoder`` (``pdmesh.tokenizer.Tokenizer`` is one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pdmesh.tokenizer.stop_strings import StopStringMatcher

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context for the first generated tokens. A few are enough for any
# decoder to see that the text does not start there (vLLM uses 5 as well).
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Emits the text each new token adds, never a partial UTF-8 character.

    NOTE: decoding is not a per-token map. A byte-level or byte-fallback token may carry only
    part of a character's UTF-8 bytes (an emoji often spans 3-4 tokens), and SentencePiece-style
    decoders drop the leading space of whatever token starts the decoded text. So the
    detokenizer keeps a short window of ids: the last emitted token(s) as context, then the
    pending ones. Each step decodes the window with and without the pending ids and emits the
    difference. If that ends in U+FFFD the last character is incomplete: nothing is emitted and
    the window grows until the bytes that complete it arrive. ``flush`` emits such a tail as
    U+FFFD once no more tokens can come.
    """

    def __init__(
        self,
        decoder: Decoder,
        skip_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._decoder = decoder
        self._skip_special_tokens = skip_special_tokens
        # window = context ids (already emitted, or the prompt's tail) + pending ids
        self._window = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._num_context = len(self._window)

    def add(self, token_id: int) -> str:
        """Append one token id; return the new text (empty while a character is incomplete)."""
        self._window.append(token_id)
        delta = self._pending_text()
        if delta and not delta.endswith(REPLACEMENT_CHAR):
            return self._emit(delta)
        return ""

    def flush(self) -> str:
        """Emit whatever is held back, decoding an incomplete character as U+FFFD."""
        if self._num_context == len(self._window):
            return ""
        return self._emit(self._pending_text())

    def _pending_text(self) -> str:
        decode, skip = self._decoder.decode, self._skip_special_tokens
        context = decode(self._window[: self._num_context], skip)
        full = decode(self._window, skip)
        # Decoders only append as ids are appended, so ``context`` is a prefix of ``full``.
        return full[len(context) :]

    def _emit(self, delta: str) -> str:
        # The pending ids become the next step's context; older ids are dropped, so the window
        # stays a few tokens long however long the generation runs.
        del self._window[: self._num_context]
        self._num_context = len(self._window)
        return delta


@dataclass(frozen=True)
class StreamDelta:
    """What one batch of token ids produced."""

    text: str  # new text, never containing a stop string or a partial character
    stopped: bool = False  # a stop string matched; no more text will come
    stop_string: str | None = None  # the stop string that matched
    num_tokens: int = 0  # tokens consumed so far (up to the one that completed the stop)


class StreamDetokenizer:
    """Incremental detokenization plus stop strings, for one generation stream."""

    def __init__(
        self,
        decoder: Decoder,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        prompt_token_ids: Sequence[int] = (),
    ) -> None:
        self._stops = StopStringMatcher(stop)
        self._detok = IncrementalDetokenizer(decoder, skip_special_tokens, prompt_token_ids)
        self._num_tokens = 0

    @property
    def stopped(self) -> bool:
        return self._stops.matched is not None

    def add(self, token_ids: Iterable[int], final: bool = False) -> StreamDelta:
        """Consume token ids one by one until a stop string matches (ids after it are ignored).
        ``final``: no more ids will come, so held-back text is released too (it may still
        complete a stop string; an incomplete character decodes as U+FFFD)."""
        parts: list[str] = []
        for token_id in token_ids:
            if self.stopped:
                break
            self._num_tokens += 1
            parts.append(self._stops.feed(self._detok.add(token_id)).text)
        if final:
            parts.append(self._stops.feed(self._detok.flush()).text)
            parts.append(self._stops.flush())
        return self._delta("".join(parts))

    def _delta(self, text: str) -> StreamDelta:
        return StreamDelta(text, self.stopped, self._stops.matched, self._num_tokens)
