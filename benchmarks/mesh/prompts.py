"""The prompts of every arm: ``benchmarks.serve``'s random dataset, ``--prompt-len`` ordinary
tokens each, drawn per concurrency level from ``--seed``: the token-id arms of a level send the
same ids, the text arms the same texts (decoded ids, refitted to the length)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from benchmarks.mesh.arms import Arm
from benchmarks.mesh.config import MeshBenchConfig
from benchmarks.serve.datasets import BenchRequest, random_requests
from benchmarks.serve.tokenizer import BenchTokenizer, TokenizerLike
from pdmesh.models.source import ModelSource, resolve


class IdsOnly:
    """For a model without tokenizer files (random weights): token-id prompts only."""

    def __init__(self, source: ModelSource) -> None:
        eos = set(source.config.eos_token_ids)
        # ids below 16 are left out, as the offline benchmark's prompts do: special tokens
        self._ids = np.array(
            [i for i in range(16, source.config.vocab_size) if i not in eos], dtype=np.int64
        )

    def encode(self, text: str) -> list[int]:
        raise TypeError(f"no tokenizer to encode text with: {text[:20]!r}")

    def decode(self, ids: Sequence[int]) -> str:
        raise TypeError("no tokenizer to decode ids with")

    def sampleable_ids(self) -> npt.NDArray[np.int64]:
        return self._ids


def load_tokenizer(model: str) -> TokenizerLike:
    source = resolve(model)
    if source.path is None:
        return IdsOnly(source)
    return BenchTokenizer.from_path(source.path)


def prompt_pool(
    tokenizer: TokenizerLike, arm: Arm, cfg: MeshBenchConfig, concurrency: int
) -> list[BenchRequest]:
    """The prompts ``arm`` sends at ``concurrency`` (the same draws for every arm)."""
    rng = np.random.default_rng([cfg.seed, concurrency])
    return random_requests(
        tokenizer,
        rng,
        cfg.requests_for(concurrency),
        cfg.prompt_len,
        cfg.output_len,
        0.0,
        arm.token_ids,
    )
