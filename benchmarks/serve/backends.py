"""What every backend does: open a connection, stream one request into a ``RequestResult``.

``send`` never raises for a failed request: timeouts, HTTP errors, gRPC statuses and error
events become a failed result with a message, so one bad request cannot stop a run. Only
``start`` raises (``BackendError``), when the server cannot be used at all.
"""

from __future__ import annotations

import abc
import asyncio
from types import TracebackType
from typing import Any

from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.timing import RequestResult, StreamClock

# How long start() waits for the server to answer before the run is abandoned.
CONNECT_TIMEOUT_S = 10.0


class BackendError(RuntimeError):
    """The server cannot be used (unreachable, no model); the message says what to check."""


class Backend(abc.ABC):
    """One client for a whole run; ``send`` may be awaited many times concurrently."""

    def __init__(self, cfg: ServeBenchConfig) -> None:
        self.timeout = cfg.request_timeout
        self.temperature = cfg.temperature
        self.ignore_eos = cfg.ignore_eos
        self.extra: dict[str, Any] = cfg.extra_body()
        self.model = ""  # the model requests name, where the protocol has one

    @property
    @abc.abstractmethod
    def target(self) -> str:
        """Where requests go, for the report."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect, and check the server answers; raises ``BackendError``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    @abc.abstractmethod
    async def _stream(
        self, req: BenchRequest, request_id: str, clock: StreamClock, result: RequestResult
    ) -> RequestResult:
        """Send ``req`` and consume its stream, reporting chunks to ``clock``."""

    async def send(self, req: BenchRequest, request_id: str) -> RequestResult:
        """Run one request to completion or failure, within ``--request-timeout``."""
        result = RequestResult(req.index, req.prompt_len, req.output_len)
        clock = StreamClock()
        result.start_s = clock.start  # absolute; the runner makes it relative to the run
        try:
            # wait_for cancels the stream on timeout, which closes the connection / cancels the
            # RPC, so the server frees the request instead of finishing it for nobody.
            return await asyncio.wait_for(
                self._stream(req, request_id, clock, result), self.timeout
            )
        except asyncio.TimeoutError:
            return clock.fail(result, f"timed out after {self.timeout:g} s")
        except Exception as e:  # any client error is this request's failure, not the run's
            return clock.fail(result, f"{type(e).__name__}: {e}")

    async def __aenter__(self) -> Backend:
        try:
            await self.start()
        except BaseException:
            await self.close()  # __aexit__ does not run when __aenter__ raises
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def make_backend(cfg: ServeBenchConfig) -> Backend:
    """The backend ``--backend`` names (imported lazily: each pulls in its own client)."""
    if cfg.backend == "grpc":
        from benchmarks.serve.grpc_backend import GrpcBackend

        return GrpcBackend(cfg)
    from benchmarks.serve.openai_backend import OpenAIBackend

    return OpenAIBackend(cfg, chat=cfg.backend == "openai-chat")
