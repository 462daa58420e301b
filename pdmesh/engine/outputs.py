"""Values the engine hands out: per-step request outputs, load figures and the KV layout."""

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


PAGE_MAJOR = "page_major"


@dataclass(frozen=True)
class KVLayout:
    """Where every KV page lives, for a transfer engine that writes raw bytes.

    The cache is one contiguous buffer ``[num_pages, num_layers, 2, page_size, kv_heads,
    head_dim]`` (page-major): page ``p`` with every layer's K and V is the ``page_bytes`` starting
    at ``base_ptr + p * page_bytes``, and consecutive pages are consecutive bytes.
    """

    base_ptr: int
    total_bytes: int
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    device: str
    # the dimension order above; a peer that lays its cache out otherwise is incompatible
    order: str = PAGE_MAJOR

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: every layer, K and V."""
        return self.total_bytes // self.num_pages

    def page_addr(self, page: int) -> int:
        return self.base_ptr + page * self.page_bytes

    def compatibility_errors(self, other: KVLayout) -> list[str]:
        """Mismatches that make a page of ``other`` unreadable as a page of ``self``."""
        fields = ("order", "page_size", "dtype", "num_layers", "num_kv_heads", "head_dim")
        return [
            f"{f}: {_shown(getattr(self, f))} != {_shown(getattr(other, f))}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]


def _shown(value: object) -> object:
    # a peer from before a field existed sends its zero value: say so rather than print nothing
    return value if value not in ("", 0) else "(not set)"
