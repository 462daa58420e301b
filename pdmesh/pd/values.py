"""Values of the PD protocol that both sides share (no proto, no engine state)."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.engine.sequence import TokenLogprob


@dataclass(frozen=True)
class FirstToken:
    """What a prefill hands a decode once the room's KV is in the decode's pages."""

    token_id: int
    logprob: TokenLogprob | None
    num_cached_tokens: int  # prompt tokens the prefill took from its prefix cache
    num_bytes: int = 0  # KV bytes written
    seconds: float = 0.0  # time the write took


class Writing:
    """Event of a Transfer: the prefill started writing into the decode's pages."""

    def __repr__(self) -> str:
        return "WRITING"


WRITING = Writing()


@dataclass(frozen=True)
class RemotePrefill:
    """Decode side: where a disaggregated request's prompt is prefilled."""

    bootstrap_address: str  # host:port of the prefill's BootstrapService
    room: int
    prefill_id: str = ""  # the router's id of the prefill worker

    @property
    def label(self) -> str:
        """How messages name the prefill."""
        if not self.prefill_id or self.prefill_id == self.bootstrap_address:
            return f"prefill {self.bootstrap_address}"
        return f"prefill {self.prefill_id} (bootstrap {self.bootstrap_address})"
