"""``Coalescer``: replies waiting for their client, merged per request while the client (its
gRPC write) is slower than the worker's steps.

A writer that sends one message per reply falls behind when its client reads slowly or the
router's loop is busy, and then queues one message per token. Here a producer ``put``s each
reply; the writer takes everything pending at once (``take``), one entry per request: text
concatenated, token ids and logprobs appended, the last finish, usage and stop kept. The
client then gets fewer, larger messages exactly when it cannot keep up, and never waits for
another request's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

from pdmesh.v1 import common_pb2, router_pb2


class Coalescer:
    def __init__(self) -> None:
        self._pending: dict[Hashable, router_pb2.RouterGenerateResponse] = {}
        self._ready = asyncio.Event()

    def put(self, key: Hashable, reply: router_pb2.RouterGenerateResponse) -> None:
        before = self._pending.get(key)
        if before is None:
            self._pending[key] = reply
        else:
            merge(before, reply)
        self._ready.set()

    def __len__(self) -> int:
        return len(self._pending)

    def drop(self, key: Hashable) -> None:
        self._pending.pop(key, None)

    def wake(self) -> None:
        """Let ``wait`` return (the writer re-checks whether it is done)."""
        self._ready.set()

    async def wait(self) -> None:
        await self._ready.wait()
        self._ready.clear()

    def take(self) -> list[router_pb2.RouterGenerateResponse]:
        """Everything pending, in the order the requests first had something."""
        replies, self._pending = list(self._pending.values()), {}
        return replies


def merge(
    into: router_pb2.RouterGenerateResponse, later: router_pb2.RouterGenerateResponse
) -> None:
    """``later`` appended to ``into``."""
    if later.HasField("status"):
        into.CopyFrom(later)  # a failure ends the request: what came before is moot
        return
    into.text += later.text
    if later.reasoning_text:
        into.reasoning_text += later.reasoning_text
    if later.tool_calls:
        into.tool_calls.extend(later.tool_calls)  # deltas in order; readers join per index
    into.token_ids.extend(later.token_ids)
    into.logprobs.extend(later.logprobs)
    into.worker_id = later.worker_id
    if later.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
        into.finish_reason = later.finish_reason
    if later.HasField("usage"):
        into.usage.CopyFrom(later.usage)
    if later.HasField("matched_stop"):
        into.matched_stop = later.matched_stop
    if later.HasField("error"):
        into.error = later.error
