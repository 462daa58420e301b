from __future__ import annotations

import asyncio

import pytest

from pdmesh.engine import AsyncEngine, FinishReason, InvalidRequestError, SamplingParams
from tests.engine.conftest import EngineFactory

PARAMS = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)


async def collect(engine: AsyncEngine, rid: str, prompt: list[int]) -> list[int]:
    return [t async for out in engine.generate(rid, prompt, PARAMS) for t in out.new_token_ids]


async def wait_idle(engine: AsyncEngine, timeout: float = 1.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            load = await engine.load()
            if load.num_running == load.num_waiting == 0:
                assert load.num_free_pages == load.num_total_pages
                return
            await asyncio.sleep(0.01)


def test_concurrent_streams_match_sync_engine(make_tiny_engine: EngineFactory) -> None:
    sync = make_tiny_engine()
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8]]
    for i, p in enumerate(prompts):
        sync.add_request(f"r{i}", p, PARAMS)
    expected: dict[str, list[int]] = {}
    while sync.has_work:
        for o in sync.step():
            expected.setdefault(o.request_id, []).extend(o.new_token_ids)

    async def main() -> list[list[int]]:
        engine = AsyncEngine(make_tiny_engine())
        engine.start()
        try:
            return await asyncio.gather(
                *(collect(engine, f"r{i}", p) for i, p in enumerate(prompts))
            )
        finally:
            engine.shutdown()

    assert asyncio.run(main()) == [expected[f"r{i}"] for i in range(len(prompts))]


def test_closing_the_stream_aborts_and_frees_pages(make_tiny_engine: EngineFactory) -> None:
    async def main() -> None:
        engine = AsyncEngine(make_tiny_engine())
        engine.start()
        try:
            params = SamplingParams(temperature=0, max_new_tokens=10_000, ignore_eos=True)
            stream = engine.generate("long", [1, 2, 3], params)
            async for _ in stream:
                break
            await stream.aclose()  # what a disconnected client's cancellation does
            await wait_idle(engine)
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_cancelled_task_aborts(make_tiny_engine: EngineFactory) -> None:
    async def main() -> None:
        engine = AsyncEngine(make_tiny_engine())
        engine.start()
        try:
            params = SamplingParams(temperature=0, max_new_tokens=10_000, ignore_eos=True)

            async def consume() -> None:
                async for _ in engine.generate("long", [1, 2, 3], params):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_idle(engine)
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_errors_and_abort(make_tiny_engine: EngineFactory) -> None:
    async def main() -> None:
        engine = AsyncEngine(make_tiny_engine())
        engine.start()
        try:
            with pytest.raises(InvalidRequestError, match="prompt"):
                await collect(engine, "bad", [])
            params = SamplingParams(temperature=0, max_new_tokens=10_000, ignore_eos=True)
            outs = []

            async def consume() -> None:
                async for out in engine.generate("a", [1, 2], params):
                    outs.append(out)

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.1)
            assert await engine.abort("a")
            await asyncio.wait_for(task, 2)
            assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ABORT
            assert await collect(engine, "ok", [1, 2])  # still serving
            live = engine.generate("dup", [1, 2], params)
            first = await live.__anext__()
            with pytest.raises(InvalidRequestError, match="request_id"):
                await collect(engine, "dup", [3, 4])
            second = await live.__anext__()  # the live request is untouched
            assert first.request_id == second.request_id == "dup" and not second.finished
            await live.aclose()
        finally:
            engine.shutdown()

    asyncio.run(main())
