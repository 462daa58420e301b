"""``TPGroup``: this process's place in a tensor-parallel worker and the collectives its forward
needs (one all-reduce after each row-parallel projection, one all-gather of the logits).

A worker of TP size N is N processes, one per device, joined by ``torch.distributed`` (NCCL on
CUDA, gloo on CPU). Every collective is bounded by the group's timeout: a rank that died makes
the others' next collective raise instead of hanging, so the worker goes down as one unit.
``TPGroup.single()`` (size 1) is what every non-TP engine uses: its collectives return their
input and touch no process group.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0  # a collective that waits longer means a rank is gone


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    # None for size 1, else the default process group of init_process_group
    group: dist.ProcessGroup | None = None
    # gloo, for host-side messages (the step's commands, agreeing on sizes) also when the
    # tensors' group is NCCL; the same group on CPU
    control: dist.ProcessGroup | None = None

    @classmethod
    def single(cls) -> TPGroup:
        return cls(0, 1)

    @classmethod
    def join(
        cls,
        rank: int,
        size: int,
        init_method: str,
        device: torch.device,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TPGroup:
        """Join the ``size`` ranks rendezvousing at ``init_method`` (``tcp://host:port``):
        NCCL for a CUDA device, gloo otherwise. Raises if the others do not come within
        ``timeout_s``."""
        if size == 1:
            return cls.single()
        if not 0 <= rank < size:
            raise ValueError(f"tp rank {rank} is not in [0, {size})")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's streams and the captured graphs use it
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        world = dist.group.WORLD
        control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else world
        log.info("tp rank %d of %d joined (%s, %s)", rank, size, backend, init_method)
        return cls(rank, size, world, control)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks, in place (the row-parallel projections' partial sums)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` concatenated along the last dimension, in rank order (the
        vocabulary shards of the logits)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: object | None) -> object:
        """Rank 0's ``obj`` on every rank (the other ranks pass None), over the control
        group: raises once the group's timeout passes without rank 0."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def min_int(self, value: int) -> int:
        """The least of the ranks' ``value`` (sizes every rank must agree on: KV pages)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
