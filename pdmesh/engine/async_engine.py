"""``AsyncEngine``: the asyncio face of the engine, for the gRPC services.

NOTE: one thread owns the ``LLMEngine``. Everything that touches it — adding, aborting, the PD
hooks, load figures — is a command queued to that thread and run between steps, so the engine
needs no locks and the event loop never blocks on the model. Step outputs go back to the loop in
one ``call_soon_threadsafe`` per step and are fanned out to per-request queues, or handed, one
list per step, to the ``OutputSink`` a request was started into (``start_into``: what a stream
that carries many requests uses, so a step costs it one call, not one wake-up per request).

Everything asked of the engine is a ``Command``: an ``LLMEngine`` method's name and its
arguments. Here they run on the engine thread; ``EngineProcess`` (``engine_process``) sends the
same commands to an engine in a process of its own. A command that starts a request (``STARTS``)
has its first output emitted like a step's, so it reaches the request's queue or sink ahead of
every later one whichever way the engine runs.

A request with a grammar has it compiled on this class's own small thread pool before the
request reaches the engine thread (``prepare``): compiling takes ~1 ms for a JSON schema but can
take 100s of ms for a large grammar (and the first one builds llguidance's tokenizer, ~0.7 s),
and on the engine thread that would stall every running request's next step. The engine then
finds it in its cache; a grammar that cannot compile fails there, before the request is
admitted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar, cast

from pdmesh.engine.config import EngineConfig
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.outputs import EngineLoad, RequestOutput
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import TokenLogprob
from pdmesh.errors import EngineDeadError, InvalidRequestError
from pdmesh.models.source import ModelSource

log = logging.getLogger(__name__)
T = TypeVar("T")

# an LLMEngine method's name and its positional arguments
Command = tuple[str, tuple[Any, ...]]
# the commands that start a request: their result is its first output (or None)
STARTS = frozenset({"add_request", "start_decode"})

_IDLE_WAIT_S = 0.05  # how long the idle engine thread sleeps on its command queue


class EngineInfo(Protocol):
    """The facts of a loaded engine the services read once at startup (``LLMEngine`` has
    them; ``EngineProcess`` has a copy sent by its engine process)."""

    @property
    def source(self) -> ModelSource: ...
    @property
    def config(self) -> EngineConfig: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def max_model_len(self) -> int: ...
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    def kv_layout(self) -> KVLayout: ...


class OutputSink(Protocol):
    """Where the outputs of requests started with ``start_into`` go, on the event loop."""

    def deliver(self, outputs: list[RequestOutput]) -> None:
        """This sink's outputs of one engine step, in order (a request's last has
        ``finished``)."""

    def fail(self, request_id: str, error: BaseException) -> None:
        """``request_id`` could not start (a typed error) or the engine died under it."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            queue.Queue()
        )
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._sinks: dict[str, OutputSink] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        # grammar compiles (see the module docstring); llguidance drops the GIL while compiling
        self._compile_pool = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="pdmesh-grammar"
        )

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pdmesh-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._compile_pool.shutdown(wait=False, cancel_futures=True)

    async def prepare(self, params: SamplingParams) -> None:
        """Compile ``params``' grammar (if any, and not cached) off the engine thread; raises
        ``InvalidRequestError`` naming the field when it cannot compile."""
        compile_now = self._compile_job(params)
        if compile_now is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._compile_pool, compile_now)

    def _compile_job(self, params: SamplingParams) -> Callable[[], object] | None:
        constraint = params.constraint
        if constraint is None or self.engine.grammars.cached(*constraint):
            return None
        return functools.partial(self.engine.grammars.compile, *constraint)

    async def allocate_incoming(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> list[int]:
        """PD decode side: ``LLMEngine.allocate_incoming`` with the grammar compiled first."""
        await self.prepare(params)
        return cast(
            "list[int]",
            await self._command("allocate_incoming", request_id, prompt_token_ids, params),
        )

    # -- public API -----------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early aborts the request.

        Raises the engine's typed errors (``InvalidRequestError``…) before the first output.
        """
        await self.prepare(params)
        start = ("add_request", (request_id, prompt_token_ids, params, prefill_only))
        async for out in self._stream(request_id, start):
            yield out

    async def decode_incoming(
        self, request_id: str, first_token: int, logprob: TokenLogprob | None
    ) -> AsyncIterator[RequestOutput]:
        """PD decode side: ``start_decode`` a request whose pages ``allocate_incoming`` reserved
        and whose KV has arrived, then stream its outputs, the first token first."""
        start = ("start_decode", (request_id, first_token, logprob))
        async for out in self._stream(request_id, start):
            yield out

    async def _stream(self, request_id: str, start: Command) -> AsyncIterator[RequestOutput]:
        # the queue is registered before ``start`` runs: the engine thread may step, and
        # dispatch this request's next outputs, before the event loop resumes this coroutine
        if request_id in self._streams:  # the live request's outputs would go to this caller
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        finished = False
        try:
            await asyncio.wrap_future(self._send(start))  # its first output is in ``stream``
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not finished:
                # the caller went away (cancelled, disconnected) or the request failed to start
                self.abort_soon(request_id)

    def start_into(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sink: OutputSink,
    ) -> None:
        """Start a request whose outputs go to ``sink`` (its errors, even the engine's
        validation, to ``sink.fail``); returns at once. ``detach`` stops it early."""
        if request_id in self._streams or request_id in self._sinks:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        self._sinks[request_id] = sink
        start: Command = ("add_request", (request_id, prompt_token_ids, params, False))
        compile_now = self._compile_job(params)
        if compile_now is None:
            self._start_sink(request_id, start)
            return
        compiling = asyncio.wrap_future(self._compile_pool.submit(compile_now))
        compiling.add_done_callback(lambda f: self._compiled(request_id, start, f))

    def _compiled(self, request_id: str, start: Command, future: asyncio.Future[object]) -> None:
        # on the loop: a bad grammar fails the sink; a good one starts the request unless it
        # was detached meanwhile (its abort ran before the request existed)
        error = EngineDeadError("engine shut down") if future.cancelled() else future.exception()
        if error is not None:
            self._fail_sink(request_id, error)
        elif request_id in self._sinks:
            self._start_sink(request_id, start)

    def _start_sink(self, request_id: str, start: Command) -> None:
        future = self._send(start)
        future.add_done_callback(lambda f: self._started(request_id, f))

    def detach(self, request_id: str) -> None:
        """Stop a request started with ``start_into``: no more outputs, its pages freed."""
        if self._sinks.pop(request_id, None) is not None:
            self.abort_soon(request_id)

    def _started(self, request_id: str, future: concurrent.futures.Future[Any]) -> None:
        # on the engine thread (or the caller's, when the engine is dead)
        error = future.exception()
        if error is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_sink, request_id, error)

    def _fail_sink(self, request_id: str, error: BaseException) -> None:
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink.fail(request_id, error)

    def abort_soon(self, request_id: str) -> None:
        """Abort ``request_id`` without waiting (from callbacks and cancelled tasks); a no-op
        for an unknown or finished request."""
        if self._dead is None:
            self._send(("abort", (request_id,)))

    async def abort(self, request_id: str) -> bool:
        return cast(bool, await self._command("abort", request_id))

    async def load(self) -> EngineLoad:
        return cast(EngineLoad, await self._command("load"))

    @property
    def info(self) -> EngineInfo:
        """What the engine serves (model, vocabulary, context, KV layout): fixed once loaded."""
        return self.engine

    async def _command(self, name: str, *args: Any) -> Any:
        return await asyncio.wrap_future(self._send((name, args)))

    def _send(self, command: Command) -> concurrent.futures.Future[Any]:
        """Queue ``command`` for the engine; a start's first output is emitted, not returned
        (the engine thread emits it before any later step's: both travel by
        call_soon_threadsafe, in that thread's order)."""
        name, args = command
        method = getattr(self.engine, name)
        if name in STARTS:
            return self._submit(lambda: self._emit_first(method(*args)))
        return self._submit(lambda: method(*args))

    def _emit_first(self, first: RequestOutput | None) -> None:
        if first is not None:
            self._emit([first])

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread between steps and return its result."""
        return await asyncio.wrap_future(self._submit(lambda: fn(*args)))

    # -- engine thread --------------------------------------------------------------------

    def _submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._dead is not None:
            fut.set_exception(EngineDeadError(f"engine stopped: {self._dead}"))
        else:
            self._commands.put((fn, fut))
        return fut

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                # block (briefly) when idle or stalled on pages, instead of spinning a core
                self._run_commands(block=not self.engine.has_work or self.engine.stalled)
                if self.engine.has_work:
                    outputs = self.engine.step()
                    if outputs:
                        self._emit(outputs)
        except BaseException as e:  # the engine is unusable: fail every stream and caller
            log.exception("engine loop crashed")
            self._dead = e
            self._fail_all(EngineDeadError(f"engine loop crashed: {e!r}"))
            return
        self._dead = EngineDeadError("engine shut down")
        self._fail_all(self._dead)

    def _run_commands(self, block: bool) -> None:
        try:
            item = (
                self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
            )
        except queue.Empty:
            return
        while True:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:  # a typed error for the caller, not an engine failure
                    fut.set_exception(e)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _emit(self, outputs: list[RequestOutput]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        batches: dict[int, tuple[OutputSink, list[RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)
                continue
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue  # detached, or its stream gone
            if out.finished:
                del self._sinks[out.request_id]
            batch = batches.get(id(sink))
            if batch is None:
                batches[id(sink)] = (sink, [out])
            else:
                batch[1].append(out)
        for sink, batch_outputs in batches.values():
            sink.deliver(batch_outputs)

    def _fail_all(self, error: BaseException) -> None:
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(error)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_streams, error)

    def _fail_streams(self, error: BaseException) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            sink.fail(request_id, error)
