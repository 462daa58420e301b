"""CUDA graphs of decode steps, the switch to the CUDA kernels, and host <-> device copies that
do not wait for the GPU.

A decode step of a large model on a fast GPU is a few milliseconds of memory reads spread over
hundreds of small kernels; launched one by one from Python, the launches take longer than the
reads (an 8B model on an H200: ~15 ms eager against a 3.7 ms roofline). So pure-decode steps
replay a graph captured once per batch size: the inputs are copied into static buffers, the batch
is padded up to the next captured size (padding rows write their K/V nowhere and attend to
nothing), and the graph runs the whole forward plus the logits. Steps with prefill chunks run
eagerly; they are long enough for launches not to matter.

The graph's inputs are one [4, batch] block (token ids, positions, new tokens' slots, context
lengths: the host computes them with numpy and pads the batch, slot -1 and length 0) and the block
table: a step copies two buffers (three when its ids come from the previous step's tokens on the
device), and the graph itself runs no small index kernels.

NOTE: with the overlap schedule the host prepares step N+1 while the GPU still runs step N, so
nothing on that path may synchronize the stream: ``torch.tensor(list, device="cuda")`` and
``tensor.tolist()`` both do (a pageable host buffer; a blocking copy). ``to_device`` and
``to_host`` copy through pinned memory without waiting, and ``TransferFence`` waits for the
copies of one step only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pdmesh.layers.attention import AttentionMetadata

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
        # CUDA_VISIBLE_DEVICES instead, as `python -m benchmarks pd-vs-agg` does
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


class TransferFence:
    """The end of one step's device-to-host copies (nothing to wait for off CUDA)."""

    def __init__(self, event: torch.cuda.Event | None) -> None:
        self._event = event

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()  # releases the GIL while it waits


def record_fence(device: torch.device) -> TransferFence:
    """A fence at the end of the work queued so far (a no-op off CUDA)."""
    if device.type != "cuda":
        return TransferFence(None)
    event = torch.cuda.Event()
    event.record()
    return TransferFence(event)


def to_device(
    values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``torch.tensor(values, device=device)`` without synchronizing the stream (module NOTE)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    # the caching host allocator keeps the pinned block until the copy has run
    host = torch.tensor(values, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


def pinned_empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host buffer that a non-blocking copy to ``device`` can read (pinned on CUDA)."""
    return torch.empty(n, dtype=dtype, pin_memory=device.type == "cuda")


def to_host(parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], TransferFence]:
    """Queue copies of ``parts`` into pinned host memory behind the work that computes them."""
    if not parts or parts[0].device.type != "cuda":
        return parts, TransferFence(None)
    host = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in parts]
    for h, p in zip(host, parts):
        h.copy_(p, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, TransferFence(event)


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner = runner
        self.sizes = graph_batch_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        dev = runner.device
        n = self.max_batch
        # rows: token ids, positions, slots, context lengths (``decode_rows``); slot -1 and
        # length 0 for now: capturing runs the kernels once, and must touch no page
        self.inputs = torch.zeros(4, n, dtype=torch.long, device=dev)
        self.inputs[2].fill_(-1)
        self.block_table = torch.zeros(n, runner.max_pages_per_seq, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    def size_for(self, batch: int) -> int:
        """The captured batch size that ``batch`` rows are padded to."""
        return next(s for s in self.sizes if s >= batch)

    def _forward(self, batch: int) -> torch.Tensor:
        r = self.runner
        ids, pos, slots, ctx = self.inputs[:, :batch]
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decode=batch,
            decode_slots=None,
            decode_mask=None,
            prefills=[],
            block_table=self.block_table[:batch],
            context_lens=ctx.to(torch.int32),
            page_size=r.page_size,
            page_stride=r.page_stride,
        )
        hidden = r.model(ids, pos, r.kv_cache, meta, r.rope)
        return r.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
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

    def fits(self, num_rows: int, table_width: int) -> bool:
        return 0 < num_rows <= self.max_batch and table_width <= self.block_table.shape[1]

    def replay(
        self, rows: torch.Tensor, block_table: torch.Tensor, input_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Logits [B, vocab] of B decode rows, all on the device: ``rows`` [4, size] as
        ``decode_rows`` lays them out (padded to the captured ``size``), their block table
        [B, pages] (int32 or int64), and token ids [B] that replace the ones in ``rows``.

        The copies into the static buffers are queued behind the step before on the same
        stream, so they never change an input that a replay in flight still reads.
        """
        size = rows.shape[1]
        b, width = block_table.shape
        self.inputs[:, :size].copy_(rows)
        if input_ids is not None:
            self.inputs[0, :b].copy_(input_ids)
        # columns past ``width`` keep older page ids: a row reads only its context's pages
        self.block_table[:b, :width].copy_(block_table)
        self.graphs[size].replay()
        return self.logits[size][:b]


def decode_rows(
    ids: list[int],
    positions: np.ndarray,
    table: np.ndarray,
    page_size: int,
    page_stride: int,
    size: int,
) -> np.ndarray:
    """[4, size] int64 rows of B decode rows padded to ``size``: token ids, positions, the new
    token's slot (-1 in padding: written nowhere) and the context length (0: attends to
    nothing). ``table`` is their [B, pages] block table."""
    b = len(ids)
    out = np.zeros((4, size), dtype=np.int64)
    out[2, b:] = -1
    out[0, :b] = ids
    out[1, :b] = positions
    page = table[np.arange(b), positions // page_size]
    out[2, :b] = page * page_stride + positions % page_size
    out[3, :b] = positions + 1
    return out
