"""Values the engine hands out: per-step request outputs and load figures."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdmesh.engine.sequence import FinishReason, TokenLogprob


@dataclass
class RequestOutput:
    """What one request produced since its last output (a delta, not the whole text)."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    # set on the last output of a prefill-only request: its pages stay held until release()
    prefill_page_ids: list[int] | None = None


@dataclass(frozen=True)
class EngineLoad:
    num_running: int
    num_waiting: int
    num_awaiting_kv: int  # PD decode side: pages allocated, KV not yet arrived
    num_held: int  # PD prefill side: prefilled pages held for transfer
    num_free_pages: int
    num_total_pages: int
    page_size: int
    prefix_hit_rate: float
    prefix_hit_tokens: int
    num_preemptions: int

    @property
    def page_usage(self) -> float:
        return 1.0 - self.num_free_pages / self.num_total_pages
