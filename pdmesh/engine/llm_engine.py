"""``LLMEngine``: the synchronous engine — requests in, one ``step()`` at a time, outputs out.

Not thread-safe: ``AsyncEngine`` owns one on a dedicated thread. A step is three calls:
``scheduler.schedule()`` → ``runner.run(batch)`` → ``_update(batch, results)``.
"""

from __future__ import annotations

import logging

import torch

from pdmesh.engine.block_manager import BlockManager
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.model_runner import ModelRunner
from pdmesh.engine.outputs import EngineLoad, KVLayout, RequestOutput
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.scheduler import ScheduledBatch, Scheduler
from pdmesh.engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from pdmesh.errors import InvalidRequestError, RequestNotFoundError, ResourceExhaustedError
from pdmesh.models import loader

log = logging.getLogger(__name__)

_MAX_DEFAULT_CONTEXT = 32768


class LLMEngine:
    def __init__(self, config: EngineConfig, source: loader.ModelSource | None = None) -> None:
        self.config = config
        self.source = source or loader.resolve(config.model)
        mcfg = self.source.config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        self.vocab_size = mcfg.vocab_size
        self.eos_token_ids = frozenset(mcfg.eos_token_ids)
        self.max_model_len = config.max_model_len or min(
            mcfg.max_position_embeddings, _MAX_DEFAULT_CONTEXT
        )
        model = loader.load_model(self.source, self.dtype, self.device)
        num_pages = config.num_pages or self._auto_num_pages()
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
        else:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its pages; False if unknown or done."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self._finish(seq, FinishReason.ABORT, "aborted")
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._pending)

    @property
    def stalled(self) -> bool:
        """The last step computed nothing: every queued request waits for pages held
        elsewhere (PD transfers, prefill-only holds). Callers should wait for a command
        instead of stepping again at once."""
        return self._stalled

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        outputs, self._pending = self._pending, []
        self._stalled = batch.is_empty and not outputs
        if batch.is_empty:
            return outputs
        results = self.runner.run(batch)
        return outputs + self._update(batch, results)

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
            num_kv_heads=mcfg.num_kv_heads,
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
        return EngineLoad(
            num_running=len(self.scheduler.running),
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
        if self.blocks.pages_for(n + 1) > self.blocks.num_pages:
            raise ResourceExhaustedError(
                f"prompt of {n} tokens needs more KV pages than the pool has "
                f"({self.blocks.num_pages} x {self.blocks.page_size} tokens)"
            )
        return Sequence(request_id, list(prompt_token_ids), params)

    def _update(
        self, batch: ScheduledBatch, results: list[tuple[int, TokenLogprob | None] | None]
    ) -> list[RequestOutput]:
        outputs = []
        for seq, n, result in zip(batch.seqs, batch.num_new_tokens, results):
            seq.num_computed_tokens += n
            self.blocks.commit_full_pages(seq)
            if result is not None:
                outputs.append(self._append_token(seq, *result))
        return outputs

    def _append_token(
        self, seq: Sequence, token: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        out = self._output(seq, [token], [logprob] if logprob else [])
        reason = self._finish_reason(seq, token)
        if seq.prefill_only:
            self._hold(seq, reason)
            out.prefill_page_ids = list(seq.block_table)
        elif reason is not None:
            self._finish(seq, reason, emit=False)
        out.finished = seq.is_finished
        out.finish_reason = seq.finish_reason
        return out

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        # below min_new_tokens the sampler bans stop ids and EOS, so they cannot show up here
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if seq.num_completion_tokens >= p.max_new_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _hold(self, seq: Sequence, reason: FinishReason | None) -> None:
        # leave the scheduler but keep the pages for the KV transfer; release() frees them
        self.scheduler.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _finish(
        self, seq: Sequence, reason: FinishReason, error: str | None = None, emit: bool = True
    ) -> None:
        self.scheduler.finish(seq, reason, error)
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
            * mcfg.num_kv_heads
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
