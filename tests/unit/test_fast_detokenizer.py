"""``FastDetokenizer`` (DecodeStream, Rust) against ``StreamDetokenizer`` (the Python window
algorithm the tokenizer service runs): the same ``StreamDelta`` for every ``add``, on the real
tokenizer of the default model (SmolLM2, byte-level BPE: an emoji is 2-4 tokens).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models

from pdmesh.tokenizer import StreamDelta, StreamDetokenizer, Tokenizer
from pdmesh.tokenizer.fast_detokenizer import FastDetokenizer

pytestmark = pytest.mark.model

FFFD = "\ufffd"
MIXED_TEXT = "hi 👋 世界, naïve café — 🎉🎉 ok 日本語 𝄞 done 👨‍👩‍👧 한국어"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from pdmesh.models.fetch import ensure_default_model

    return Path(ensure_default_model(progress=False))


@pytest.fixture(scope="module")
def old(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def both(
    old: Tokenizer,
    backend: tokenizers.Tokenizer,
    chunks: Sequence[Sequence[int]],
    final: bool = True,
    skip_special_tokens: bool = True,
    stop: Sequence[str] = (),
    prompt: Sequence[int] = (),
) -> list[StreamDelta]:
    """Feed ``chunks`` (the last one ``final``) to both; assert every delta is equal; return
    the new one's. Stops feeding after a stop, as the router does."""
    ref = StreamDetokenizer(old, skip_special_tokens, stop, prompt)
    new = FastDetokenizer(backend, skip_special_tokens, stop, prompt)
    deltas = []
    for i, chunk in enumerate(chunks):
        last = final and i == len(chunks) - 1
        expected, got = ref.add(chunk, last), new.add(chunk, last)
        assert got == expected, (i, chunk, chunks, prompt, stop)
        deltas.append(got)
        if got.stopped:
            assert new.stopped
            break
    return deltas


def text_of(deltas: Sequence[StreamDelta]) -> str:
    return "".join(d.text for d in deltas)


def one_by_one(ids: Sequence[int]) -> list[list[int]]:
    return [[t] for t in ids]


def random_chunks(rng: random.Random, ids: Sequence[int]) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(0, 5)  # empty chunks too: a worker message may carry no token
        chunks.append(list(ids[i : i + n]))
        i += n
    return chunks or [[]]


def test_random_sequences_of_the_real_vocabulary(
    old: Tokenizer, backend: tokenizers.Tokenizer
) -> None:
    rng = random.Random(14)
    vocab = backend.get_vocab_size(with_added_tokens=True)
    # byte tokens that are pieces of multi-byte characters, and special tokens
    pieces = [t for t in range(vocab) if FFFD in backend.decode([t])]
    assert len(pieces) > 50
    specials = list(range(17))
    for _ in range(600):

        def draw() -> int:
            r = rng.random()
            pool = pieces if r < 0.3 else specials if r < 0.4 else range(vocab)
            return rng.choice(pool)

        ids = [draw() for _ in range(rng.randint(0, 40))]
        prompt = [draw() for _ in range(rng.randint(0, 8))]
        skip = rng.random() < 0.5
        final = rng.random() < 0.8
        deltas = both(old, backend, random_chunks(rng, ids), final, skip, prompt=prompt)
        if final and prompt == [] and ids:
            assert text_of(deltas) == backend.decode(ids, skip_special_tokens=skip)


def test_multibyte_characters_split_across_tokens(
    old: Tokenizer, backend: tokenizers.Tokenizer
) -> None:
    ids = backend.encode(MIXED_TEXT).ids
    assert any(FFFD in backend.decode([t]) for t in ids)  # SmolLM2 splits these characters
    deltas = both(old, backend, one_by_one(ids))
    assert all(FFFD not in d.text for d in deltas)
    assert text_of(deltas) == MIXED_TEXT
    assert any(d.text == "" for d in deltas)  # held back while a character was incomplete
    assert deltas[-1].num_tokens == len(ids)
    rng = random.Random(3)
    for _ in range(50):
        assert text_of(both(old, backend, random_chunks(rng, ids))) == MIXED_TEXT


def test_final_with_an_incomplete_character_is_u_fffd(
    old: Tokenizer, backend: tokenizers.Tokenizer
) -> None:
    ids = backend.encode("ok 🎉").ids
    cut = ids[:-1]  # 🎉 without its last byte token
    held = both(old, backend, [cut], final=False)
    assert FFFD not in text_of(held)
    assert text_of(both(old, backend, [cut])) == "ok " + FFFD
    assert text_of(both(old, backend, [cut, []])) == "ok " + FFFD  # flushed by an empty final


def test_stop_strings_that_span_tokens(old: Tokenizer, backend: tokenizers.Tokenizer) -> None:
    ids = backend.encode(MIXED_TEXT).ids
    for stop in ("世界", "界,", "🎉🎉", "naïve café", "ok 日", "done 👨", "no such text"):
        deltas = both(old, backend, one_by_one(ids), stop=(stop, "zz-never"))
        assert all(stop not in d.text for d in deltas)
        if stop in MIXED_TEXT:
            last = deltas[-1]
            assert last.stopped and last.stop_string == stop
            assert text_of(deltas) == MIXED_TEXT[: MIXED_TEXT.index(stop)]
            # num_tokens ends at the token that completed the stop string
            assert stop in backend.decode(ids[: last.num_tokens])
            assert stop not in backend.decode(ids[: last.num_tokens - 1])
        else:
            assert text_of(deltas) == MIXED_TEXT and not deltas[-1].stopped
    rng = random.Random(7)
    texts = [backend.decode(ids[: rng.randint(1, len(ids))]) for _ in range(200)]
    for text in texts:  # random stops, random chunks: a stop may land anywhere in a chunk
        start = rng.randrange(len(text))
        stop = text[start : start + rng.randint(1, 8)]
        both(old, backend, random_chunks(rng, ids), stop=(stop,))


def test_a_stop_string_held_back_is_released_on_final(
    old: Tokenizer, backend: tokenizers.Tokenizer
) -> None:
    ids = backend.encode("the end").ids
    deltas = both(old, backend, one_by_one(ids), stop=("end!",))
    assert text_of(deltas) == "the end" and not deltas[-1].stopped
    assert deltas[-1].text.endswith("end")  # held back until final: "end!" could still come


def test_special_tokens_with_skip_on_and_off(old: Tokenizer, backend: tokenizers.Tokenizer) -> None:
    text = f"{IM_START}assistant\nHi 👋{IM_END}"
    ids = backend.encode(text).ids
    assert backend.token_to_id(IM_END) in ids
    skipped = both(old, backend, one_by_one(ids), skip_special_tokens=True)
    assert text_of(skipped) == "assistant\nHi 👋"
    kept = both(old, backend, one_by_one(ids), skip_special_tokens=False)
    assert text_of(kept) == text
    # a special token's text can be a stop string, when special tokens are kept
    stopped = both(old, backend, one_by_one(ids), skip_special_tokens=False, stop=(IM_END,))
    assert stopped[-1].stopped and text_of(stopped) == f"{IM_START}assistant\nHi 👋"


def test_prompt_tail_is_left_context(old: Tokenizer, backend: tokenizers.Tokenizer) -> None:
    prompt, generated = backend.encode("Say").ids, backend.encode(" hi there").ids
    assert text_of(both(old, backend, one_by_one(generated), prompt=prompt)) == " hi there"
    chat = backend.encode(f"{IM_START}user\nhello{IM_END}\n{IM_START}assistant\n").ids
    assert text_of(both(old, backend, [generated], prompt=chat)) == " hi there"


def test_a_prompt_that_ends_inside_a_character(
    old: Tokenizer, backend: tokenizers.Tokenizer
) -> None:
    """The corner DecodeStream differs in (see the module's NOTE): the old text, exactly."""
    ids = backend.encode("ok 👋 go 🎉").ids
    for cut in range(1, len(ids)):
        prompt, generated = ids[:cut], ids[cut:]
        both(old, backend, one_by_one(generated), prompt=prompt)
        both(old, backend, [generated], prompt=prompt)
        both(old, backend, [generated[:1]], prompt=prompt)  # final right after the cut


def test_a_decoder_that_rewrites_across_tokens_falls_back_mid_stream() -> None:
    """DecodeStream raises "Invalid prefix" when new ids change earlier text; the stream then
    goes on with the old algorithm, from the same state, and the text stays the old one."""
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3, "d": 4}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "XYZ")])
    old = Tokenizer(backend, "rewriting")
    for ids in ([3, 1, 2, 4, 1, 2, 3], [1, 2], [1, 1, 2, 2, 1, 2, 1]):
        for chunks in (one_by_one(ids), [ids], [ids[:2], ids[2:]]):
            both(old, backend, chunks)
            both(old, backend, chunks, stop=("Zd",))


def test_after_a_stop_nothing_more_comes(old: Tokenizer, backend: tokenizers.Tokenizer) -> None:
    ids = backend.encode("one two three four").ids
    new = FastDetokenizer(backend, stop=("two",))
    first = new.add(ids)
    assert first.stopped and first.text == "one " and first.stop_string == "two"
    later = new.add(ids, final=True)
    assert later == StreamDelta("", True, "two", first.num_tokens)
