"""The only place that builds tensors: owns the model, the KV cache and the sampler.

``launch(batch)`` flattens a ``ScheduledBatch`` into one token batch (decodes first, then prefill
chunks), queues the model once (a decode graph's replay when every row decodes), computes logits
only for the rows that sample, and samples, all without waiting for the device; ``fetch`` waits
for the sampled tokens on the host (``run`` is both at once).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from pdmesh.engine.cuda_graphs import (
    DecodeGraphs,
    TransferFence,
    decode_rows,
    pinned_empty,
    record_fence,
    use_kernels,
)
from pdmesh.engine.grammar import MaskFiller
from pdmesh.engine.kv_cache import allocate_kv_cache
from pdmesh.engine.sampler import RowMasks, Sampled, Sampler, SampleRow
from pdmesh.engine.scheduler import ScheduledBatch
from pdmesh.engine.sequence import Sequence, TokenLogprob
from pdmesh.layers.attention import (
    AttentionMetadata,
    PrefillSegment,
    rows_per_page,
    varlen_prefill,
)
from pdmesh.models import llama
from pdmesh.models.config import ModelConfig

log = logging.getLogger(__name__)

_PLAIN_GREEDY = operator.attrgetter("plain_greedy")


@dataclass
class Launched:
    """A step queued on the device: which batch rows sample, and their tokens on the way."""

    sample_index: list[int]  # batch index of each sampled row, in order
    sampled: Sampled | None
    # every sampled row plain greedy (so none has penalties, which need host tokens)
    plain_greedy: bool
    # the end of the step's work when nothing samples (else the sampled copies' event): a
    # resolved step has written all its KV, so its pages may be handed to a KV transfer
    done: TransferFence | None = None
    # its sampling waits for the previous step's tokens on the host (``launch(defer=True)``)
    deferred: _DeferredSample | None = None


@dataclass
class _DeferredSample:
    """A launched forward whose rows need the previous step's tokens on the host to sample
    (penalties count them; a grammar's mask follows them): sampled by ``sample_deferred``."""

    logits: torch.Tensor
    seqs: list[Sequence]
    rows: list[SampleRow]  # built at launch: lengths before this step's placeholders


@dataclass
class _StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_index: list[int]
    sample_flat: torch.Tensor | None = None  # flat rows that sample, when not all do
    # a step that replays a decode graph: its inputs (DecodeGraphs.replay)
    graph_rows: torch.Tensor | None = None
    graph_table: torch.Tensor | None = None
    graph_ids: torch.Tensor | None = None


class _HostPack:
    """One step's host integers, laid out in one int64 buffer that travels in one copy."""

    def __init__(self) -> None:
        self._parts: list[tuple[slice, Seq[int] | np.ndarray]] = []
        self._size = 0

    def add(self, values: Seq[int] | np.ndarray) -> slice:
        n = values.size if isinstance(values, np.ndarray) else len(values)
        r = slice(self._size, self._size + n)
        self._parts.append((r, values.reshape(-1) if isinstance(values, np.ndarray) else values))
        self._size = r.stop
        return r

    def upload(self, device: torch.device) -> torch.Tensor:
        host = pinned_empty(self._size, torch.long, device)
        view = host.numpy()
        for r, values in self._parts:
            view[r] = values
        if device.type != "cuda":
            return host
        return host.to(device, non_blocking=True)  # no sync: the pinned block is kept for it


def _page_table(tables: list[list[int]]) -> tuple[np.ndarray, int]:
    """Page lists as a zero-padded [len(tables), width] int64 block: one numpy fill, no loop."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    width = max(1, int(lens.max())) if len(tables) else 1
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum()))
    block = np.zeros((len(tables), width), dtype=np.int64)
    block[np.arange(width) < lens[:, None]] = flat  # row-major: each row's pages in order
    return block, width


class ModelRunner:
    def __init__(
        self,
        model: llama.LlamaForCausalLM,
        num_pages: int,
        page_size: int,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: tuple[int, ...] = (),
        seed: int = 0,
        cuda_graph_max_batch: int = 0,
    ) -> None:
        """``cuda_graph_max_batch``: on CUDA, capture decode steps of up to this many rows as
        CUDA graphs (0: run every step eagerly)."""
        cfg: ModelConfig = model.config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.page_size = page_size
        # a slot is page * page_stride + offset (attention.py: page-major rows)
        self.page_stride = rows_per_page(cfg.num_layers, page_size)
        self.eos_token_ids = eos_token_ids
        self.kv_cache = allocate_kv_cache(
            (num_pages, cfg.num_layers, 2, page_size, model.shard.num_kv_heads, cfg.head_dim),
            dtype,
            device,
        )
        cos, sin = llama.rope_cos_sin(cfg, max_model_len)
        self.rope = (cos.to(device), sin.to(device))
        self.sampler = Sampler(device, seed)
        self.masks = MaskFiller(cfg.vocab_size)
        # CUDA: decode attention and KV writes through triton_attention (pages read in place)
        self.kernels = use_kernels(device, cfg.head_dim)
        if self.kernels:
            model.fuse_projections()
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.graphs: DecodeGraphs | None = None
        # the newest launch's sampled tokens [k] on the device: what placeholders refer to
        self._last_tokens: torch.Tensor | None = None
        if self.kernels and cuda_graph_max_batch > 0:
            with _on(device):
                self.graphs = DecodeGraphs(self, cuda_graph_max_batch)

    def launch(self, batch: ScheduledBatch, defer: bool = False) -> Launched:
        """Queue the batch's forward and sampling on the device; nothing here waits for it.

        A row's input token may be a placeholder (``sequence.placeholder``) for a token that
        the previous launch sampled: it is read from that launch's token tensor on the device.
        ``defer``: the previous launch is still in flight, so a batch with rows that need host
        tokens (``Sequence.needs_host_tokens``) queues only its forward; ``sample_deferred``
        samples it once the caller has resolved that launch (llm_engine.py NOTE).
        """
        # the current device is per thread and the engine steps on its own thread: without it
        # triton kernels and graphs of an engine on cuda:1 would launch on cuda:0
        with _on(self.device):
            return self._launch(batch, defer)

    @torch.inference_mode()
    def sample_deferred(self, launched: Launched) -> None:
        """Sample a ``launch(defer=True)`` that deferred: the grammar masks are filled now,
        while the device runs its forward."""
        pending, launched.deferred = launched.deferred, None
        assert pending is not None
        with _on(self.device):
            launched.sampled = self._sample_rows(pending.logits, pending.seqs, pending.rows)

    def fetch(self, launched: Launched) -> list[tuple[int, TokenLogprob | None]]:
        """The sampled (token, logprob) of each of ``launched.sample_index``; waits for them."""
        assert launched.deferred is None, "a deferred sample not taken yet"
        if launched.sampled is None:
            if launched.done is not None:
                launched.done.wait()
            return []
        with _on(self.device):
            tokens, logprobs = launched.sampled.resolve()
        return list(zip(tokens, logprobs))

    def run(self, batch: ScheduledBatch) -> list[tuple[int, TokenLogprob | None] | None]:
        """``launch`` and ``fetch``: per sequence the sampled (token, logprob), or None
        mid-prefill."""
        launched = self.launch(batch)
        results: list[tuple[int, TokenLogprob | None] | None] = [None] * len(batch.seqs)
        for i, result in zip(launched.sample_index, self.fetch(launched)):
            results[i] = result
        return results

    @torch.inference_mode()
    def _launch(self, batch: ScheduledBatch, defer: bool) -> Launched:
        step = self._prepare(batch)
        index = step.sample_index
        seqs = batch.seqs if len(index) == len(batch.seqs) else [batch.seqs[i] for i in index]
        self._last_tokens = None
        if step.graph_rows is not None:
            assert self.graphs is not None and step.graph_table is not None
            logits = self.graphs.replay(step.graph_rows, step.graph_table, step.graph_ids)
            if step.sample_flat is not None:  # not every row samples: only their logits
                logits = logits[step.sample_flat]
        else:
            hidden = self.model(step.input_ids, step.positions, self.kv_cache, step.meta, self.rope)
            if step.sample_flat is not None:  # the logits of the rows that sample only
                hidden = hidden[step.sample_flat]
            logits = self.model.compute_logits(hidden) if seqs else hidden
        if not seqs:  # mid-prefill chunks only
            return Launched([], None, plain_greedy=True, done=record_fence(self.device))
        if all(map(_PLAIN_GREEDY, seqs)):  # the usual batch: one argmax, no per-row objects
            return Launched(index, self._started(self.sampler.greedy(logits)), plain_greedy=True)
        rows = [self._sample_row(s) for s in seqs]
        if defer and any(s.needs_host_tokens for s in seqs):
            pending = _DeferredSample(logits, seqs, rows)
            return Launched(index, None, plain_greedy=False, deferred=pending)
        return Launched(index, self._sample_rows(logits, seqs, rows), plain_greedy=False)

    def _sample_rows(
        self, logits: torch.Tensor, seqs: list[Sequence], rows: list[SampleRow]
    ) -> Sampled:
        return self._started(self.sampler.sample(logits, rows, self._masks(seqs)))

    def _started(self, sampled: Sampled) -> Sampled:
        """``sampled`` on its way to the host, and what the next launch's placeholders read."""
        sampled.start_copy()
        self._last_tokens = sampled.tokens
        return sampled

    def _masks(self, seqs: list[Sequence]) -> RowMasks | None:
        """The grammar masks of the constrained rows, filled on the host.

        Called once the forward is queued, and (overlap) once the step before it resolved, so
        every constrained row's last token is on the host: on CUDA the masks are computed while
        the GPU runs the forward. A row whose request ended at the step before (its grammar
        complete, or a stop id) is left unmasked: its token is dropped (llm_engine.py NOTE),
        and a stopped matcher's mask may allow nothing.
        """
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None and not s.is_finished]
        if not rows:
            return None
        matchers = [seqs[i].grammar for i in rows]
        return RowMasks(rows, self.masks.fill(matchers))  # type: ignore[arg-type]

    def _prepare(self, batch: ScheduledBatch) -> _StepInputs:
        """The flat token batch (decodes first, then prefill chunks) and its metadata.

        Every host-side integer of the step (ids, positions, slots, lengths, block table) goes
        to the device as one buffer in one copy (module NOTE in cuda_graphs.py). The decode
        rows are built with list comprehensions and numpy, not a Python loop per row.
        """
        seqs, counts = batch.seqs, batch.num_new_tokens
        b = len(seqs)
        # single-token rows lead the batch: they run as batched decode attention
        nd = b if batch.num_tokens == b else next((i for i, n in enumerate(counts) if n != 1), b)
        dseqs = seqs[:nd] if nd < b else seqs
        starts = [s.num_computed_tokens for s in dseqs]
        ids = [s.token_ids[p] for s, p in zip(dseqs, starts)]
        sample_index = list(range(batch.num_decode))
        sample_index += [i for i in range(batch.num_decode, b) if batch.samples(i)]
        table, width = _page_table([s.block_table for s in dseqs])
        pos = np.array(starts, dtype=np.int64)
        if nd == b and self.graphs is not None and self.graphs.fits(b, width):
            return self._prepare_graph(ids, pos, table, sample_index)
        return self._prepare_eager(batch, nd, ids, pos, table, sample_index)

    def _prepare_graph(
        self, ids: list[int], pos: np.ndarray, table: np.ndarray, sample_index: list[int]
    ) -> _StepInputs:
        """A pure-decode step that replays a graph: its [4, size] rows and block table."""
        assert self.graphs is not None
        b = len(ids)
        size = self.graphs.size_for(b)
        pack = _HostPack()
        r_rows = pack.add(decode_rows(ids, pos, table, self.page_size, self.page_stride, size))
        r_table = pack.add(table)
        r_flat = pack.add(sample_index) if len(sample_index) != b else None
        buf = pack.upload(self.device)
        rows = buf[r_rows].view(4, size)
        step = _StepInputs(rows[0, :b], rows[1, :b], self._meta(), sample_index)
        step.graph_rows, step.graph_table = rows, buf[r_table].view(table.shape)
        step.graph_ids = self._resolve_placeholders(rows[0, :b], ids, keep=None)
        step.sample_flat = buf[r_flat] if r_flat is not None else None
        return step

    def _prepare_eager(
        self,
        batch: ScheduledBatch,
        nd: int,
        ids: list[int],
        pos: np.ndarray,
        table: np.ndarray,
        sample_index: list[int],
    ) -> _StepInputs:
        """Any other step: the flat batch, and the metadata the model reads."""
        pack = _HostPack()
        prefills: list[tuple[int, int, int, slice]] = []  # row0, start, n, ctx-slot range
        positions: list[int] = pos.tolist()
        dec = decode_rows(ids, pos, table, self.page_size, self.page_stride, nd)
        slots: list[int] = dec[2].tolist()  # new tokens' slots: decodes, then prefill rows
        for i in range(nd, len(batch.seqs)):
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            row0 = len(ids)
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            ctx_slots = self._slots(seq, end)
            slots += ctx_slots[start:end]
            prefills.append((row0, start, n, pack.add(ctx_slots)))
        r_ids, r_pos, r_slots = pack.add(ids), pack.add(positions), pack.add(slots)
        r_ctx, r_table = pack.add(dec[3]), pack.add(table)
        flat = [
            i if i < nd else prefills[i - nd][0] + batch.num_new_tokens[i] - 1 for i in sample_index
        ]
        r_flat = pack.add(flat) if len(flat) != len(ids) else None
        buf = pack.upload(self.device)
        input_ids = self._resolve_placeholders(buf[r_ids], ids, keep=buf[r_ids])
        assert input_ids is not None
        step = _StepInputs(input_ids, buf[r_pos], self._meta(), sample_index)
        step.sample_flat = buf[r_flat] if r_flat is not None else None
        meta = step.meta
        meta.slot_mapping = buf[r_slots]
        meta.prefills = [self._segment(r0, st, n, buf[r]) for r0, st, n, r in prefills]
        if self.kernels and self.dtype in (torch.float16, torch.bfloat16):  # flash: 16-bit
            meta.prefill_varlen = varlen_prefill(meta.prefills, self.device)
        if nd:
            meta.num_decode = nd
            width = int(pos.max()) + 1  # the longest context, known here without the device
            self._decode_meta(meta, buf[r_table].view(table.shape), buf[r_ctx], width)
        elif self.kernels:  # the triton KV store runs whenever the kernels are on
            meta.block_table = torch.zeros(1, 1, dtype=torch.int32, device=self.device)
            meta.context_lens = torch.zeros(1, dtype=torch.int32, device=self.device)
        return step

    def _resolve_placeholders(
        self, ids_dev: torch.Tensor, ids: list[int], keep: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Input ids with each placeholder replaced by the previous launch's sampled token;
        ``keep`` when there is none."""
        if min(ids) >= 0:
            return keep
        prev = self._last_tokens
        assert prev is not None, "a placeholder token but no step in flight"
        n = len(ids)
        if n == prev.shape[0] and ids == list(range(-1, -n - 1, -1)):
            return prev  # the steady decode: the same rows in the same order as last step
        return torch.where(ids_dev >= 0, ids_dev, prev[(-1 - ids_dev).clamp(min=0)])

    def _meta(self) -> AttentionMetadata:
        dev = self.device
        return AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long, device=dev),
            num_decode=0,
            decode_slots=None,
            decode_mask=None,
            prefills=[],
            page_size=self.page_size,
            page_stride=self.page_stride,
        )

    def _decode_meta(
        self, meta: AttentionMetadata, table: torch.Tensor, context_lens: torch.Tensor, width: int
    ) -> None:
        """Decode rows' metadata: block table and lengths on the CUDA path, else the
        [B, width] context slots (slot 0 past a row's end) and [B, 1, 1, width] mask for SDPA.

        Built from the page tables with tensor ops: a Python list of every context slot cost
        O(batch x context) interpreter work per step (~3 ms at 32 x 577 tokens).
        """
        if self.kernels:
            meta.block_table = table.to(torch.int32)
            meta.context_lens = context_lens.to(torch.int32)
            return
        ps = self.page_size
        pages = table[:, : -(-width // ps)]
        p = torch.arange(width, device=self.device)
        valid = p < context_lens.unsqueeze(1)
        meta.decode_slots = (pages[:, p // ps] * self.page_stride + p % ps).masked_fill_(~valid, 0)
        meta.decode_mask = valid[:, None, None]

    def _slots(self, seq: Sequence, num_tokens: int) -> list[int]:
        ps, stride = self.page_size, self.page_stride
        return [seq.block_table[t // ps] * stride + t % ps for t in range(num_tokens)]

    def _segment(self, row0: int, start: int, n: int, ctx_slots: torch.Tensor) -> PrefillSegment:
        dev = self.device
        mask = None
        if start > 0:  # a cached prefix or an earlier chunk: query i sees keys 0..start+i
            q_pos = torch.arange(start, start + n, device=dev).unsqueeze(1)
            mask = torch.arange(start + n, device=dev).unsqueeze(0) <= q_pos
        return PrefillSegment(
            start=row0,
            num_tokens=n,
            context_len=start + n,
            slots=ctx_slots,
            causal_mask=mask,
        )

    # -- page access for KV transfer ------------------------------------------------------

    def read_pages(self, page_ids: list[int]) -> torch.Tensor:
        """KV of ``page_ids``: [len(page_ids), layers, 2, page_size, kv_heads, head_dim]."""
        idx = torch.tensor(page_ids, dtype=torch.long, device=self.device)
        return self.kv_cache.index_select(0, idx)

    def write_pages(self, page_ids: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(page_ids, dtype=torch.long, device=self.device)
        self.kv_cache.index_copy_(0, idx, data.to(self.device, self.dtype))

    def _sample_row(self, seq: Sequence) -> SampleRow:
        p = seq.params
        banned: tuple[int, ...] = ()
        if seq.num_completion_tokens < p.min_new_tokens:
            banned = p.stop_token_ids + (() if p.ignore_eos else self.eos_token_ids)
        return SampleRow(p, seq.token_ids, seq.num_prompt_tokens, banned, seq.num_tokens)


def _on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """``device`` as the thread's current CUDA device (a no-op elsewhere)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
