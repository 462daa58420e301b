"""CUDA graphs of decode steps, and the switch to the CUDA kernels.

A decode step of a large model on a fast GPU is a few milliseconds of memory reads spread over
hundreds of small kernels; launched one by one from Python, the launches take longer than the
reads (an 8B model on an H200: ~15 ms eager against a 3.7 ms roofline). So pure-decode steps
replay a graph captured once per batch size: the inputs are copied into static buffers, the batch
is padded up to the next captured size (padding rows write their K/V nowhere and attend to
nothing), and the graph runs the whole forward plus the logits. Steps with prefill chunks run
eagerly; they are long enough for launches not to matter.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from pdmesh.engine.attention import AttentionMetadata

if TYPE_CHECKING:
    from pdmesh.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

# set to "0" to run the CUDA path without its kernels (SDPA over gathered pages, as on CPU)
ENV_KERNELS = "PDMESH_CUDA_KERNELS"


def use_kernels(device: torch.device, head_dim: int) -> bool:
    """Whether to use ``triton_attention``: on CUDA with triton, for power-of-two head dims."""
    if device.type != "cuda" or os.environ.get(ENV_KERNELS, "1") == "0":
        return False
    if device.index not in (None, 0):
        # triton launches on a second GPU of one process failed here (kernels loaded for one
        # device's context, launched from another's); give each worker its GPU with
        # CUDA_VISIBLE_DEVICES instead, as `python -m pdmesh.bench pd-vs-agg` does
        log.warning(
            "%s: CUDA kernels and graphs run only on a process's first GPU; running plain "
            "torch ops (slower). Start the worker with CUDA_VISIBLE_DEVICES=%d --device cuda",
            device,
            device.index,
        )
        return False
    if head_dim < 16 or head_dim & (head_dim - 1):
        log.info("head_dim %d is not a power of two >= 16: decode attention runs SDPA", head_dim)
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("triton is not installed: decode attention runs SDPA over gathered pages")
        return False
    return True


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to ``max_batch`` (padding wastes at most 7 rows)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner = runner
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        dev = runner.device
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_table = torch.zeros(n, runner.max_pages_per_seq, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:batch],
            num_decode=batch,
            decode_slots=None,
            decode_mask=None,
            prefills=[],
            block_table=self.block_table[:batch],
            context_lens=self.context_lens[:batch],
            page_size=self.runner.page_size,
            page_stride=self.runner.page_stride,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        r = self.runner
        meta = self._meta(batch)
        hidden = r.model(self.input_ids[:batch], self.positions[:batch], r.kv_cache, meta, r.rope)
        return r.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # slots -1 and lengths 0: capturing runs the kernels once, and must touch no page
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the triton kernels, warms cuBLAS for every size
                for b in self.sizes:
                    self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        for b in reversed(self.sizes):  # largest first: the smaller ones reuse its memory
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()
        log.info("captured CUDA graphs of decode steps for batch sizes %s", self.sizes)

    def fits(self, meta: AttentionMetadata, num_rows: int) -> bool:
        return (
            not meta.prefills
            and meta.num_decode == num_rows
            and 0 < num_rows <= self.max_batch
            and meta.block_table is not None
            and meta.block_table.shape[1] <= self.block_table.shape[1]
        )

    def replay(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Logits [B, vocab] of the B decode rows described by the arguments."""
        assert meta.block_table is not None and meta.context_lens is not None
        b = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= b)
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slots[:b].copy_(meta.slot_mapping)
        self.slots[b:size].fill_(-1)
        self.block_table[:b, : meta.block_table.shape[1]].copy_(meta.block_table)
        self.context_lens[:b].copy_(meta.context_lens)
        self.context_lens[b:size].fill_(0)
        self.graphs[size].replay()
        return self.logits[size][:b]
