"""Typed errors every pdmesh component raises on purpose (torch-free, so light services load fast).

Services map them once, at their gRPC/HTTP boundary: ``InvalidRequestError`` →
INVALID_ARGUMENT / HTTP 400, ``ResourceExhaustedError`` → RESOURCE_EXHAUSTED / HTTP 429,
``RequestNotFoundError`` → NOT_FOUND, ``EngineDeadError`` / ``PeerUnavailableError`` →
UNAVAILABLE, ``FailedPreconditionError`` → FAILED_PRECONDITION, ``DeadlineExceededError`` →
DEADLINE_EXCEEDED, ``AbortedError`` → ABORTED.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    # ``ErrorDetail.code`` on the wire, for causes the status code alone does not tell apart
    # (e.g. "queue_timeout": a DEADLINE_EXCEEDED from the router's queue, not a worker)
    error_code: str = ""


class InvalidRequestError(EngineError, ValueError):
    """A request field is invalid; ``field`` names it (e.g. ``sampling_params.top_p``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[type[InvalidRequestError], tuple[str, str]]:
        # pickled across the engine process's pipe: rebuilt from both arguments, not ``args``
        return type(self), (self.field, self.message)


class ResourceExhaustedError(EngineError):
    """The request can never fit (e.g. it needs more KV pages than the pool holds)."""


class RequestNotFoundError(EngineError, KeyError):
    """No request with that id is known to the engine."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "request not found"


class EngineDeadError(EngineError):
    """The engine loop stopped (crashed or shut down); no more requests are served."""


class FailedPreconditionError(EngineError):
    """The request cannot run against the system as it is (e.g. a decode worker whose KV layout
    does not match the prefill's); retrying unchanged fails the same way."""


class PeerUnavailableError(EngineError):
    """A process the request depends on is gone or unreachable (e.g. a lost prefill worker);
    the message names it. The request may succeed elsewhere."""


class DeadlineExceededError(EngineError):
    """A wait inside the server ran past its own deadline (e.g. the PD bootstrap or waiting
    timeout); the message names what did not arrive in time."""


class AbortedError(EngineError):
    """The other half of a disaggregated request gave up (cancelled or failed) first."""
