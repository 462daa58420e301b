"""Serving many requests over one long-lived bidirectional stream (``WorkerService.Stream``,
``RouterService.Stream``): what the two sides' sessions share.

A ``MultiplexSession`` reads the caller's ``generate`` / ``cancel`` messages (each message's
oneof ``kind``) and yields batches of outputs; ``Sessions`` runs one per call — the reader as a
task, the handler's own loop as the writer — stops every request still open when the call ends
however it ends, and tells them all when the server starts draining.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

import grpc.aio

Response = TypeVar("Response")


class MultiplexSession(abc.ABC, Generic[Response]):
    async def read(self, requests: AsyncIterator[Any]) -> None:
        """Take the caller's messages until it half-closes the stream."""
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "generate":
                    self.start(message)
                elif kind == "cancel":
                    self.cancel(message)
        finally:
            self.requests_ended()

    @abc.abstractmethod
    def start(self, message: Any) -> None:
        """A ``generate`` message: start its request."""

    @abc.abstractmethod
    def cancel(self, message: Any) -> None:
        """A ``cancel`` message: stop its request (no more outputs for it)."""

    @abc.abstractmethod
    def requests_ended(self) -> None:
        """The caller sends no more; the session ends once its requests are done."""

    @abc.abstractmethod
    def batches(self) -> AsyncIterator[Response]:
        """What to send, as it becomes ready; ends when the session is done."""

    @abc.abstractmethod
    def drain(self) -> None:
        """The server is stopping: refuse new requests, end once the open ones are done."""

    @abc.abstractmethod
    def close(self) -> None:
        """The call ended: stop every request still open."""


Session = TypeVar("Session", bound=MultiplexSession[Any])


class Sessions(Generic[Session]):
    """The open multiplexed calls of one servicer."""

    def __init__(self) -> None:
        self._open: set[Session] = set()

    async def serve(
        self,
        session: Session,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[Any]:
        """The handler's body: yields ``session``'s batches until it is done."""
        await context.send_initial_metadata(())  # the caller learns at once that it exists
        self._open.add(session)
        reader = asyncio.ensure_future(session.read(requests))
        try:
            async for batch in session.batches():
                yield batch
        finally:
            reader.cancel()
            session.close()
            self._open.discard(session)

    def drain(self) -> None:
        for session in list(self._open):
            session.drain()
