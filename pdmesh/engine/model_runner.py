"""The only place that builds tensors: owns the model, the KV cache and the sampler.

``run(batch)`` flattens a ``ScheduledBatch`` into one token batch (decodes first, then prefill
chunks), runs the model once, computes logits only for the rows that sample, and samples.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from pdmesh.engine.attention import AttentionMetadata, PrefillSegment, rows_per_page
from pdmesh.engine.cuda_graphs import DecodeGraphs, use_kernels
from pdmesh.engine.kv_memory import allocate_kv_cache
from pdmesh.engine.sampler import Sampler, SampleRow
from pdmesh.engine.scheduler import ScheduledBatch
from pdmesh.engine.sequence import Sequence, TokenLogprob

# a module import: pdmesh.models.llama imports pdmesh.engine.attention, which loads this package
from pdmesh.models import llama
from pdmesh.models.config import ModelConfig

log = logging.getLogger(__name__)


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
            (num_pages, cfg.num_layers, 2, page_size, cfg.num_kv_heads, cfg.head_dim),
            dtype,
            device,
        )
        cos, sin = llama.rope_cos_sin(cfg, max_model_len)
        self.rope = (cos.to(device), sin.to(device))
        self.sampler = Sampler(device, seed)
        # CUDA: decode attention and KV writes through triton_attention (pages read in place)
        self.kernels = use_kernels(device, cfg.head_dim)
        if self.kernels:
            model.fuse_projections()
        self.max_pages_per_seq = -(-max_model_len // page_size)
        self.graphs: DecodeGraphs | None = None
        if self.kernels and cuda_graph_max_batch > 0:
            with _on(device):
                self.graphs = DecodeGraphs(self, cuda_graph_max_batch)

    def run(self, batch: ScheduledBatch) -> list[tuple[int, TokenLogprob | None] | None]:
        """Compute the batch; per sequence the sampled (token, logprob), or None mid-prefill."""
        # the current device is per thread and the engine steps on its own thread: without it
        # triton kernels and graphs of an engine on cuda:1 would launch on cuda:0
        with _on(self.device):
            return self._run(batch)

    @torch.inference_mode()
    def _run(self, batch: ScheduledBatch) -> list[tuple[int, TokenLogprob | None] | None]:
        input_ids, positions, meta, sample_rows = self._prepare(batch)
        results: list[tuple[int, TokenLogprob | None] | None] = [None] * len(batch.seqs)
        if self.graphs is not None and self.graphs.fits(meta, len(input_ids)):
            # every row is a decode, and every decode samples: logits row i is sequence i
            logits = self.graphs.replay(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_cache, meta, self.rope)
            if not sample_rows:
                return results
            idx = torch.tensor([row for _, row in sample_rows], device=self.device)
            logits = self.model.compute_logits(hidden[idx])
        rows = [self._sample_row(batch.seqs[i]) for i, _ in sample_rows]
        tokens, logprobs = self.sampler(logits, rows)
        for (i, _), tok, lp in zip(sample_rows, tokens, logprobs):
            results[i] = (tok, lp)
        return results

    def _prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[tuple[int, int]]]:
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_rows: list[tuple[int, int]] = []  # (index in batch, row in the flat batch)
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSegment] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            row0 = len(ids)
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            if batch.samples(i):
                sample_rows.append((i, row0 + n - 1))
            if n == 1 and not prefills:  # single-token rows lead the batch: batched decode
                # only the new token's slot here; the context slots are built on the device
                slots.append(
                    seq.block_table[start // self.page_size] * self.page_stride
                    + start % self.page_size
                )
                decode_tables.append(seq.block_table)
                decode_lens.append(end)
            else:
                ctx_slots = self._slots(seq, end)
                slots += ctx_slots[start:end]
                prefills.append(self._segment(row0, start, n, ctx_slots))
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode=len(decode_lens),
            decode_slots=None,
            decode_mask=None,
            prefills=prefills,
            page_size=self.page_size,
            page_stride=self.page_stride,
        )
        if self.kernels:
            meta.block_table, meta.context_lens = self._block_table(decode_tables, decode_lens)
        elif decode_lens:
            meta.decode_slots, meta.decode_mask = self._decode_slots(decode_tables, decode_lens)
        return (
            torch.tensor(ids, dtype=torch.long, device=dev),
            torch.tensor(pos, dtype=torch.long, device=dev),
            meta,
            sample_rows,
        )

    def _decode_slots(
        self, tables: list[list[int]], lens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L] context slots of the decode rows (slot 0 past a row's end) and [B, 1, 1, L] mask.

        Built from the page tables with tensor ops: a Python list of every context slot cost
        O(batch x context) interpreter work per step (~3 ms at 32 x 577 tokens).
        """
        dev, ps = self.device, self.page_size
        width = max(lens)
        num_pages = -(-width // ps)
        pages = torch.tensor(
            [t[:num_pages] + [0] * (num_pages - len(t[:num_pages])) for t in tables],
            dtype=torch.long,
            device=dev,
        )
        p = torch.arange(width, device=dev)
        valid = p < torch.tensor(lens, device=dev).unsqueeze(1)
        slots = (pages[:, p // ps] * self.page_stride + p % ps).masked_fill_(~valid, 0)
        return slots, valid[:, None, None]

    def _block_table(
        self, tables: list[list[int]], lens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, pages] int32 page ids of the decode rows (0-padded) and [B] int32 lengths."""
        width = max((-(-n // self.page_size) for n in lens), default=1)
        rows = [t[:width] + [0] * (width - len(t[:width])) for t in tables] or [[0]]
        dev = self.device
        table = torch.tensor(rows, dtype=torch.int32, device=dev)
        return table, torch.tensor(lens or [0], dtype=torch.int32, device=dev)

    def _slots(self, seq: Sequence, num_tokens: int) -> list[int]:
        ps, stride = self.page_size, self.page_stride
        return [seq.block_table[t // ps] * stride + t % ps for t in range(num_tokens)]

    def _segment(self, row0: int, start: int, n: int, ctx_slots: list[int]) -> PrefillSegment:
        dev = self.device
        mask = None
        if start > 0:  # a cached prefix or an earlier chunk: query i sees keys 0..start+i
            q_pos = torch.arange(start, start + n, device=dev).unsqueeze(1)
            mask = torch.arange(start + n, device=dev).unsqueeze(0) <= q_pos
        return PrefillSegment(
            start=row0,
            num_tokens=n,
            context_len=start + n,
            slots=torch.tensor(ctx_slots, dtype=torch.long, device=dev),
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
        return SampleRow(p, seq.token_ids, seq.num_prompt_tokens, banned)


def _on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """``device`` as the thread's current CUDA device (a no-op elsewhere)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
