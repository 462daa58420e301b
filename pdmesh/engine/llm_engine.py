"""``LLMEngine``: the synchronous engine — requests in, one ``step()`` at a time, outputs out.

Not thread-safe: ``AsyncEngine`` owns one on a dedicated thread. A step is
``scheduler.schedule()`` → ``runner.launch(batch)`` (queued on the device) → ``_resolve`` (wait
for the sampled tokens, then append them, finish requests, build the outputs).

NOTE: the overlap schedule (``--disable-overlap-schedule`` turns it off; on by default on CUDA).
Without it the GPU idles while the host schedules, builds the inputs and reads the outputs, so a
step costs the sum of the CPU and GPU times. With it, ``step()`` launches step N and only then
resolves step N-1, whose GPU work is done or nearly: the host work of both runs while the GPU
computes step N. So **one ``step()`` call returns the outputs of the previous GPU step** (the
last ones come from a call that launches nothing; ``has_work`` stays true until then).

What that takes:
- step N+1 is scheduled before step N's tokens are known: a sampled token is a placeholder in
  ``Sequence.token_ids`` (sequence.py) until it resolves, and its input id is read from step N's
  token tensor on the device. A sequence whose last token step N samples (max_new_tokens, the
  context length, prefill-only) is known to end at launch: it leaves the schedule then, and
  keeps its pages until step N resolves. One that stops on EOS or a stop id has one more token
  computed at step N+1: its pages are freed when step N resolves, the extra row is dropped when
  step N+1 resolves, and it is never emitted.
- ``abort`` of a request in the step in flight resolves that step first (its outputs are
  returned by the next ``step()``), so an abort cuts a request at the same token with or
  without the overlap. ``allocate_incoming``, ``start_decode`` and ``release`` touch no
  sequence of the step in flight.
- pages are hashed into the prefix cache at resolve time, up to what that step computed, as
  without the overlap; a request admitted while that step is in flight sees those pages only
  once it resolves (one step later than without the overlap).
- penalties need the previous tokens on the host, and so does a grammar (constrained decoding,
  grammar.py): the mask of step N+1 is what the matcher allows after step N's token, which only
  the host's matcher can compute. Such a step N+1 is scheduled and its forward launched while
  step N is in flight, as any other; only its sampling waits: ``step()`` launches N+1's
  forward, resolves N (its tokens reach the matchers), then fills N+1's masks and queues its
  sampling (``ModelRunner.sample_deferred``) while the GPU runs N+1's forward. So the host's
  scheduling, input building, output building and mask filling all overlap the GPU; the GPU
  waits only when they take longer than a forward. Guessing instead (a mask per possible
  token, or sampling unmasked and rolling back) would cost more than it saves. A row whose
  request ended at step N samples unmasked (its token is dropped, as below).
  Seeds (keyed by position) and min_new_tokens (by count) need only lengths, which placeholders
  keep. Unseeded random rows draw from the engine's generator in batch order; the dropped extra
  rows take draws too, so their tokens differ between overlap on and off (they are not
  reproducible across batch compositions either way).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pdmesh.distributed import TPGroup
from pdmesh.engine.block_manager import BlockManager
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.grammar import GrammarCompiler
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.model_runner import Launched, ModelRunner
from pdmesh.engine.outputs import EngineLoad, RequestOutput
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.scheduler import ScheduledBatch, Scheduler
from pdmesh.engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from pdmesh.errors import InvalidRequestError, RequestNotFoundError, ResourceExhaustedError
from pdmesh.models import loader

if TYPE_CHECKING:
    from llguidance import LLMatcher

log = logging.getLogger(__name__)

_MAX_DEFAULT_CONTEXT = 32768


@dataclass
class _InFlight:
    """A launched step, until ``_resolve`` reads its tokens."""

    batch: ScheduledBatch
    launched: Launched
    # per batch row: num_computed_tokens after this step, and the page list it computed into
    # (a different list object later means the sequence was preempted meanwhile)
    computed: list[int]
    tables: list[list[int]]
    # per sampled row: the sequence and the index of its placeholder in token_ids
    sampled: list[tuple[Sequence, int]]
    retired: list[Sequence]  # sampled their last token: out of the schedule already
    # finished while this step ran, with a row in it: their pages are freed when it resolves,
    # since it still writes KV into them (a KV transfer from another process into a page given
    # out again meanwhile would race with that write; local users come after it on the stream)
    free_after: list[Sequence] = field(default_factory=list)
    _ids: set[int] | None = None

    def has_row(self, seq: Sequence) -> bool:
        if self._ids is None:
            self._ids = {id(s) for s in self.batch.seqs}
        return id(seq) in self._ids


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        source: loader.ModelSource | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        """``tp``: this process's rank of a tensor-parallel worker (None: the whole model here).
        Every rank builds the same engine and must be fed the same calls in the same order."""
        self.config = config
        self.tp = tp or TPGroup.single()
        self.source = source or loader.resolve(config.model)
        mcfg = self.source.config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        self.vocab_size = mcfg.vocab_size
        self.eos_token_ids = frozenset(mcfg.eos_token_ids)
        self.max_model_len = config.max_model_len or min(
            mcfg.max_position_embeddings, _MAX_DEFAULT_CONTEXT
        )
        model = loader.load_model(self.source, self.dtype, self.device, self.tp)
        self.shard = model.shard  # this rank's part: its KV heads size the cache
        self.grammars = GrammarCompiler(
            self.source.path, self.vocab_size, sorted(self.eos_token_ids)
        )
        # ranks size their pools from their own free memory: all take the least, so that
        # they admit and schedule the same requests
        num_pages = self.tp.min_int(config.num_pages or self._auto_num_pages())
        self.blocks = BlockManager(num_pages, config.page_size, config.enable_prefix_cache)
        self.scheduler = Scheduler(
            self.blocks, config.max_running_requests, config.max_num_batched_tokens
        )
        self.runner = ModelRunner(
            model,
            num_pages,
            config.page_size,
            self.max_model_len,
            self.device,
            self.dtype,
            tuple(sorted(self.eos_token_ids)),
            config.seed,
            cuda_graph_max_batch=config.graph_max_batch(),
        )
        self._seqs: dict[str, Sequence] = {}  # every request the engine knows, by id
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self._stalled = False
        self.overlap = config.overlap_schedule(self.device)
        self._inflight: _InFlight | None = None  # the launched step not yet resolved
        log.info(
            "engine ready: %d KV pages x %d tokens (%.2f GB), context %d, device %s, dtype %s",
            num_pages,
            config.page_size,
            self.runner.kv_cache.nbytes / 1e9,
            self.max_model_len,
            self.device,
            self.dtype,
        )

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request. Raises ``InvalidRequestError`` / ``ResourceExhaustedError``."""
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        seq.prefill_only = prefill_only
        self._seqs[request_id] = seq
        if params.max_new_tokens == 0:
            self._finish(seq, FinishReason.LENGTH)
        elif seq.grammar is not None and seq.grammar.is_stopped():
            # a migrated request whose replayed output already completes its grammar
            self._finish(seq, FinishReason.STOP)
        else:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its pages; False if unknown or done."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        inflight = self._inflight
        if inflight is not None and inflight.has_row(seq):
            # cut it where it would be cut without the overlap: after the step in flight
            self._inflight = None
            self._pending += self._resolve(inflight)
            seq = self._seqs.get(request_id)
            if seq is None:
                return False
        self._finish(seq, FinishReason.ABORT, "aborted")
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._pending) or self._inflight is not None

    @property
    def stalled(self) -> bool:
        """The last step computed nothing: every queued request waits for pages held
        elsewhere (PD transfers, prefill-only holds). Callers should wait for a command
        instead of stepping again at once."""
        return self._stalled

    def step(self) -> list[RequestOutput]:
        """Launch the next step and return the outputs of the one before it (module NOTE);
        without the overlap, of this one."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        previous = self._inflight
        launched = None if batch.is_empty else self._launch(batch, defer=previous is not None)
        self._inflight = launched
        if previous is not None:
            outputs += self._resolve(previous)
        if launched is not None:
            if launched.launched.deferred is not None:  # host tokens known now (module NOTE)
                self.runner.sample_deferred(launched.launched)
            if not self.overlap:
                self._inflight = None
                outputs += self._resolve(launched)
        self._stalled = batch.is_empty and previous is None and not outputs
        return outputs

    # -- PD hooks -------------------------------------------------------------------------

    def allocate_incoming(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> list[int]:
        """Decode side: pages for a prompt whose KV another process will write.

        Raises ``ResourceExhaustedError`` when the pages are not free now (the caller retries).
        """
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        if not self.blocks.can_grow(seq, seq.num_tokens):
            raise ResourceExhaustedError(
                f"{self.blocks.pages_for(seq.num_tokens)} KV pages needed, "
                f"{self.blocks.num_free_pages} free"
            )
        self.blocks.grow(seq, seq.num_tokens)
        seq.status = SequenceStatus.AWAITING_KV
        self._seqs[request_id] = seq
        return list(seq.block_table)

    def start_decode(
        self, request_id: str, first_token: int, logprob: TokenLogprob | None = None
    ) -> RequestOutput:
        """Decode side: the prompt's KV has arrived and the prefill sampled ``first_token``."""
        seq = self._get(request_id, SequenceStatus.AWAITING_KV)
        if not 0 <= first_token < self.vocab_size:
            raise InvalidRequestError(
                "first_token", f"{first_token} outside [0, {self.vocab_size})"
            )
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.blocks.commit_full_pages(seq)
        self.scheduler.add_running(seq)
        return self._append_token(seq, first_token, logprob)

    def release(self, request_id: str) -> None:
        """Prefill side: the held pages of a finished prefill-only request may be reused."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            raise RequestNotFoundError(f"request {request_id!r} holds no pages")
        self.blocks.free(seq)

    def kv_layout(self) -> KVLayout:
        kv, mcfg = self.runner.kv_cache, self.source.config
        return KVLayout(
            base_ptr=kv.data_ptr(),
            total_bytes=kv.nbytes,
            num_layers=mcfg.num_layers,
            num_pages=self.blocks.num_pages,
            page_size=self.blocks.page_size,
            num_kv_heads=self.shard.num_kv_heads,
            head_dim=mcfg.head_dim,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
        )

    def read_pages(self, page_ids: list[int]) -> torch.Tensor:
        return self.runner.read_pages(page_ids)

    def write_pages(self, page_ids: list[int], data: torch.Tensor) -> None:
        self.runner.write_pages(page_ids, data)

    def load(self) -> EngineLoad:
        stats = self.blocks.stats()
        seqs = self._seqs.values()
        step = self._inflight
        in_flight = len(step.retired) + len(step.free_after) if step is not None else 0
        return EngineLoad(
            # a sequence whose last row is in flight still runs (and holds its pages)
            num_running=len(self.scheduler.running) + in_flight,
            num_waiting=len(self.scheduler.waiting),
            num_awaiting_kv=sum(s.status is SequenceStatus.AWAITING_KV for s in seqs),
            num_held=sum(s.status is SequenceStatus.FINISHED for s in seqs),
            num_free_pages=self.blocks.num_free_pages,
            num_total_pages=self.blocks.num_pages,
            page_size=self.blocks.page_size,
            prefix_hit_rate=stats.hit_rate,
            prefix_hit_tokens=stats.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
        )

    # -- internals ------------------------------------------------------------------------

    def _new_sequence(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Sequence:
        if not request_id:
            raise InvalidRequestError("request_id", "must not be empty")
        if request_id in self._seqs:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt", "must not be empty")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{n} tokens leave no room in the context length {self.max_model_len}"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                "prompt_token_ids",
                f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
            )
        params.validate(self.vocab_size)
        if params.resumed_output_tokens >= n:
            raise InvalidRequestError(
                "resumed_output_tokens",
                f"{params.resumed_output_tokens} must be less than the prompt's {n} tokens",
            )
        if self.blocks.pages_for(n + 1) > self.blocks.num_pages:
            raise ResourceExhaustedError(
                f"prompt of {n} tokens needs more KV pages than the pool has "
                f"({self.blocks.num_pages} x {self.blocks.page_size} tokens)"
            )
        seq = Sequence(request_id, list(prompt_token_ids), params)
        if params.constraint is not None:
            seq.grammar = self._matcher(params, prompt_token_ids)
        seq.stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        budget = params.max_new_tokens
        if budget is None:  # the request set none: --default-max-tokens, 0 = the context's rest
            default = self.config.default_max_tokens
            # a migrated request's earlier output counts against the same budget
            budget = (
                max(default - params.resumed_output_tokens, 0) if default else self.max_model_len
            )
        seq.max_num_tokens = min(n + budget, self.max_model_len)
        return seq

    def _matcher(self, params: SamplingParams, prompt: list[int]) -> LLMatcher:
        """A fresh matcher of the request's grammar, past its resumed output tokens.

        The grammar is compiled here only when nothing compiled it before (``AsyncEngine``
        does it on its own pool, so the step loop finds it in the cache); before any page is
        allocated, so a bad grammar holds nothing.
        """
        assert params.constraint is not None
        kind, text = params.constraint
        matcher = self.grammars.compile(kind, text).matcher()
        n = params.resumed_output_tokens
        if n and not matcher.consume_tokens(prompt[-n:]):
            raise InvalidRequestError(
                "resumed_output_tokens",
                f"the last {n} prompt tokens do not match sampling_params.{kind}: "
                f"{matcher.get_error()}",
            )
        return matcher

    def _launch(self, batch: ScheduledBatch, defer: bool) -> _InFlight:
        """Queue the step on the device, then advance the host state as if it had run: the
        computed counts, a placeholder per sampled token, the ends that are certain.
        ``defer``: a step is in flight, so rows that need its tokens sample later."""
        return self._advance(batch, self.runner.launch(batch, defer))

    def _advance(self, batch: ScheduledBatch, launched: Launched) -> _InFlight:
        seqs = batch.seqs
        for seq, n in zip(seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        sampled: list[tuple[Sequence, int]] = []
        retired: list[Sequence] = []
        for j, i in enumerate(launched.sample_index):
            seq = seqs[i]
            tokens = seq.token_ids
            tokens.append(-1 - j)  # placeholder(j), inlined: this loop runs per row per step
            sampled.append((seq, len(tokens) - 1))
            if len(tokens) >= seq.max_num_tokens or seq.prefill_only:
                retired.append(seq)
        if retired:
            self.scheduler.retire(retired)
        hashing = self.blocks.enable_prefix_cache  # only the prefix cache reads these two
        return _InFlight(
            batch,
            launched,
            [s.num_computed_tokens for s in seqs] if hashing else [],
            [s.block_table for s in seqs] if hashing else [],
            sampled,
            retired,
        )

    def _resolve(self, step: _InFlight) -> list[RequestOutput]:
        """Wait for a launched step's tokens; write them over their placeholders, hash the
        pages it filled, finish what ended, and return its outputs."""
        return self._update(step, self.runner.fetch(step.launched))

    def _update(
        self, step: _InFlight, results: list[tuple[int, TokenLogprob | None]]
    ) -> list[RequestOutput]:
        for seq in step.free_after:
            self.blocks.free(seq)
        if self.blocks.enable_prefix_cache:
            self._commit_pages(step)
        finished = SequenceStatus.FINISHED
        outputs = []
        for (seq, idx), (token, logprob) in zip(step.sampled, results):
            if seq.status is finished:
                continue  # it stopped a step earlier: this extra token is dropped (NOTE)
            outputs.append(self._place_token(seq, idx, token, logprob))
        return outputs

    def _commit_pages(self, step: _InFlight) -> None:
        ps = self.blocks.page_size
        rows = zip(step.batch.seqs, step.batch.num_new_tokens, step.computed, step.tables)
        for seq, n, computed, table in rows:
            # only when a page filled up, and not after a preemption (its pages are gone)
            if computed // ps == (computed - n) // ps or seq.block_table is not table:
                continue
            if seq.is_finished:
                continue
            # commit_full_pages reads num_computed_tokens, which a later launch may have
            # advanced past tokens whose values are not known yet: hash what this step computed
            now, seq.num_computed_tokens = seq.num_computed_tokens, computed
            self.blocks.commit_full_pages(seq)
            seq.num_computed_tokens = now

    def _place_token(
        self, seq: Sequence, idx: int, token: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        """Token ``idx`` of ``seq`` is ``token``: record it, end the request if it ends."""
        seq.token_ids[idx] = token
        if logprob is not None:
            seq.logprobs.append(logprob)
        out = RequestOutput(  # not _output(): this runs per row per step
            request_id=seq.request_id,
            new_token_ids=[token],
            new_logprobs=[logprob] if logprob else [],
            num_prompt_tokens=seq.num_prompt_tokens,
            # not num_completion_tokens: the next step may have appended a placeholder
            num_completion_tokens=idx + 1 - seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )
        # below min_new_tokens the sampler bans stop ids and EOS, so they cannot show up here
        reason = None
        error = None
        grammar = seq.grammar
        if grammar is not None and not grammar.consume_token(token):
            # the mask allowed it, so only a token sampled elsewhere (PD: a prefill that does
            # not constrain) or a matcher out of its limits gets here
            reason = FinishReason.ERROR
            error = f"token {token} does not match the request's grammar: {grammar.get_error()}"
        elif token in seq.stop_ids:
            reason = FinishReason.STOP
        elif grammar is not None and grammar.is_stopped():
            reason = FinishReason.STOP  # the grammar is complete and allows nothing more
        elif idx + 1 >= seq.max_num_tokens:
            reason = FinishReason.LENGTH
        if seq.prefill_only:
            self._hold(seq, reason)
            out.prefill_page_ids = list(seq.block_table)
        elif reason is not None:
            del seq.token_ids[idx + 1 :]  # the extra token of a step in flight, if any
            later = self._inflight  # not the step resolving now: step() took that one out
            if later is not None and later.has_row(seq):
                self._finish(seq, reason, error, emit=False, free=False)
                later.free_after.append(seq)
            else:
                self._finish(seq, reason, error, emit=False)
        else:
            return out
        out.finished = True
        out.finish_reason = seq.finish_reason
        out.error = error
        return out

    def _append_token(
        self, seq: Sequence, token: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        """A token sampled elsewhere (PD: the prefill's first token)."""
        seq.token_ids.append(token)
        return self._place_token(seq, seq.num_tokens - 1, token, logprob)

    def _hold(self, seq: Sequence, reason: FinishReason | None) -> None:
        # out of the schedule since its launch (retired); keep the pages for the KV transfer,
        # release() frees them
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: str | None = None,
        emit: bool = True,
        free: bool = True,
    ) -> None:
        self.scheduler.finish(seq, reason, error, free_pages=free)
        del self._seqs[seq.request_id]
        if emit:
            out = self._output(seq, [], [])
            out.finished, out.finish_reason, out.error = True, reason, error
            self._pending.append(out)

    def _output(
        self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob]
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            new_logprobs=logprobs,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_completion_tokens=seq.num_completion_tokens,
            num_cached_tokens=seq.num_cached_tokens,
        )

    def _get(self, request_id: str, status: SequenceStatus) -> Sequence:
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not status:
            raise RequestNotFoundError(f"no request {request_id!r} in state {status.value}")
        return seq

    def _auto_num_pages(self) -> int:
        mcfg = self.source.config
        per_page = (
            mcfg.num_layers
            * 2
            * self.config.page_size
            * self.shard.num_kv_heads
            * mcfg.head_dim
            * torch.tensor([], dtype=self.dtype).element_size()
        )
        budget = self.config.kv_cache_memory_gb * 1e9
        if budget == 0:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = 0.8 * free - self.source.config.num_params * 2.5
            else:
                budget = 1e9
        # never more pages than the longest useful cache: max_running_requests full contexts
        cap = self.config.max_running_requests * self.blocks_for_context()
        return max(1, min(int(budget // per_page), cap))

    def blocks_for_context(self) -> int:
        return -(-self.max_model_len // self.config.page_size)
