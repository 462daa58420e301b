"""Incremental detokenization and stop strings, on tiny tokenizers built here (no model).

Three real ``tokenizers`` tokenizers cover the decoder families that matter: byte-level BPE
(GPT-2, Llama 3, Qwen, SmolLM: an emoji is several byte tokens), SentencePiece-style byte
fallback (Llama 2, Mistral: ``<0xF0>`` tokens, a decoder that strips the text's leading space)
and a Metaspace word-level one. Stop-string cases use a decoder whose pieces are spelled out,
so where each token boundary falls is explicit.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from pdmesh.errors import InvalidRequestError
from pdmesh.tokenizer import (
    IncrementalDetokenizer,
    StopStringMatcher,
    StreamDelta,
    StreamDetokenizer,
    Tokenizer,
)

FFFD = "\ufffd"
MIXED_TEXT = "hi 👋 世界, naïve café — 🎉🎉 ok 日本語 𝄞 done"


def byte_level_tokenizer() -> Tokenizer:
    """Byte-level BPE trained on ASCII only, so every non-ASCII character is 2-4 byte tokens."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|im_end|>"],
        show_progress=False,
    )
    corpus = ["hello world, the quick brown fox jumps over the lazy dog. done ok"] * 20
    backend.train_from_iterator(corpus, trainer=trainer)
    return Tokenizer(backend, "byte-level", special_tokens={"eos_token": "<|im_end|>"})


def byte_fallback_tokenizer() -> Tokenizer:
    """Llama-2-style: letters and ``▁`` in the vocab, everything else as ``<0xNN>`` tokens."""
    vocab = {"<unk>": 0}
    vocab.update({f"<0x{b:02X}>": 1 + b for b in range(256)})
    for piece in "▁abcdefghijklmnopqrstuvwxyz":
        vocab[piece] = len(vocab)
    vocab["▁h"] = len(vocab)
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=[("▁", "h")], byte_fallback=True, unk_token="<unk>")
    )
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # drops the leading space of the decoded text
        ]
    )
    return Tokenizer(backend, "byte-fallback")


class PiecesDecoder:
    """Token id i decodes to ``pieces[i]``: token boundaries are exactly where the test puts
    them."""

    def __init__(self, pieces: Sequence[str]) -> None:
        self.pieces = list(pieces)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in token_ids)

    def ids(self, *pieces: str) -> list[int]:
        return [self.pieces.index(p) for p in pieces]


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def byte_fallback() -> Tokenizer:
    return byte_fallback_tokenizer()


def stream_one_by_one(
    tok: Tokenizer,
    ids: Sequence[int],
    skip_special_tokens: bool = True,
    prompt_token_ids: Sequence[int] = (),
) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens, prompt_token_ids)
    return [detok.add(t) for t in ids] + [detok.flush()]


# ------------------------------------------------------------------------ UTF-8 and bytes


@pytest.mark.parametrize("make", [byte_level_tokenizer, byte_fallback_tokenizer])
def test_multibyte_characters_arrive_whole(make: Callable[[], Tokenizer]) -> None:
    tok = make()
    ids = tok.encode(MIXED_TEXT)
    # precondition: characters really are split, or this test would prove nothing
    assert any(FFFD in tok.decode([i]) for i in ids)
    deltas = stream_one_by_one(tok, ids)
    assert all(FFFD not in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids) == MIXED_TEXT
    for char in ("👋", "世", "界", "🎉", "𝄞"):
        assert any(char in d for d in deltas)  # arrived whole, inside one delta


def test_emoji_split_over_four_byte_tokens(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("👋")
    assert len(ids) == 4  # one token per UTF-8 byte
    assert stream_one_by_one(byte_level, ids) == ["", "", "", "👋", ""]


def test_byte_fallback_tokens(byte_fallback: Tokenizer) -> None:
    ids = byte_fallback.encode("a世")
    # "世" is not in the vocabulary: its three UTF-8 bytes come as <0xE4> <0xB8> <0x96>
    assert [byte_fallback.decode([i]) for i in ids[-3:]] == [FFFD] * 3
    assert len(ids) == 5  # ▁, a, and the three byte tokens
    assert "".join(stream_one_by_one(byte_fallback, ids)) == "a世"
    assert stream_one_by_one(byte_fallback, ids)[-4:] == ["", "", "世", ""]


def test_incomplete_character_is_held_until_final(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("ok 🎉")
    detok = StreamDetokenizer(byte_level)
    partial = detok.add(ids[:-1])  # the last byte of 🎉 never comes
    assert FFFD not in partial.text and partial.text == "ok "
    assert detok.add([], final=True).text == FFFD  # no more bytes can come: say so


def test_streaming_equals_one_shot_decode_in_random_chunks(byte_level: Tokenizer) -> None:
    ids = byte_level.encode(MIXED_TEXT * 3)
    rng = random.Random(0)
    detok, text, i = StreamDetokenizer(byte_level), "", 0
    while i < len(ids):
        n = rng.randint(0, 5)
        delta = detok.add(ids[i : i + n])
        assert FFFD not in delta.text
        text, i = text + delta.text, i + n
    text += detok.add([], final=True).text
    assert text == byte_level.decode(ids) == MIXED_TEXT * 3


# built once for hypothesis, whose examples cannot take function-scoped fixtures
_TOKENIZERS = (byte_level_tokenizer(), byte_fallback_tokenizer())


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab €世界👋🎉é\n𝄞"), max_size=40))
def test_streaming_equals_decode_for_any_text(text: str) -> None:
    for tok in _TOKENIZERS:
        ids = tok.encode(text)
        deltas = stream_one_by_one(tok, ids)
        assert "".join(deltas) == tok.decode(ids)
        assert all(FFFD not in d for d in deltas)


def test_special_tokens_skipped_or_kept(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("ok<|im_end|>")
    assert "".join(stream_one_by_one(byte_level, ids)) == "ok"
    kept = stream_one_by_one(byte_level, ids, skip_special_tokens=False)
    assert "".join(kept) == "ok<|im_end|>"


def test_prompt_context_keeps_the_first_tokens_leading_space() -> None:
    backend = tokenizers.Tokenizer(
        models.WordLevel({"▁hello": 0, "▁world": 1, "<unk>": 2}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()  # drops the leading space of a decoded text
    tok = Tokenizer(backend, "metaspace")
    prompt, generated = tok.encode("hello"), tok.encode("world")
    # without context the generation is decoded as a text of its own, as one-shot decode does
    assert "".join(stream_one_by_one(tok, generated)) == tok.decode(generated) == "world"
    with_prompt = stream_one_by_one(tok, generated, prompt_token_ids=prompt)
    assert "".join(with_prompt) == " world"  # the prompt itself is never emitted


def test_window_stays_short_over_a_long_generation(byte_level: Tokenizer) -> None:
    detok = IncrementalDetokenizer(byte_level)
    for t in byte_level.encode("hello world " * 200):
        detok.add(t)
    assert len(detok._window) <= 4


# ------------------------------------------------------------------------ stop strings

PIECES = PiecesDecoder(["Hello", " wor", "ld", "<|e", "nd|>", " after", "x", "<|", "end", "|>"])


def run(ids: Sequence[int], stop: Sequence[str], chunk: int = 1) -> tuple[list[str], StreamDelta]:
    """Stream ``ids`` in chunks, then a final message; every delta's text and the last delta."""
    detok = StreamDetokenizer(PIECES, stop=stop)
    deltas = [detok.add(ids[i : i + chunk]).text for i in range(0, len(ids), chunk)]
    last = detok.add([], final=True)
    deltas.append(last.text)
    return deltas, last


def test_stop_string_inside_one_token_truncates_before_it() -> None:
    detok = StreamDetokenizer(PIECES, stop=["wor"])
    delta = detok.add(PIECES.ids("Hello", " wor", "ld"))
    assert (delta.text, delta.stopped, delta.stop_string) == ("Hello ", True, "wor")
    assert delta.num_tokens == 2  # the token that completed the stop; "ld" was ignored


def test_stop_string_spanning_two_tokens() -> None:  # "<|e" + "nd|>"
    detok = StreamDetokenizer(PIECES, stop=["<|end|>"])
    assert detok.add(PIECES.ids("Hello")).text == "Hello"
    held = detok.add(PIECES.ids("<|e"))
    assert held.text == "" and not held.stopped  # could be the start of the stop string
    done = detok.add(PIECES.ids("nd|>", " after"))
    assert (done.text, done.stopped, done.stop_string, done.num_tokens) == (
        "",
        True,
        "<|end|>",
        3,
    )
    assert detok.add(PIECES.ids(" after"), final=True).text == ""  # nothing after a stop


def test_stop_string_spanning_three_tokens() -> None:
    deltas, last = run(PIECES.ids("Hello", "<|", "end", "|>", " after"), ["<|end|>"])
    assert deltas[:4] == ["Hello", "", "", ""]
    assert "".join(deltas) == "Hello"
    assert last.stopped


def test_partial_match_that_diverges_releases_the_held_text() -> None:
    detok = StreamDetokenizer(PIECES, stop=["<|end|>"])
    assert detok.add(PIECES.ids("<|e")).text == ""
    released = detok.add(PIECES.ids("x"))
    assert (released.text, released.stopped) == ("<|ex", False)


def test_partial_match_is_released_at_the_end() -> None:
    deltas, last = run(PIECES.ids("Hello", "<|e"), ["<|end|>"])
    assert deltas == ["Hello", "", "<|e"]
    assert not last.stopped


def test_earliest_stop_string_wins() -> None:
    detok = StreamDetokenizer(PIECES, stop=["ld", "wor"])
    delta = detok.add(PIECES.ids("Hello", " wor", "ld"))
    assert (delta.text, delta.stop_string) == ("Hello ", "wor")


@pytest.mark.parametrize("chunk", [1, 2, 3, 10])
def test_stop_result_does_not_depend_on_chunking(chunk: int) -> None:
    ids = PIECES.ids("Hello", " wor", "ld", "<|e", "nd|>", " after")
    deltas, last = run(ids, ["<|end|>"], chunk)
    assert "".join(deltas) == "Hello world"
    assert last.num_tokens == 5


def test_no_stop_strings_passes_text_through() -> None:
    ids = PIECES.ids("Hello", "<|e", "nd|>")
    deltas, _ = run(ids, [])
    assert deltas == ["Hello", "<|e", "nd|>", ""]


def test_empty_stop_string_is_invalid() -> None:
    with pytest.raises(InvalidRequestError) as e:
        StopStringMatcher(["ok", ""])
    assert e.value.field == "stop[1]"


def test_stop_string_on_multibyte_text(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("ok 世界 👋 after")
    detok = StreamDetokenizer(byte_level, stop=["界 👋"])
    text = ""
    for t in ids:
        delta = detok.add([t])
        assert FFFD not in delta.text
        text += delta.text
        if delta.stopped:
            break
    assert text == "ok 世" and detok.stopped


@pytest.mark.model
def test_default_model_tokenizer_streams_multilingual_text() -> None:
    from pdmesh.models.fetch import ensure_default_model

    tok = Tokenizer.from_dir(Path(ensure_default_model(progress=False)))
    ids = tok.encode(MIXED_TEXT)
    assert any(FFFD in tok.decode([i]) for i in ids)  # SmolLM2 splits these characters
    deltas = stream_one_by_one(tok, ids)
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == MIXED_TEXT
