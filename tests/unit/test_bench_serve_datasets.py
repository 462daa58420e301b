"""``bench serve`` datasets: random lengths, the shared-prefix structure, ShareGPT parsing.

Tokenizers are built in the test (a word-level one that round-trips exactly, and a tiny
byte-level BPE trained here whose decoded random ids re-encode differently), so no model and
no network are needed.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import (
    PREFIX_SEPARATOR,
    BenchRequest,
    build_dataset,
    first_exchange,
    random_requests,
    sample_lengths,
    shared_prefix_requests,
    sharegpt_requests,
)
from benchmarks.serve.tokenizer import BenchTokenizer

VOCAB_WORDS = 200
EOS_ID = VOCAB_WORDS  # the added special token comes right after the words


def word_tokenizer() -> BenchTokenizer:
    """Words w1..w199 split on whitespace, plus a special <eos>: decode/encode round-trips."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB_WORDS)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>"])
    return BenchTokenizer(tok)


def bpe_tokenizer() -> BenchTokenizer:
    """A byte-level BPE: random ids decode to text that re-encodes to another count."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    r = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "hello", "world", "token", "stream"]
    tok.train_from_iterator([" ".join(r.choices(words, k=30)) for _ in range(300)], trainer)
    return BenchTokenizer(tok)


@pytest.fixture(scope="module")
def wtok() -> BenchTokenizer:
    return word_tokenizer()


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------ random


def test_sample_lengths_stay_in_range_and_cover_it() -> None:
    lens = sample_lengths(rng(), 2000, 100, 0.5)
    assert min(lens) >= 50 and max(lens) <= 100
    assert min(lens) == 50 and max(lens) == 100  # both ends are reachable
    assert abs(np.mean(lens) - 75) < 2  # uniform: mean in the middle


def test_sample_lengths_ratio_zero_is_exact_and_one_starts_at_one() -> None:
    assert set(sample_lengths(rng(), 50, 37, 0.0)) == {37}
    lens = sample_lengths(rng(), 3000, 10, 1.0)
    assert min(lens) == 1 and max(lens) == 10


@pytest.mark.parametrize("as_ids", [True, False])
def test_random_requests_lengths_within_range(wtok: BenchTokenizer, as_ids: bool) -> None:
    reqs = random_requests(wtok, rng(), 200, 64, 32, 0.25, as_ids)
    assert len(reqs) == 200
    assert [r.index for r in reqs] == list(range(200))
    for r in reqs:
        assert 48 <= r.prompt_len <= 64
        assert 24 <= r.output_len <= 32
        ids = r.prompt if isinstance(r.prompt, list) else wtok.encode(r.prompt)
        assert len(ids) == r.prompt_len
        assert isinstance(r.prompt, list) == as_ids
    assert len({r.prompt_len for r in reqs}) > 5  # lengths really vary


def test_random_prompts_never_contain_special_tokens(wtok: BenchTokenizer) -> None:
    reqs = random_requests(wtok, rng(), 100, 50, 8, 0.0, True)
    ids = {i for r in reqs for i in r.prompt}  # type: ignore[union-attr]
    assert EOS_ID not in ids
    assert ids <= set(range(VOCAB_WORDS))


def test_text_prompts_are_fitted_to_the_drawn_length_despite_bpe_merges() -> None:
    tok = bpe_tokenizer()
    g = rng(3)
    # the premise: decoded random ids usually re-encode to another count
    drifted = 0
    for _ in range(20):
        ids = [int(x) for x in g.choice(tok.sampleable_ids(), size=40)]
        drifted += len(tok.encode(tok.decode(ids))) != 40
    assert drifted > 0
    pieces = [tok.decode([int(i)]) for i in tok.sampleable_ids()]
    assert all("\ufffd" not in p for p in pieces)  # no halves of multi-byte characters
    reqs = random_requests(tok, rng(4), 30, 40, 4, 0.0, False)
    assert [len(tok.encode(r.prompt)) for r in reqs] == [40] * 30  # type: ignore[arg-type]
    assert all(r.prompt_len == 40 for r in reqs)


def test_random_requests_depend_on_the_seed_only(wtok: BenchTokenizer) -> None:
    def make(seed: int) -> list[BenchRequest]:
        cfg = ServeBenchConfig(
            num_prompts=20, random_input_len=30, random_range_ratio=0.5, seed=seed
        )
        return build_dataset(cfg, wtok)

    assert make(7) == make(7)
    assert make(7) != make(8)


# ----------------------------------------------------------------------------- shared-prefix


@pytest.mark.parametrize("as_ids", [True, False])
def test_shared_prefix_structure(wtok: BenchTokenizer, as_ids: bool) -> None:
    groups, per_group, sys_len, q_len = 4, 6, 40, 8
    reqs = shared_prefix_requests(wtok, rng(), groups, per_group, sys_len, q_len, 16, as_ids)
    assert len(reqs) == groups * per_group
    assert [r.index for r in reqs] == list(range(len(reqs)))
    by_group: dict[int, list[BenchRequest]] = defaultdict(list)
    for r in reqs:
        assert r.group is not None
        by_group[r.group].append(r)
        assert r.output_len == 16
        assert r.prompt_len == sys_len + q_len
    assert sorted(by_group) == list(range(groups))
    assert all(len(v) == per_group for v in by_group.values())
    prefixes = [v[0].prefix for v in by_group.values()]
    for members in by_group.values():  # one system prompt per group ...
        assert all(m.prefix == members[0].prefix for m in members)
        assert len({str(m.prompt) for m in members}) == per_group  # ... and distinct questions
    assert len({str(p) for p in prefixes}) == groups  # distinct system prompts
    # tenants interleave instead of arriving group after group
    assert [r.group for r in reqs] != sorted(r.group for r in reqs)  # type: ignore[type-var]


def test_shared_prefix_prompt_forms(wtok: BenchTokenizer) -> None:
    text = shared_prefix_requests(wtok, rng(), 2, 2, 10, 5, 4, False)[0]
    assert isinstance(text.prefix, str) and isinstance(text.prompt, str)
    assert text.full_prompt() == text.prefix + PREFIX_SEPARATOR + text.prompt
    assert text.messages() == [
        {"role": "system", "content": text.prefix},
        {"role": "user", "content": text.prompt},
    ]
    ids = shared_prefix_requests(wtok, rng(), 2, 2, 10, 5, 4, True)[0]
    assert ids.full_prompt() == ids.prefix + ids.prompt  # type: ignore[operator]
    with pytest.raises(TypeError):
        ids.messages()


# ---------------------------------------------------------------------------------- sharegpt


def conv(*turns: tuple[str, str]) -> dict[str, object]:
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


def words(n: int, start: int = 1) -> str:
    return " ".join(f"w{start + i % 50}" for i in range(n))


def test_first_exchange_takes_the_first_human_turn_and_the_answer_after_it() -> None:
    entry = conv(
        ("system", "be brief"),
        ("gpt", "hi"),
        ("human", "q1"),
        ("gpt", "a1"),
        ("human", "q2"),
        ("gpt", "a2"),
    )
    assert first_exchange(entry) == ("q1", "a1")
    assert first_exchange(conv(("human", "only a question"))) is None
    assert first_exchange({"conversations": "nope"}) is None
    assert first_exchange(["not", "a", "dict"]) is None
    assert first_exchange(
        {"conversations": [{"from": "user", "value": "u"}, {"from": "assistant", "value": "a"}]}
    ) == ("u", "a")


@pytest.fixture()
def sharegpt_file(tmp_path: Path) -> Path:
    data = [
        conv(("human", words(5)), ("gpt", words(7))),  # ok
        conv(("human", words(3, 10)), ("gpt", words(4, 10)), ("human", "x"), ("gpt", "y")),  # ok
        conv(("human", words(6, 20))),  # no answer: skipped
        conv(("human", "w1"), ("gpt", words(5))),  # prompt too short: skipped
        conv(("human", words(4)), ("gpt", "w2")),  # answer too short: skipped
        conv(("human", words(30)), ("gpt", words(5))),  # prompt over the limit: skipped
        conv(("human", words(8)), ("gpt", words(20))),  # total over the limit: skipped
        {"id": "broken"},
        conv(("human", words(9, 30)), ("gpt", words(2, 30))),  # ok
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_parsing_and_filters(wtok: BenchTokenizer, sharegpt_file: Path) -> None:
    reqs = sharegpt_requests(sharegpt_file, wtok, rng(), 100, False, 0, 20, 25)
    got = sorted((r.prompt_len, r.output_len) for r in reqs)
    assert got == [(3, 4), (5, 7), (9, 2)]  # the first exchanges that pass the filters
    for r in reqs:
        assert isinstance(r.prompt, str) and len(wtok.encode(r.prompt)) == r.prompt_len
    assert [r.index for r in reqs] == [0, 1, 2]


def test_sharegpt_limit_order_fixed_output_and_ids(
    wtok: BenchTokenizer, sharegpt_file: Path
) -> None:
    two = sharegpt_requests(
        sharegpt_file,
        wtok,
        rng(1),
        2,
        True,
        fixed_output_len=11,
        max_prompt_len=20,
        max_total_len=0,
    )
    assert len(two) == 2
    assert all(r.output_len == 11 and isinstance(r.prompt, list) for r in two)
    again = sharegpt_requests(sharegpt_file, wtok, rng(1), 2, True, 11, 20, 0)
    assert two == again  # the seed fixes which conversations and their order


def test_sharegpt_bad_files(wtok: BenchTokenizer, tmp_path: Path) -> None:
    not_list = tmp_path / "a.json"
    not_list.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="JSON list"):
        sharegpt_requests(not_list, wtok, rng(), 5, False)
    unusable = tmp_path / "b.json"
    unusable.write_text(json.dumps([conv(("human", "w1"), ("gpt", "w2"))]))
    with pytest.raises(ValueError, match="length filters"):
        sharegpt_requests(unusable, wtok, rng(), 5, False)
    with pytest.raises(ValueError, match="cannot read"):
        sharegpt_requests(tmp_path / "missing.json", wtok, rng(), 5, False)
