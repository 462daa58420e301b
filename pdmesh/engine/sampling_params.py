"""Per-request sampling parameters with validation that names the offending field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdmesh.errors import InvalidRequestError

# the fields that carry a grammar (pdmesh/engine/grammar.py)
CONSTRAINT_FIELDS = ("json_schema", "regex", "ebnf")


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
    # None: the engine's --default-max-tokens (0 there: up to the context length, OpenAI's and
    # vLLM's default for a request that sets no max_tokens)
    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: bool = False  # return the sampled token's logprob
    top_logprobs: int = 0  # also return the N most likely tokens at each step
    # constrained decoding (SGLang's names; at most one is set): the output must match a JSON
    # schema (JSON text), a regular expression, or an EBNF grammar (llama.cpp's GBNF or Lark)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias: -100
    # bans a token, +100 all but forces it), each id at most once
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    # a migrated request: the last N prompt tokens are output the client already has, so a
    # grammar's matcher replays them before the first new token (the router's _migrate sets it)
    resumed_output_tokens: int = 0

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

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(field name, text) of the grammar the output must match, if any."""
        for name in CONSTRAINT_FIELDS:
            text = getattr(self, name)
            if text is not None:
                return name, text
        return None

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
        _check(
            self.max_new_tokens is None or self.max_new_tokens >= 0,
            "max_new_tokens",
            "must be >= 0",
        )
        _check(self.min_new_tokens >= 0, "min_new_tokens", "must be >= 0")
        _check(
            self.max_new_tokens is None or self.min_new_tokens <= self.max_new_tokens,
            "min_new_tokens",
            "must be <= max_new_tokens",
        )
        _check(0 <= self.top_logprobs <= 20, "top_logprobs", "must be in [0, 20]")
        if self.seed is not None:
            _check(0 <= self.seed < 2**64, "seed", "must be in [0, 2^64)")
        if self.resumed_output_tokens < 0:  # a GenerateRequest field on the wire, not a param
            raise InvalidRequestError("resumed_output_tokens", "must be >= 0")
        chosen = [name for name in CONSTRAINT_FIELDS if getattr(self, name) is not None]
        _check(
            len(chosen) <= 1,
            chosen[-1] if chosen else "",
            f"at most one of {', '.join(CONSTRAINT_FIELDS)} may be set (got {', '.join(chosen)})",
        )
        ids = [t for t, _ in self.logit_bias]
        _check(len(set(ids)) == len(ids), "logit_bias", "a token id appears more than once")
        bad_bias = [(t, b) for t, b in self.logit_bias if not (_finite(b) and -100 <= b <= 100)]
        _check(not bad_bias, "logit_bias", f"biases {bad_bias[:5]} are outside [-100, 100]")
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            _check(not bad, "stop_token_ids", f"ids {bad[:5]} are outside [0, {vocab_size})")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            _check(not bad, "logit_bias", f"ids {bad[:5]} are outside [0, {vocab_size})")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"sampling_params.{name}", message)
