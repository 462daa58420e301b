"""Per-request bookkeeping: when tokens arrived, how many, and the outcome.

Definitions (all per request, times from the moment the request is sent):
- TTFT: until the first streamed chunk that carries output (text or token ids);
- ITL: the gaps between later such chunks. A chunk known to carry ``n`` tokens (gRPC sends
  token ids) adds ``n`` gaps of ``gap / n`` each, as SGLang does, so batched delivery does not
  look like slow tokens followed by free ones; an SSE chunk counts as one token;
- TPOT: ``(e2e - ttft) / (output_tokens - 1)``, defined for two or more output tokens;
- e2e: until the stream's end.
Output tokens come from the server's ``usage`` when it sends one, else from the chunk count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    index: int
    prompt_len: int  # by the bench tokenizer
    expected_output_len: int  # what the request asked for
    success: bool = False
    error: str = ""
    start_s: float = 0.0  # send time, seconds since the timed run began
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0  # the server's usage when reported, else prompt_len
    usage_reported: bool = False
    chunks: int = 0  # streamed chunks that carried output
    finish_reason: str = ""
    text: str = ""

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class StreamClock:
    """Times one streamed request; ``clock`` is injectable so tests can drive it."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.start = clock()
        self.first: float | None = None
        self._last = self.start
        self.itl: list[float] = []
        self.tokens = 0
        self.chunks = 0
        self.end: float | None = None

    def arrived(self, n_tokens: int = 1) -> None:
        """A chunk with ``n_tokens`` of output arrived now; empty chunks are not output."""
        if n_tokens <= 0:
            return
        now = self._clock()
        if self.first is None:
            self.first = now
        else:
            gap = (now - self._last) / n_tokens
            self.itl.extend([gap] * n_tokens)
        self._last = now
        self.tokens += n_tokens
        self.chunks += 1

    def stop(self) -> None:
        """The stream's end marker arrived now; bytes after it do not count toward e2e."""
        if self.end is None:
            self.end = self._clock()

    def finish(
        self,
        result: RequestResult,
        completion_tokens: int | None = None,
        prompt_tokens: int | None = None,
    ) -> RequestResult:
        """Fill ``result``'s timings and counts as a success; usage counts win when given."""
        end = self.end if self.end is not None else self._clock()
        result.success = True
        result.e2e_s = end - self.start
        # A stream whose only output came with its last message (e.g. EOS at once, whose text
        # is empty) still had its first token by the end.
        result.ttft_s = (self.first if self.first is not None else end) - self.start
        result.itl_s = self.itl
        result.chunks = self.chunks
        result.usage_reported = completion_tokens is not None
        result.output_tokens = completion_tokens if completion_tokens is not None else self.tokens
        result.prompt_tokens = prompt_tokens if prompt_tokens is not None else result.prompt_len
        return result

    def fail(self, result: RequestResult, error: str) -> RequestResult:
        result.success = False
        result.error = error
        result.e2e_s = self._clock() - self.start
        return result
