"""``Sequence``: all state of one request inside the engine.

Anything derived from state that changes (lengths, page counts) is a property, never a second
counter; what follows from the frozen params alone is computed once (hot loops read it per row
per step).

NOTE: with the overlap schedule (llm_engine.py) the last entry of ``token_ids`` may be a
*placeholder* while the step that samples it is in flight: ``placeholder(j)`` (< 0) stands for
row ``j`` of that step's sampled-token tensor on the device. Lengths and positions count it (the
scheduler and the seeds need only those); the model runner reads its value on the device, and
the engine writes the real token over it when the step resolves. At most one step is in flight,
so a placeholder always refers to the newest one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdmesh.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from llguidance import LLMatcher


def placeholder(row: int) -> int:
    """The stand-in token id for row ``row`` of the in-flight step's sampled tokens."""
    return -1 - row


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
    # the step in flight samples this sequence's last token (max_new_tokens, the context
    # length or prefill-only): it left the scheduler's running list at launch, and keeps its
    # pages until the step resolves (overlap schedule, llm_engine.py)
    final_pending: bool = False
    # set by the engine, which knows the model (one lookup per sampled token each):
    # token ids that end the request (stop ids, and EOS unless ignore_eos), and the length at
    # which it ends (max_new_tokens or the context length, whichever comes first)
    stop_ids: frozenset[int] = frozenset()
    max_num_tokens: int = 2**62
    # greedy with nothing else to do on the logits (no penalties, logit_bias, grammar, logprobs
    # or min_new_tokens): a batch of only such rows samples with one argmax (sampler.py)
    plain_greedy: bool = field(init=False)
    # its next step needs its last token on the host (penalties count it, a grammar's mask
    # follows it): with the overlap, that step's sampling waits for the step before to resolve
    needs_host_tokens: bool = field(init=False)
    # constrained decoding: the grammar's matcher, advanced with every token this sequence
    # gets (sampled here or, PD, by the prefill; replayed for a migrated request), never
    # re-advanced by a recompute after preemption (that recomputes KV, not tokens)
    grammar: LLMatcher | None = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        p = self.params
        self.plain_greedy = (
            p.greedy
            and not p.has_penalties
            and not p.logprobs
            and not p.top_logprobs
            and not p.min_new_tokens
            and not p.logit_bias
            and p.constraint is None
        )
        self.needs_host_tokens = p.has_penalties or p.constraint is not None

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
