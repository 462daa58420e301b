"""``EngineProcess``: the engine in a process of its own behind ``AsyncEngine``'s API, on the
default model. Outputs equal the in-process engine's (streams and sinks, a grammar compiled in
the engine process), typed errors cross the pipe with their field, pages are freed, and either
side's death is seen by the other: a killed engine process fails every stream and call with
``EngineDeadError`` and calls ``on_death``; a killed worker process takes its engine with it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from pdmesh.engine import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from pdmesh.engine.engine_process import EngineProcess
from pdmesh.errors import EngineDeadError, InvalidRequestError
from tests.engine.conftest import run_all, tokens_of

pytestmark = pytest.mark.model

CONFIG = EngineConfig(device="cpu", dtype="float32", num_pages=128, max_model_len=512)
GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
PROMPTS = [[1, 504, 3458, 28], [2, 17, 9], [1, 3, 5, 7, 11, 13, 17, 19, 23]]
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
)
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def expected() -> dict[str, list[int]]:
    engine = LLMEngine(CONFIG)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY)
    engine.add_request("json", PROMPTS[0], SamplingParams(temperature=0, json_schema=SCHEMA))
    return {rid: tokens_of(outs) for rid, outs in run_all(engine).items()}


@pytest.fixture(scope="module")
def launched() -> Iterator[EngineProcess]:
    engine = EngineProcess(CONFIG)
    engine.launch(timeout=120)
    yield engine
    engine.shutdown()


async def _collect(
    engine: EngineProcess, rid: str, prompt: list[int], p: SamplingParams
) -> list[int]:
    return [t async for out in engine.generate(rid, prompt, p) for t in out.new_token_ids]


class _Sink:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.done = asyncio.Event()
        self.error: BaseException | None = None

    def deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self.tokens += out.new_token_ids
            if out.finished:
                self.done.set()

    def fail(self, request_id: str, error: BaseException) -> None:
        self.error = error
        self.done.set()


async def _idle(engine: EngineProcess) -> None:
    async with asyncio.timeout(5):
        while True:
            load = await engine.load()
            if load.num_running == load.num_waiting == 0:
                assert load.num_free_pages == load.num_total_pages
                return
            await asyncio.sleep(0.02)


def test_outputs_equal_the_in_process_engine_and_errors_keep_their_field(
    launched: EngineProcess, expected: dict[str, list[int]]
) -> None:
    info = launched.info
    assert info.max_model_len == 512 and info.kv_layout().page_size == CONFIG.page_size

    async def main() -> None:
        launched.start()
        sink = _Sink()
        launched.start_into("r2", PROMPTS[2], GREEDY, sink)
        got = await asyncio.gather(
            _collect(launched, "r0", PROMPTS[0], GREEDY),
            _collect(launched, "r1", PROMPTS[1], GREEDY),
            # the grammar compiles in the engine process, off its step loop
            _collect(
                launched, "json", PROMPTS[0], SamplingParams(temperature=0, json_schema=SCHEMA)
            ),
        )
        async with asyncio.timeout(TIMEOUT_S):
            await sink.done.wait()
        assert sink.error is None
        assert got == [expected["r0"], expected["r1"], expected["json"]]
        assert sink.tokens == expected["r2"]

        with pytest.raises(InvalidRequestError) as bad:
            await _collect(launched, "bad", [1, 2], SamplingParams(top_p=5.0))
        assert bad.value.field == "sampling_params.top_p"
        with pytest.raises(InvalidRequestError) as schema:
            await _collect(launched, "schema", [1, 2], SamplingParams(json_schema="{not json"))
        assert schema.value.field.startswith("sampling_params.json_schema")
        bad_sink = _Sink()
        launched.start_into("bad-sink", [1, 2], SamplingParams(top_k=-5), bad_sink)
        async with asyncio.timeout(TIMEOUT_S):
            await bad_sink.done.wait()
        assert isinstance(bad_sink.error, InvalidRequestError)

        # a stream closed early aborts its request; an unknown id is not found
        stream = launched.generate(
            "long", PROMPTS[0], SamplingParams(max_new_tokens=400, ignore_eos=True)
        )
        async for _ in stream:
            break
        await stream.aclose()
        assert await launched.abort("no-such-request") is False
        await _idle(launched)

    asyncio.run(main())


def test_a_killed_engine_process_fails_every_stream_and_call() -> None:
    deaths: list[BaseException] = []
    engine = EngineProcess(CONFIG, on_death=deaths.append)
    engine.launch(timeout=120)
    pid = engine.pid
    assert pid is not None

    async def main() -> None:
        engine.start()
        stream = engine.generate(
            "long", PROMPTS[0], SamplingParams(max_new_tokens=400, ignore_eos=True)
        )
        async for _ in stream:
            os.kill(pid, signal.SIGKILL)
            break
        with pytest.raises(EngineDeadError, match="exit code -9"):
            async with asyncio.timeout(TIMEOUT_S):
                async for _ in stream:
                    pass
        async with asyncio.timeout(TIMEOUT_S):
            while not deaths:
                await asyncio.sleep(0.02)
        with pytest.raises(EngineDeadError):
            await engine.load()

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert len(deaths) == 1 and isinstance(deaths[0], EngineDeadError)


def test_the_engine_process_exits_when_its_worker_is_killed() -> None:
    script = textwrap.dedent(
        f"""
        import time
        from pdmesh.engine import EngineConfig
        from pdmesh.engine.engine_process import EngineProcess
        if __name__ == "__main__":
            engine = EngineProcess(EngineConfig(device="cpu", dtype="float32", num_pages=32,
                                                max_model_len=256))
            engine.launch(timeout=120)
            print(engine.pid, flush=True)
            time.sleep({TIMEOUT_S})
        """
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
        worker.kill()
        worker.wait(TIMEOUT_S)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child), "the engine process outlived its worker"
    finally:
        worker.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie is gone, not yet reaped
    except FileNotFoundError:
        return False
