"""Per-request sampling parameters with validation that names the offending field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdmesh.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    # 0 means greedy. Defaults follow the OpenAI API (temperature 1, top_p 1).
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style: divides positive logits of seen tokens
    frequency_penalty: float = 0.0  # OpenAI-style: subtracts count × penalty (output tokens)
    presence_penalty: float = 0.0  # OpenAI-style: subtracts penalty once per seen output token
    seed: int | None = None  # same seed → same output, independent of batch neighbours
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False  # return the sampled token's logprob
    top_logprobs: int = 0  # also return the N most likely tokens at each step

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``InvalidRequestError`` naming the first bad field."""
        _check(_finite(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(self.top_k >= -1, "top_k", "must be -1, 0 (disabled) or a positive integer")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        _check(
            _finite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "must be > 0",
        )
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            _check(_finite(v) and -2 <= v <= 2, name, "must be in [-2, 2]")
        _check(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")
        _check(self.min_new_tokens >= 0, "min_new_tokens", "must be >= 0")
        _check(
            self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            "must be <= max_new_tokens",
        )
        _check(0 <= self.top_logprobs <= 20, "top_logprobs", "must be in [0, 20]")
        if self.seed is not None:
            _check(0 <= self.seed < 2**64, "seed", "must be in [0, 2^64)")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            _check(not bad, "stop_token_ids", f"ids {bad[:5]} are outside [0, {vocab_size})")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"sampling_params.{name}", message)
