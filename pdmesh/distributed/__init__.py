"""Tensor parallelism's process group: ranks, collectives with deadlines (``group``)."""

from pdmesh.distributed.group import TPGroup

__all__ = ["TPGroup"]
