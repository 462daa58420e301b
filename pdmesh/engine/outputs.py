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


@dataclass(frozen=True)
class KVLayout:
    """Where every KV page lives, for a transfer engine that writes raw bytes.

    The cache is one contiguous buffer ``[num_layers, 2, num_pages, page_size, kv_heads,
    head_dim]``: the K (kind 0) or V (kind 1) page ``p`` of layer ``l`` starts at
    ``base_ptr + ((l * 2 + kind) * num_pages + p) * page_bytes`` and is ``page_bytes`` long.
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

    @property
    def page_bytes(self) -> int:
        return self.total_bytes // (self.num_layers * 2 * self.num_pages)

    def page_addr(self, layer: int, kind: int, page: int) -> int:
        return self.base_ptr + ((layer * 2 + kind) * self.num_pages + page) * self.page_bytes

    def compatibility_errors(self, other: KVLayout) -> list[str]:
        """Mismatches that make a page of ``other`` unreadable as a page of ``self``."""
        fields = ("page_size", "dtype", "num_layers", "num_kv_heads", "head_dim")
        return [
            f"{f}: {getattr(self, f)} != {getattr(other, f)}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]
