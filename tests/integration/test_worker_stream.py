"""``WorkerService.Stream`` (what the router uses: many requests over one stream, one message per
engine step) against a real worker process with the real default model: the same outputs as
``Generate``, per-request errors in-band, cancel and stream end free pages, deadlines, and
``--stream-interval``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.procs import ServiceProc, start_service, worker_args
from tests.integration.test_worker_service import PROMPT, wait_until_idle

pytestmark = pytest.mark.model

Entries = dict[str, list[worker_pb2.GenerateResponse]]


def gen(
    request_id: str, prompt: list[int] = PROMPT, **params: Any
) -> worker_pb2.WorkerStreamRequest:
    return worker_pb2.WorkerStreamRequest(
        generate=worker_pb2.GenerateRequest(
            request_id=request_id,
            token_ids=prompt,
            sampling_params=common_pb2.SamplingParams(**params),
        )
    )


def ended(entry: worker_pb2.GenerateResponse) -> bool:
    return entry.HasField("status") or entry.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


async def run_stream(
    address: str,
    messages: list[worker_pb2.WorkerStreamRequest],
    wait_for: set[str],
    on_entry: Any = None,
) -> tuple[Entries, int]:
    """Send ``messages`` on one Stream, collect entries until every id in ``wait_for`` ended;
    returns the entries by request id and how many stream messages carried them."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Stream(timeout=120)
        for m in messages:
            await call.write(m)
        entries: Entries = {}
        num_messages = 0
        open_ids = set(wait_for)
        async for message in call:
            num_messages += 1
            for entry in message.outputs:
                assert entry.request_id, entry
                entries.setdefault(entry.request_id, []).append(entry)
                if on_entry is not None:
                    await on_entry(call, entry)
                if ended(entry):
                    open_ids.discard(entry.request_id)
            if not open_ids:
                break
        await call.done_writing()
        return entries, num_messages


def token_ids(entries: list[worker_pb2.GenerateResponse]) -> list[int]:
    return [t for e in entries for t in e.token_ids]


@pytest.fixture(scope="module")
def stub(worker_proc: ServiceProc) -> Iterator[worker_pb2_grpc.WorkerServiceStub]:
    with grpc.insecure_channel(worker_proc.address) as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)


def generate(stub: worker_pb2_grpc.WorkerServiceStub, request_id: str, **params: Any) -> list[Any]:
    request = worker_pb2.GenerateRequest(
        request_id=request_id, token_ids=PROMPT, sampling_params=common_pb2.SamplingParams(**params)
    )
    return list(stub.Generate(request, timeout=120))


def test_a_batch_over_one_stream_equals_generate_per_request(
    worker_proc: ServiceProc, stub: worker_pb2_grpc.WorkerServiceStub
) -> None:
    kinds: dict[str, dict[str, Any]] = {
        "greedy": {"temperature": 0, "max_new_tokens": 12},
        "logprobs": {"temperature": 0, "max_new_tokens": 6, "logprobs": True, "top_logprobs": 3},
        "seeded": {"temperature": 0.8, "seed": 7, "max_new_tokens": 10},
        "nothing": {"max_new_tokens": 0},
    }
    expected = {k: generate(stub, f"direct-{k}", **p) for k, p in kinds.items()}
    messages = [gen(f"s-{k}", **p) for k, p in kinds.items()]
    entries, num_messages = asyncio.run(
        run_stream(worker_proc.address, messages, {f"s-{k}" for k in kinds})
    )
    for kind, replies in expected.items():
        got = entries[f"s-{kind}"]
        assert token_ids(got) == token_ids(replies), kind
        # batched with others the float32 sums differ in the last bits, not the tokens
        got_lps = [lp for e in got for lp in e.logprobs]
        want_lps = [lp for r in replies for lp in r.logprobs]
        assert [lp.token_id for lp in got_lps] == [lp.token_id for lp in want_lps]
        assert [t.token_id for lp in got_lps for t in lp.top] == [
            t.token_id for lp in want_lps for t in lp.top
        ]
        for a, b in zip(got_lps, want_lps):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert got[-1].finish_reason == replies[-1].finish_reason
        assert got[-1].usage.completion_tokens == replies[-1].usage.completion_tokens
        assert got[-1].usage.prompt_tokens == len(PROMPT)
        assert sum(ended(e) for e in got) == 1 and ended(got[-1])
    # one message per step for all of them, not one per token per request
    total_entries = sum(len(v) for v in entries.values())
    assert num_messages < total_entries
    wait_until_idle(stub)


def test_a_bad_request_fails_alone_in_band(
    worker_proc: ServiceProc, stub: worker_pb2_grpc.WorkerServiceStub
) -> None:
    messages = [
        gen("ok-1", temperature=0, max_new_tokens=8),
        gen("bad", prompt=[10**8], max_new_tokens=8),
        gen("bad-top-p", top_p=2.0),
        gen("ok-1", temperature=0, max_new_tokens=8),  # duplicate id while ok-1 runs
        gen("ok-2", temperature=0, max_new_tokens=8),
    ]
    entries, _ = asyncio.run(
        run_stream(worker_proc.address, messages, {"ok-1", "ok-2", "bad", "bad-top-p"})
    )
    bad = entries["bad"][-1].status
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.detail.field == "token_ids" and "vocabulary" in bad.message
    assert entries["bad-top-p"][-1].status.detail.field == "sampling_params.top_p"
    # the second "ok-1" is refused, and the first one stopped (no more outputs for it)
    duplicate = entries["ok-1"][-1].status
    assert duplicate.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert duplicate.detail.field == "request_id"
    assert sum(ended(e) for e in entries["ok-1"]) == 1
    finished = entries["ok-2"]
    assert len(token_ids(finished)) == 8
    assert finished[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    wait_until_idle(stub)


def test_cancel_frees_one_request_and_the_others_finish(
    worker_proc: ServiceProc, stub: worker_pb2_grpc.WorkerServiceStub
) -> None:
    async def cancel_after_two(call: Any, entry: worker_pb2.GenerateResponse) -> None:
        if entry.request_id == "victim" and not ended(entry):
            await call.write(worker_pb2.WorkerStreamRequest(cancel="victim"))

    messages = [
        gen("victim", temperature=0, max_new_tokens=200, ignore_eos=True),
        gen("keeps-going", temperature=0, max_new_tokens=24, ignore_eos=True),
    ]
    entries, _ = asyncio.run(
        run_stream(worker_proc.address, messages, {"keeps-going"}, on_entry=cancel_after_two)
    )
    assert len(token_ids(entries["keeps-going"])) == 24
    assert len(token_ids(entries["victim"])) < 200
    assert not any(ended(e) for e in entries["victim"])  # a cancelled request says no more
    wait_until_idle(stub)


def test_the_stream_ending_aborts_its_requests(
    worker_proc: ServiceProc, stub: worker_pb2_grpc.WorkerServiceStub
) -> None:
    async def go() -> None:
        async with grpc.aio.insecure_channel(worker_proc.address) as channel:
            call = worker_pb2_grpc.WorkerServiceStub(channel).Stream(timeout=120)
            for i in range(4):
                await call.write(gen(f"orphan-{i}", max_new_tokens=500, ignore_eos=True))
            await call.read()  # they run
            call.cancel()  # the router went away

    asyncio.run(go())
    wait_until_idle(stub, within=1.0)


def test_timeout_secs_ends_a_request_with_deadline_exceeded(
    worker_proc: ServiceProc, stub: worker_pb2_grpc.WorkerServiceStub
) -> None:
    slow = gen("slow", max_new_tokens=2000, ignore_eos=True)
    slow.timeout_secs = 0.5
    entries, _ = asyncio.run(run_stream(worker_proc.address, [slow], {"slow"}))
    last = entries["slow"][-1]
    assert last.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], last
    wait_until_idle(stub)


def test_stream_interval_sends_every_n_tokens(tmp_path: Any) -> None:
    with start_service(
        "services.decode",
        worker_args("--stream-interval", "4"),
        "worker-interval",
        log_dir=tmp_path,
    ) as worker:
        entries, _ = asyncio.run(
            run_stream(
                worker.address, [gen("r", temperature=0, max_new_tokens=10, ignore_eos=True)], {"r"}
            )
        )
    sizes = [len(e.token_ids) for e in entries["r"]]
    assert sum(sizes) == 10
    assert all(n >= 4 for n in sizes[:-1]) and len(sizes) <= 3, sizes
