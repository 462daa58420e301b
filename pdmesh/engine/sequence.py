"""``Sequence``: all state of one request inside the engine.

Anything derived (lengths, page counts) is a property, never a second counter.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pdmesh.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for pages / a prefill slot
    AWAITING_KV = "awaiting_kv"  # pages allocated, filled by another process (PD decode side)
    RUNNING = "running"  # prefilling (in chunks) or decoding
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_new_tokens or the context length
    ABORT = "abort"  # aborted by the caller
    ERROR = "error"  # failed inside the engine


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    # the N most likely tokens at this step, most likely first (empty unless top_logprobs > 0)
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    # tokens whose KV is in this sequence's pages (prefix-cache hits count)
    num_computed_tokens: int = 0
    # tokens of the prompt served from the prefix cache at (the last) admission
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # prefill-only requests (PD prefill side) stop after the first token and keep their pages
    prefill_only: bool = False
    # times this sequence lost its pages to preemption and was recomputed
    num_preemptions: int = 0
    arrival_order: int = 0

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        # more than the one newest token still lacks KV: a (chunked) prefill step is due
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
