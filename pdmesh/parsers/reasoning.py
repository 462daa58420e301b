"""Splitting a model's ``<think>...</think>`` block into ``reasoning_content`` (``--reasoning-parser``).

Names and semantics follow SGLang's ``reasoning_parser.py`` detectors:

- ``deepseek-r1``: the chat template already opens ``<think>`` in the prompt, so the output
  *starts inside* the reasoning block; everything before ``</think>`` is reasoning (a leading
  ``<think>``, which R1-0528 repeats, is dropped). With no ``</think>`` at all (cut by
  ``max_tokens``) the whole output is reasoning, as in SGLang.
- ``qwen3``: the model opens ``<think>`` itself; output that does not begin with ``<think>``
  (``enable_thinking=False``: the template puts an empty block in the prompt) is all content.
  A ``<tool_call>`` inside the block ends the reasoning as ``</think>`` would and stays in the
  content (SGLang: Qwen3.5 sometimes opens a tool call without closing the block), so the tool
  parser that runs on the content side still sees it.

One difference on purpose: SGLang's ``qwen3`` opens reasoning on a ``<think>`` anywhere in the
text; here only at the start of the output (after whitespace), so a literal ``<think>`` in an
answer stays content, and streaming and ``split`` agree.

Streaming never emits part of a tag to either side: a suffix that may start a tag is held back
until the next delta or ``finish()``. ``split`` runs the same machine over the whole text, so a
streamed run reassembles exactly to ``split``'s result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pdmesh.parsers._holdback import partial_suffix_len

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ReasoningDelta:
    """What one ``feed`` (or ``finish``) releases to each side; either may be empty."""

    reasoning: str = ""
    content: str = ""


# states of the machine
_BEFORE = 0  # nothing decided yet: leading whitespace held, waiting to see if <think> follows
_REASONING_START = 1  # inside the block, nothing emitted yet: leading <think> tags are dropped
_REASONING = 2
_CONTENT = 3  # after the block (or no block at all): everything is content


class ReasoningParser:
    """One output stream's reasoning/content split. Not thread-safe; one per request."""

    name: ClassVar[str] = ""
    # whether the output starts inside the block (the chat template opened it)
    starts_in_reasoning: ClassVar[bool] = False
    # markers other than </think> that end the block; they are kept in the content
    implicit_ends: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, starts_in_reasoning: bool | None = None) -> None:
        """``starts_in_reasoning`` overrides the format's default (e.g. Qwen3-Thinking models,
        whose template opens ``<think>`` in the prompt, with the ``qwen3`` parser)."""
        self._starts_in = (
            self.starts_in_reasoning if starts_in_reasoning is None else starts_in_reasoning
        )
        self._state = _REASONING_START if self._starts_in else _BEFORE
        self._entered = self._starts_in  # was a reasoning block ever entered
        self._buf = ""  # held-back text (a possible tag prefix, or leading whitespace)

    @property
    def in_reasoning(self) -> bool:
        return self._state in (_REASONING_START, _REASONING)

    def feed(self, delta: str) -> ReasoningDelta:
        reasoning: list[str] = []
        content: list[str] = []
        self._run(self._buf + delta, reasoning, content, final=False)
        return ReasoningDelta("".join(reasoning), "".join(content))

    def finish(self) -> ReasoningDelta:
        """End of the stream: release what was held back to the side it was on."""
        reasoning: list[str] = []
        content: list[str] = []
        self._run(self._buf, reasoning, content, final=True)
        return ReasoningDelta("".join(reasoning), "".join(content))

    def split(self, text: str) -> tuple[str | None, str]:
        """Non-streaming: ``(reasoning or None when no block was entered, content)``."""
        parser = type(self)(starts_in_reasoning=self._starts_in)
        first = parser.feed(text)
        last = parser.finish()
        reasoning = first.reasoning + last.reasoning
        return (reasoning if parser._entered else None), first.content + last.content

    # --------------------------------------------------------------------------- machine

    def _run(self, text: str, reasoning: list[str], content: list[str], final: bool) -> None:
        self._buf = ""
        i = 0
        while i < len(text):
            if self._state == _CONTENT:
                content.append(text[i:])
                return
            if self._state == _BEFORE:
                rest = text[i:]
                stripped = rest.lstrip()
                if stripped.startswith(THINK_START):
                    # whitespace before the opening tag belongs to neither side
                    i += len(rest) - len(stripped) + len(THINK_START)
                    self._state, self._entered = _REASONING_START, True
                    continue
                if not final and (not stripped or THINK_START.startswith(stripped)):
                    self._buf = rest  # still undecided
                    return
                self._state = _CONTENT
                continue
            if self._state == _REASONING_START:
                if text.startswith(THINK_START, i):
                    i += len(THINK_START)  # R1-0528 writes the tag the template opened again
                    continue
                if not final and THINK_START.startswith(text[i:]):
                    self._buf = text[i:]
                    return
                self._state = _REASONING
                continue
            # _REASONING: look for the end of the block
            end, end_len, keep = self._find_end(text, i)
            if end >= 0:
                if end > i:
                    reasoning.append(text[i:end])
                self._state = _CONTENT
                i = end + (0 if keep else end_len)
                continue
            hold = 0 if final else partial_suffix_len(text, (THINK_END, *self.implicit_ends))
            hold = min(hold, len(text) - i)
            if len(text) - hold > i:
                reasoning.append(text[i : len(text) - hold])
            self._buf = text[len(text) - hold :]
            return
        if final:
            self._buf = ""

    def _find_end(self, text: str, start: int) -> tuple[int, int, bool]:
        """Earliest end of the block at or after ``start``: (index, marker length, marker kept
        in content); index -1 when none."""
        best, best_len, keep = text.find(THINK_END, start), len(THINK_END), False
        for marker in self.implicit_ends:
            j = text.find(marker, start)
            if j >= 0 and (best < 0 or j < best):
                best, best_len, keep = j, len(marker), True
        return best, best_len, keep


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek-r1"
    starts_in_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    starts_in_reasoning = False
    implicit_ends = ("<tool_call>",)


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    cls.name: cls for cls in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def reasoning_parser(name: str, *, starts_in_reasoning: bool | None = None) -> ReasoningParser:
    """A fresh parser for ``--reasoning-parser NAME``; ValueError naming the valid names."""
    try:
        cls = REASONING_PARSERS[name]
    except KeyError:
        valid = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; valid names: {valid}") from None
    return cls(starts_in_reasoning=starts_in_reasoning)
