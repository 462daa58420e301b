"""``SteppingEngine``: a model-free stand-in for ``LLMEngine`` behind the real worker servicer, a
benchmark instrument for the token path (not a mock: every request is served, validated and
counted as the engine would, only the tokens cost no compute).

``step()`` waits for the next ``step_ms`` boundary of a fixed grid and gives every active request
one token, so a mesh in front of it should deliver ``active requests / step_ms`` tokens per
second; whatever it delivers less is the path's cost. A step that starts late (the worker's
own threads were busy) waits for the next boundary, as a GPU step that a busy host launched late
would: late steps show up as lost throughput, never as steps squeezed together.

It has the attributes and methods of ``LLMEngine`` that ``AsyncEngine``, the worker servicer,
``services.worker.convert`` and the SGLang servicer use; the PD hooks refuse (the stepping
worker runs aggregated). The token ids are ordinary words of the model's vocabulary
(``words``), drawn deterministically from the prompt: the same prompt gets the same answer.
"""

from __future__ import annotations

import logging
import time
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from benchmarks.mesh.words import word_token_ids
from pdmesh.config import flag
from pdmesh.engine import (
    EngineConfig,
    EngineLoad,
    FinishReason,
    InvalidRequestError,
    KVLayout,
    RequestOutput,
    ResourceExhaustedError,
    SamplingParams,
    TokenLogprob,
)
from pdmesh.errors import FailedPreconditionError
from pdmesh.models.source import DEFAULT_MODEL, ModelSource, resolve

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_MAX_DEFAULT_CONTEXT = 32768  # as LLMEngine: the model's context, capped
# stride between a request's consecutive word ids: a prime, so a request walks the whole list
_STRIDE = 7919
# the logprob every emitted token reports, and how much less likely each listed alternative is
_LOGPROB = -0.5
_TOP_STEP = 1.0


@dataclass(frozen=True)
class SteppingEngineConfig:
    """The stepping engine's knobs, each a ``--flag`` of ``python -m
    benchmarks.mesh.stepping_worker``."""

    model: str = flag(
        DEFAULT_MODEL,
        "model whose vocabulary, context length, EOS ids and name the worker reports (no weights "
        "are loaded): 'smollm2-135m-instruct', a local Hugging Face dir or 'random:<preset>'",
    )
    step_ms: float = flag(
        10.0, "length of one engine step: every active request gets one token per step"
    )
    max_running_requests: int = flag(
        1024,
        "most requests active at once; more are refused with RESOURCE_EXHAUSTED (reported to "
        "SGLang clients as the worker's max_running_requests)",
    )
    page_size: int = flag(16, "tokens per (virtual) KV page, for GetModelInfo and GetLoad")
    num_pages: int = flag(
        0,
        "virtual KV pages that GetLoad counts requests against; 0 = enough for "
        "--max-running-requests full contexts (nothing is allocated either way)",
    )
    max_model_len: int = flag(0, "context length; 0 = the model's, capped at 32768")

    def __post_init__(self) -> None:
        if not self.step_ms > 0:
            raise ValueError(f"--step-ms={self.step_ms} must be > 0")
        for name in ("max_running_requests", "page_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        for name in ("num_pages", "max_model_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 0")


@dataclass(eq=False)
class _Request:
    request_id: str
    num_prompt_tokens: int
    params: SamplingParams
    first_word: int  # index into the word list of its first output token
    num_completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_completion_tokens


class SteppingEngine:
    """Not thread-safe, like ``LLMEngine``: ``AsyncEngine`` owns it on its engine thread.
    ``clock`` and ``sleep`` are injectable so tests can step it without waiting."""

    def __init__(
        self,
        config: SteppingEngineConfig,
        source: ModelSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.stepping = config
        self.source = source or resolve(config.model)
        mcfg = self.source.config
        self.vocab_size = mcfg.vocab_size
        self.eos_token_ids = frozenset(mcfg.eos_token_ids)
        self.max_model_len = config.max_model_len or min(
            mcfg.max_position_embeddings, _MAX_DEFAULT_CONTEXT
        )
        self.num_pages = config.num_pages or config.max_running_requests * self._pages_for(
            self.max_model_len
        )
        # what the SGLang servicer reads (max_running_requests) and a reader of LLMEngine's
        # config expects to find; nothing here loads or allocates from it
        self.config = EngineConfig(
            model=config.model,
            device="cpu",
            dtype="float32",
            page_size=config.page_size,
            num_pages=self.num_pages,
            max_running_requests=config.max_running_requests,
            max_model_len=self.max_model_len,
            enable_prefix_cache=False,
        )
        self.words = word_token_ids(self.source.path, self.vocab_size, self.eos_token_ids)
        self.steps = 0  # steps that produced tokens, for tests and logs
        self._step_s = config.step_ms / 1000.0
        self._clock, self._sleep = clock, sleep
        self._origin = clock()  # the step grid's zero
        self._active: dict[str, _Request] = {}  # insertion order = arrival order
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        log.info(
            "stepping engine ready: %s, one token per active request every %.3g ms, %d word "
            "ids, context %d",
            self.source.name,
            config.step_ms,
            len(self.words),
            self.max_model_len,
        )

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request (its first token comes with the next step); raises the typed
        errors ``LLMEngine`` raises for the same inputs."""
        if prefill_only:
            raise FailedPreconditionError("the stepping worker does not prefill for PD decode")
        self._validate(request_id, prompt_token_ids, params)
        if len(self._active) >= self.stepping.max_running_requests:
            raise ResourceExhaustedError(
                f"{len(self._active)} requests active, --max-running-requests is "
                f"{self.stepping.max_running_requests}"
            )
        req = _Request(request_id, len(prompt_token_ids), params, _first_word(prompt_token_ids))
        if params.max_new_tokens == 0:
            self._pending.append(self._final(req, FinishReason.LENGTH))
        else:
            self._active[request_id] = req

    def abort(self, request_id: str) -> bool:
        """Stop a request and forget it; False if unknown or finished."""
        req = self._active.pop(request_id, None)
        if req is None:
            return False
        self._pending.append(self._final(req, FinishReason.ABORT, "aborted"))
        return True

    @property
    def has_work(self) -> bool:
        return bool(self._active or self._pending)

    @property
    def stalled(self) -> bool:
        return False  # nothing here waits for pages held elsewhere

    @property
    def num_active(self) -> int:
        return len(self._active)

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if not self._active:
            return outputs
        self._wait_for_boundary()
        self.steps += 1
        for req in list(self._active.values()):
            outputs.append(self._advance(req))
        return outputs

    # -- what the servicers read ----------------------------------------------------------

    def kv_layout(self) -> KVLayout:
        """The model's KV shape, for GetModelInfo; no memory stands behind it."""
        mcfg = self.source.config
        return KVLayout(
            base_ptr=0,
            total_bytes=0,
            num_layers=mcfg.num_layers,
            num_pages=self.num_pages,
            page_size=self.stepping.page_size,
            num_kv_heads=mcfg.num_kv_heads,
            head_dim=mcfg.head_dim,
            dtype="float32",
            device="cpu",
        )

    def load(self) -> EngineLoad:
        used = sum(self._pages_for(r.num_tokens) for r in self._active.values())
        return EngineLoad(
            num_running=len(self._active),
            num_waiting=0,
            num_awaiting_kv=0,
            num_held=0,
            num_free_pages=max(0, self.num_pages - used),
            num_total_pages=self.num_pages,
            page_size=self.stepping.page_size,
            prefix_hit_rate=0.0,
            prefix_hit_tokens=0,
            num_preemptions=0,
        )

    def blocks_for_context(self) -> int:
        return self._pages_for(self.max_model_len)

    # LLMEngine's PD hooks and page access: the stepping worker has no KV to receive or send
    def allocate_incoming(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> list[int]:
        raise FailedPreconditionError("the stepping worker runs aggregated only (no KV)")

    def start_decode(
        self, request_id: str, first_token: int, logprob: TokenLogprob | None = None
    ) -> RequestOutput:
        raise FailedPreconditionError("the stepping worker runs aggregated only (no KV)")

    def release(self, request_id: str) -> None:
        raise FailedPreconditionError("the stepping worker runs aggregated only (no KV)")

    def read_pages(self, page_ids: list[int]) -> torch.Tensor:
        raise FailedPreconditionError("the stepping worker has no KV pages")

    def write_pages(self, page_ids: list[int], data: torch.Tensor) -> None:
        raise FailedPreconditionError("the stepping worker has no KV pages")

    # -- internals ------------------------------------------------------------------------

    def _wait_for_boundary(self) -> None:
        elapsed = self._clock() - self._origin
        boundary = (int(elapsed / self._step_s) + 1) * self._step_s
        self._sleep(max(0.0, boundary - elapsed))

    def _advance(self, req: _Request) -> RequestOutput:
        position = req.num_completion_tokens
        token = self.words[(req.first_word + position * _STRIDE) % len(self.words)]
        req.num_completion_tokens += 1
        logprobs = [self._logprob(req, token, position)] if req.params.logprobs else []
        out = self._output(req, [token], logprobs)
        reason = self._finish_reason(req, token)
        if reason is not None:
            del self._active[req.request_id]
            out.finished, out.finish_reason = True, reason
        return out

    def _finish_reason(self, req: _Request, token: int) -> FinishReason | None:
        p = req.params
        # below min_new_tokens a real sampler never picks a stop id: here it just does not stop
        if token in p.stop_token_ids and req.num_completion_tokens >= p.min_new_tokens:
            return FinishReason.STOP
        budget = p.max_new_tokens if p.max_new_tokens is not None else self.max_model_len
        if req.num_completion_tokens >= budget or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _logprob(self, req: _Request, token: int, position: int) -> TokenLogprob:
        # the sampled token first, then the next words of the list, each less likely
        top = tuple(
            (
                token if k == 0 else self.words[(req.first_word + position + k) % len(self.words)],
                _LOGPROB - k * _TOP_STEP,
            )
            for k in range(req.params.top_logprobs)
        )
        return TokenLogprob(token, _LOGPROB, top)

    def _final(
        self, req: _Request, reason: FinishReason, error: str | None = None
    ) -> RequestOutput:
        out = self._output(req, [], [])
        out.finished, out.finish_reason, out.error = True, reason, error
        return out

    def _output(
        self, req: _Request, tokens: list[int], logprobs: list[TokenLogprob]
    ) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=tokens,
            new_logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens,
            num_completion_tokens=req.num_completion_tokens,
        )

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        """``LLMEngine._new_sequence``'s checks, with its field names."""
        if not request_id:
            raise InvalidRequestError("request_id", "must not be empty")
        if request_id in self._active:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        if not prompt:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt",
                f"{len(prompt)} tokens leave no room in the context length {self.max_model_len}",
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                "prompt_token_ids",
                f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
            )
        params.validate(self.vocab_size)

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.stepping.page_size)


def _first_word(prompt: list[int]) -> int:
    """Where in the word list a prompt's answer starts: a checksum of the prompt, so the same
    prompt always gets the same answer, in every process."""
    return zlib.crc32(array("q", prompt).tobytes())
