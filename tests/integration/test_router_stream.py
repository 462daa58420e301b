"""``RouterService.Stream`` (what the gateway uses: many generations over one stream) against a
real router, tokenizer and worker with the real default model: the same text and tokens as
``Generate``, one request's error or cancel touches no other, a cancel frees its pages within a
second while others stream on, and the stream ending cancels what is left on it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from pdmesh.engine import EngineConfig, LLMEngine, SamplingParams
from pdmesh.tokenizer import Tokenizer
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2_grpc
from tests.integration.procs import ServiceProc, start_service
from tests.integration.test_worker_service import wait_until_idle

pytestmark = pytest.mark.model

TEXT = "The capital of France is"
Entries = dict[int, list[router_pb2.RouterGenerateResponse]]


def text_request(text: str = TEXT, **params: Any) -> router_pb2.RouterGenerateRequest:
    return router_pb2.RouterGenerateRequest(
        text=text, sampling_params=common_pb2.SamplingParams(**params)
    )


def ended(entry: router_pb2.RouterGenerateResponse) -> bool:
    return entry.HasField("status") or entry.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


async def run_stream(
    address: str,
    requests: dict[int, router_pb2.RouterGenerateRequest],
    wait_for: set[int],
    on_entry: Any = None,
) -> tuple[Entries, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = router_pb2_grpc.RouterServiceStub(channel).Stream(timeout=120)
        for tag, request in requests.items():
            await call.write(router_pb2.RouterStreamRequest(tag=tag, generate=request))
        entries: Entries = {}
        num_messages = 0
        open_tags = set(wait_for)
        async for message in call:
            num_messages += 1
            for entry in message.outputs:
                entries.setdefault(entry.tag, []).append(entry)
                if on_entry is not None:
                    await on_entry(call, entry)
                if ended(entry):
                    open_tags.discard(entry.tag)
            if not open_tags:
                break
        await call.done_writing()
        return entries, num_messages


@pytest.fixture(scope="module")
def router(router_proc: ServiceProc) -> Iterator[router_pb2_grpc.RouterServiceStub]:
    with grpc.insecure_channel(router_proc.address) as channel:
        yield router_pb2_grpc.RouterServiceStub(channel)


@pytest.fixture(scope="module")
def worker(worker_proc: ServiceProc) -> Iterator[worker_pb2_grpc.WorkerServiceStub]:
    with grpc.insecure_channel(worker_proc.address) as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)


def joined(entries: list[router_pb2.RouterGenerateResponse]) -> tuple[str, list[int]]:
    return "".join(e.text for e in entries), [t for e in entries for t in e.token_ids]


def test_requests_over_one_stream_equal_generate_calls(
    router_proc: ServiceProc, router: router_pb2_grpc.RouterServiceStub
) -> None:
    # a stop string that spans two tokens of the greedy answer: the end of the third token's
    # text and the start of the fourth's
    plain = list(router.Generate(text_request(temperature=0, max_new_tokens=16), timeout=120))
    boundary = len("".join(r.text for r in plain[:3]))
    answer = "".join(r.text for r in plain)
    stop = answer[boundary - 2 : boundary + 2]
    requests = {
        1: text_request(temperature=0, max_new_tokens=16),
        2: text_request("Emoji: 🎉🎉 and 中文", temperature=0, max_new_tokens=12),
        3: text_request(temperature=0, max_new_tokens=24, stop=[stop]),
        4: text_request(temperature=0, max_new_tokens=5, logprobs=True, top_logprobs=2),
        5: router_pb2.RouterGenerateRequest(
            token_ids=router_pb2.TokenIds(ids=[504, 3575, 282, 4649, 314]),
            sampling_params=common_pb2.SamplingParams(
                temperature=0, max_new_tokens=8, detokenize=False
            ),
        ),
    }
    expected = {tag: list(router.Generate(r, timeout=120)) for tag, r in requests.items()}
    entries, _ = asyncio.run(run_stream(router_proc.address, requests, set(requests)))
    for tag, replies in expected.items():
        got = entries[tag]
        assert joined(got) == joined(replies), tag
        assert got[-1].finish_reason == replies[-1].finish_reason, tag
        assert got[-1].usage == replies[-1].usage, tag
        assert got[-1].matched_stop == replies[-1].matched_stop, tag
        assert [lp.token_id for e in got for lp in e.logprobs] == [
            lp.token_id for r in replies for lp in r.logprobs
        ]
        assert sum(ended(e) for e in got) == 1
    assert "�" not in joined(entries[2])[0]
    assert entries[3][-1].matched_stop == stop
    assert joined(entries[3])[0] == answer[: answer.index(stop)]


def test_one_bad_request_fails_alone_with_its_status(
    router_proc: ServiceProc,
    router: router_pb2_grpc.RouterServiceStub,
    worker: worker_pb2_grpc.WorkerServiceStub,
) -> None:
    requests = {
        1: text_request(temperature=0, max_new_tokens=8),
        2: text_request(top_p=2.0),
        3: text_request(temperature=0, max_new_tokens=8, stop=[""]),
        4: text_request(temperature=0, max_new_tokens=8),
    }
    entries, _ = asyncio.run(run_stream(router_proc.address, requests, set(requests)))
    bad = entries[2][-1].status
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.detail.field == "sampling_params.top_p"
    assert entries[3][-1].status.detail.field == "sampling_params.stop[0]"
    for ok in (1, 4):
        assert len(joined(entries[ok])[1]) == 8
        assert entries[ok][-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    wait_until_idle(worker)


def test_a_cancel_frees_its_pages_while_the_others_stream_on(
    router_proc: ServiceProc, worker: worker_pb2_grpc.WorkerServiceStub
) -> None:
    cancelled = False

    async def cancel_victim(call: Any, entry: router_pb2.RouterGenerateResponse) -> None:
        nonlocal cancelled
        if entry.tag == 0 and not cancelled:
            cancelled = True
            await call.write(router_pb2.RouterStreamRequest(tag=0, cancel=True))

    requests = {0: text_request(max_new_tokens=400, ignore_eos=True)}
    for tag in range(1, 31):
        requests[tag] = text_request(temperature=0, max_new_tokens=12, ignore_eos=True)
    entries, num_messages = asyncio.run(
        run_stream(router_proc.address, requests, set(range(1, 31)), on_entry=cancel_victim)
    )
    assert cancelled and not any(ended(e) for e in entries[0])
    assert len(joined(entries[0])[1]) < 400
    for tag in range(1, 31):
        assert len(joined(entries[tag])[1]) == 12
    # replies merge per message: far fewer messages than entries of one token each
    assert num_messages < 31 * 12
    wait_until_idle(worker, within=1.0)


def test_the_stream_ending_cancels_its_requests(
    router_proc: ServiceProc, worker: worker_pb2_grpc.WorkerServiceStub
) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(router_proc.address) as channel:
            call = router_pb2_grpc.RouterServiceStub(channel).Stream(timeout=120)
            for tag in range(4):
                request = text_request(max_new_tokens=500, ignore_eos=True)
                await call.write(router_pb2.RouterStreamRequest(tag=tag, generate=request))
            await call.read()  # they run
            call.cancel()  # the gateway went away

    asyncio.run(go())
    wait_until_idle(worker, within=1.0)


def test_a_mixed_batch_equals_the_engine_token_for_token_and_as_text(
    router_proc: ServiceProc,
) -> None:
    """Greedy requests over one stream against the engine run in-process: the same token ids,
    and the text is the tokenizer's decode of them (up to a stop string that spans tokens)."""
    engine = LLMEngine(
        EngineConfig(device="cpu", dtype="float32", num_pages=256, max_model_len=2048)
    )
    tokenizer = Tokenizer.from_dir(engine.source.path)
    prompts = [
        tokenizer.encode(t)
        for t in ("The capital of France is", "Write a haiku about the sea.", "1, 2, 3,")
    ]
    kinds: list[dict[str, Any]] = [
        {"max_new_tokens": 20},
        {"max_new_tokens": 10, "logprobs": True, "top_logprobs": 3},
        {"max_new_tokens": 16, "detokenize": False},
    ]
    expected: dict[int, list[int]] = {}
    requests: dict[int, router_pb2.RouterGenerateRequest] = {}
    for tag, (prompt, kind) in enumerate(zip(prompts, kinds)):
        params = {k: v for k, v in kind.items() if k != "detokenize"}
        engine.add_request(f"local-{tag}", prompt, SamplingParams(temperature=0, **params))
        requests[tag] = router_pb2.RouterGenerateRequest(
            token_ids=router_pb2.TokenIds(ids=prompt),
            sampling_params=common_pb2.SamplingParams(temperature=0, **kind),
        )
    while engine.has_work:
        for out in engine.step():
            expected.setdefault(int(out.request_id.split("-")[1]), []).extend(out.new_token_ids)
    # a stop string across two tokens of the first answer
    first_text = [tokenizer.decode(expected[0][:i]) for i in range(len(expected[0]) + 1)]
    cut = next(i for i in range(3, len(first_text)) if len(first_text[i]) > len(first_text[2]) + 1)
    stop = first_text[cut][len(first_text[2]) - 1 : len(first_text[2]) + 1]
    requests[3] = router_pb2.RouterGenerateRequest(
        token_ids=router_pb2.TokenIds(ids=prompts[0]),
        sampling_params=common_pb2.SamplingParams(temperature=0, max_new_tokens=20, stop=[stop]),
    )
    entries, _ = asyncio.run(run_stream(router_proc.address, requests, set(requests)))
    for tag in (0, 1, 2):
        text, ids = joined(entries[tag])
        assert ids == expected[tag], tag
        assert text == ("" if tag == 2 else tokenizer.decode(expected[tag])), tag
    logprobs = [lp for e in entries[1] for lp in e.logprobs]
    assert [lp.token_id for lp in logprobs] == expected[1]
    assert all(len(lp.top) == 3 for lp in logprobs)
    stopped_text, _ = joined(entries[3])
    full = tokenizer.decode(expected[0])
    assert entries[3][-1].matched_stop == stop
    assert stopped_text == full[: full.index(stop)]


def test_a_draining_router_finishes_its_streams_and_refuses_new_requests(
    tokenizer_proc: ServiceProc, worker_proc: ServiceProc, tmp_path: Any
) -> None:
    args = ["--workers", worker_proc.address, "--tokenizer", tokenizer_proc.address]
    router = start_service(
        "services.router", [*args, "--grace-period", "30"], "router-drain", log_dir=tmp_path
    )

    async def go() -> Entries:
        async with grpc.aio.insecure_channel(router.address) as channel:
            call = router_pb2_grpc.RouterServiceStub(channel).Stream(timeout=120)
            long = text_request(temperature=0, max_new_tokens=40, ignore_eos=True)
            await call.write(router_pb2.RouterStreamRequest(tag=1, generate=long))
            entries: Entries = {}
            first = await call.read()
            for e in first.outputs:
                entries.setdefault(e.tag, []).append(e)
            router.proc.send_signal(signal.SIGTERM)  # drain: tag 1 runs on
            await asyncio.sleep(0.5)
            late = text_request(temperature=0, max_new_tokens=4)
            await call.write(router_pb2.RouterStreamRequest(tag=2, generate=late))
            while (message := await call.read()) is not grpc.aio.EOF:
                for e in message.outputs:
                    entries.setdefault(e.tag, []).append(e)
            return entries  # the router ended the stream itself once tag 1 was done

    entries = asyncio.run(go())
    assert len(joined(entries[1])[1]) == 40
    assert entries[1][-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    refused = entries[2][-1].status
    assert (
        refused.code == grpc.StatusCode.UNAVAILABLE.value[0] and "shutting down" in refused.message
    )
    assert router.proc.wait(timeout=10) == 0  # long before the 30 s grace: nothing was left
