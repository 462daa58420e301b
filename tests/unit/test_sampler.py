from __future__ import annotations

import pytest
import torch

from pdmesh.engine.sampler import Sampler, SampleRow
from pdmesh.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def row(
    prompt: list[int] | None = None, output: list[int] | None = None, **kw: object
) -> SampleRow:
    prompt = prompt or [0]
    return SampleRow(SamplingParams(**kw), prompt + (output or []), len(prompt))  # type: ignore[arg-type]


def logits_of(values: dict[int, float], vocab: int = 10) -> torch.Tensor:
    x = torch.full((1, vocab), -10.0)
    for i, v in values.items():
        x[0, i] = v
    return x


def test_greedy_takes_argmax() -> None:
    tokens, lps = Sampler(CPU)(logits_of({3: 5.0, 4: 4.0}), [row(temperature=0)])
    assert tokens == [3] and lps == [None]


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"frequency_penalty": 0.6}, 4),  # 3 seen twice: 5 - 1.2 < 4
        ({"frequency_penalty": 0.4}, 3),  # 5 - 0.8 > 4
        ({"presence_penalty": 1.5}, 4),  # once per seen token: 5 - 1.5 < 4
        ({"repetition_penalty": 1.5}, 4),  # positive logit divided: 5 / 1.5 < 4
        ({"repetition_penalty": 1.1}, 3),  # 5 / 1.1 > 4
    ],
)
def test_penalties_move_the_greedy_choice(kw: dict[str, float], expected: int) -> None:
    r = row(output=[3, 3], temperature=0, **kw)
    tokens, _ = Sampler(CPU)(logits_of({3: 5.0, 4: 4.0}), [r])
    assert tokens == [expected]


def test_repetition_penalty_covers_the_prompt() -> None:
    r = row(prompt=[3], temperature=0, repetition_penalty=2.0)
    assert Sampler(CPU)(logits_of({3: 5.0, 4: 4.0}), [r])[0] == [4]


def test_top_k_top_p_min_p_restrict_the_support() -> None:
    logits = logits_of({0: 3.0, 1: 2.9, 2: 2.8, 3: 0.0}, vocab=4)
    s = Sampler(CPU, seed=0)
    cases = [
        ({"top_k": 1}, {0}),
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.3}, {0}),  # p(0) ≈ 0.36 already covers 0.3
    ]
    for kw, allowed in cases:
        seen = {s(logits, [row(temperature=1.0, **kw)])[0][0] for _ in range(200)}
        assert seen == allowed, kw
    # p(1)/p(0) ≈ 0.905 and p(2)/p(0) ≈ 0.82: min_p 0.85 keeps only 0 and 1
    seen = {s(logits, [row(temperature=1.0, min_p=0.85)])[0][0] for _ in range(300)}
    assert seen == {0, 1}


def test_temperature_sampling_visits_every_likely_token() -> None:
    logits = logits_of({0: 1.0, 1: 1.0, 2: 1.0}, vocab=3)
    s = Sampler(CPU, seed=0)
    seen = {s(logits, [row(temperature=1.0)])[0][0] for _ in range(200)}
    assert seen == {0, 1, 2}


def test_seed_is_reproducible_and_independent_of_neighbours() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    seeded = row(prompt=[1, 2], output=[5], temperature=1.0, seed=7)
    a = Sampler(CPU, seed=0)(logits[:1], [seeded])[0]
    batch = torch.cat([logits[1:2], logits[0:1], logits[2:3]])  # the seeded row in the middle
    b = Sampler(CPU, seed=123)(batch, [row(temperature=1.0), seeded, row(temperature=0)])[0]
    assert a[0] == b[1]
    draws = {Sampler(CPU)(logits[:1], [row(temperature=1.0, seed=s)])[0][0] for s in range(40)}
    assert len(draws) > 5


def test_logprobs_are_log_softmax_of_the_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    _, (lp,) = Sampler(CPU)(logits, [row(temperature=0, logprobs=True, top_logprobs=2)])
    assert lp is not None
    ref = logits.log_softmax(-1)[0]
    assert lp.token_id == 0 and lp.logprob == pytest.approx(ref[0].item())
    assert [t for t, _ in lp.top] == [0, 1]
    assert lp.top[1][1] == pytest.approx(ref[1].item())
