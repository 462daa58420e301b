"""Reasoning parsers (``--reasoning-parser``): streamed splits reassemble to ``split``, and no
part of a ``<think>``/``</think>`` tag reaches either side."""

from __future__ import annotations

import random

import pytest

from pdmesh.parsers import REASONING_PARSERS, ReasoningParser, reasoning_parser


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    """Every 2-piece split, every 3-piece split of short texts, and random 1..8-char runs."""
    out = [[text], list(text)]
    n = len(text)
    out += [[text[:i], text[i:]] for i in range(n + 1)]
    if n <= 40:
        out += [[text[:i], text[i:j], text[j:]] for i in range(n + 1) for j in range(i, n + 1)]
    rng = random.Random(seed)
    for _ in range(30):
        pieces, i = [], 0
        while i < n:
            k = rng.randint(1, 8)
            pieces.append(text[i : i + k])
            i += k
        out.append(pieces)
    return out


def stream(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str, list[str]]:
    reasoning, content, emitted = [], [], []
    for piece in pieces:
        d = parser.feed(piece)
        reasoning.append(d.reasoning)
        content.append(d.content)
        emitted += [d.reasoning, d.content]
    d = parser.finish()
    reasoning.append(d.reasoning)
    content.append(d.content)
    return "".join(reasoning), "".join(content), emitted


CASES = [
    # (parser, text, expected reasoning, expected content)
    ("deepseek-r1", "I think 2+2=4.</think>The answer is 4.", "I think 2+2=4.", "The answer is 4."),
    ("deepseek-r1", "<think>\nhmm\n</think>\n\nfour", "\nhmm\n", "\n\nfour"),
    ("deepseek-r1", "<think><think>x</think>y", "x", "y"),
    ("deepseek-r1", "cut off while thinking", "cut off while thinking", ""),
    ("deepseek-r1", "</think>only content", "", "only content"),
    ("qwen3", "<think>\nLet me see.\n</think>\n\nParis.", "\nLet me see.\n", "\n\nParis."),
    ("qwen3", "Paris.", None, "Paris."),
    ("qwen3", "  \n<think>a</think>b", "a", "b"),
    ("qwen3", "The tag x</think> is literal", None, "The tag x</think> is literal"),
    ("qwen3", "Say <think> then", None, "Say <think> then"),
    ("qwen3", "<think>never closed", "never closed", ""),
    (
        "qwen3",
        "<think>call it<tool_call>\n{}\n</tool_call>",
        "call it",
        "<tool_call>\n{}\n</tool_call>",
    ),
    ("qwen3", "<thin", None, "<thin"),
    ("qwen3", "", None, ""),
    ("qwen3", "   ", None, "   "),
    ("deepseek-r1", "a</thin", "a</thin", ""),
]


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), CASES)
def test_split_and_every_streamed_split_agree(
    name: str, text: str, reasoning: str | None, content: str
) -> None:
    assert reasoning_parser(name).split(text) == (reasoning, content)
    for pieces in chunkings(text):
        got_reasoning, got_content, emitted = stream(reasoning_parser(name), pieces)
        assert (got_reasoning, got_content) == (reasoning or "", content), pieces
        if "<" not in (reasoning or "") + content:
            # the tags are removed whole: not even a "<" of one was ever emitted
            assert not any("<" in e for e in emitted), pieces


def test_qwen3_thinking_models_start_inside_the_block() -> None:
    parser = reasoning_parser("qwen3", starts_in_reasoning=True)
    assert parser.split("thinking</think>answer") == ("thinking", "answer")
    assert parser.in_reasoning


def test_stream_reports_its_side_as_it_goes() -> None:
    parser = reasoning_parser("qwen3")
    assert parser.feed("<think>ab").reasoning == "ab"
    assert parser.feed("c</thi").reasoning == "c"  # the tag prefix is held back
    d = parser.feed("nk>de")
    assert (d.reasoning, d.content) == ("", "de")
    assert not parser.in_reasoning


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="deepseek-r1, qwen3"):
        reasoning_parser("deepseek")
    assert set(REASONING_PARSERS) == {"deepseek-r1", "qwen3"}
