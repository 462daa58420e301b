"""KV transfer between real processes: the receiver (a decode's KV cache) lives in a spawned
child, the test process is the sender (a prefill with random pages). Real Mooncake over tcp on
loopback, real gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import time
from collections.abc import Iterator

import pytest
import torch

from harness.kv_receiver import ReceiverProcess
from pdmesh.kv_transfer import KVSender, KVTransferError, get_backend, layout_of

# 2 layers, 64 pages of 4 tokens, 2 kv heads, head_dim 8, float32: 256-byte pages
SHAPE = (64, 2, 2, 4, 2, 8)  # [pages, layers, K/V, page_size, kv_heads, head_dim]
# (backend, hosted on an app's own grpc.aio server like the decode worker does)
RECEIVERS = [("mooncake", False), ("grpc", False), ("grpc", True)]
IDS = ["mooncake", "grpc-own-port", "grpc-hosted"]


def open_sender(backend: str, kv: torch.Tensor) -> KVSender:
    return get_backend(backend).sender.open(kv, layout_of(kv), "127.0.0.1")


@pytest.fixture
def source() -> torch.Tensor:
    # the sender's pool differs in size from the receiver's, as a prefill's and a decode's do
    return torch.randn(48, 2, 2, 4, 2, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=RECEIVERS, ids=IDS)
def receiver(request: pytest.FixtureRequest) -> Iterator[ReceiverProcess]:
    backend, hosted = request.param
    with ReceiverProcess(backend, SHAPE, hosted=hosted) as rp:
        yield rp


def test_pages_arrive_exactly_and_nothing_else_changes(
    receiver: ReceiverProcess, source: torch.Tensor
) -> None:
    sender = open_sender(receiver.handle.backend, source)
    # a contiguous run, a run broken on the destination side only, and scattered pages
    writes = [
        (list(range(0, 8)), list(range(20, 28))),
        ([10, 11, 12, 13], [40, 41, 50, 51]),
        ([30, 5, 47], [63, 0, 33]),
    ]

    async def run() -> list[int]:
        try:
            return [
                (await sender.write(receiver.handle, src, dst, timeout=10)).bytes
                for src, dst in writes
            ]
        finally:
            await sender.close()

    sizes = asyncio.run(run())
    page_bytes = layout_of(source).page_bytes
    assert sizes == [len(src) * page_bytes for src, _ in writes]

    got = receiver.read(list(range(SHAPE[0])))
    written: set[int] = set()
    for src, dst in writes:
        assert torch.equal(got[dst], source[src])
        written.update(dst)
    untouched = [p for p in range(SHAPE[0]) if p not in written]
    assert not got[untouched].any()


@pytest.mark.parametrize("variant", ["mooncake-poll", "mooncake-sync", "grpc"])
def test_concurrent_writes_of_many_rooms_all_land(variant: str, source: torch.Tensor) -> None:
    # a prefill writes several rooms into one decode at once: 8 rooms of 6 pages, scattered
    backend, _, wait = variant.partition("-")
    receiver = ReceiverProcess(backend, SHAPE)
    if wait:
        from pdmesh.kv_transfer.mooncake_backend import MooncakeSender

        sender: KVSender = MooncakeSender.open(source, layout_of(source), "127.0.0.1", wait=wait)
    else:
        sender = open_sender(backend, source)
    dst_all = list(range(SHAPE[0]))
    random.Random(1).shuffle(dst_all)
    rooms = [(list(range(6 * i, 6 * i + 6)), dst_all[6 * i : 6 * i + 6]) for i in range(8)]

    async def run() -> None:
        try:
            await asyncio.gather(
                *(sender.write(receiver.handle, src, dst, timeout=20) for src, dst in rooms)
            )
        finally:
            await sender.close()

    try:
        asyncio.run(run())
        got = receiver.read(list(range(SHAPE[0])))
    finally:
        receiver.stop()
    for src, dst in rooms:
        assert torch.equal(got[dst], source[src])
    untouched = dst_all[48:]
    assert not got[untouched].any()


@pytest.mark.parametrize(("backend", "hosted"), RECEIVERS, ids=IDS)
def test_write_to_a_killed_receiver_fails_fast(
    backend: str, hosted: bool, source: torch.Tensor
) -> None:
    rp = ReceiverProcess(backend, SHAPE, hosted=hosted)
    sender = open_sender(backend, source)

    async def run() -> float:
        try:
            await sender.write(rp.handle, [0, 1], [0, 1], timeout=5)  # connection established
            rp.kill()
            start = time.perf_counter()
            with pytest.raises(KVTransferError) as e:
                await sender.write(rp.handle, [2, 3], [2, 3], timeout=5)
            assert e.value.peer == rp.handle.address
            assert rp.handle.address in str(e.value)
            return time.perf_counter() - start
        finally:
            await sender.close()

    assert asyncio.run(run()) < 5.0


@pytest.mark.parametrize(("backend", "hosted"), RECEIVERS, ids=IDS)
def test_write_to_a_hung_receiver_fails_at_the_deadline(
    backend: str, hosted: bool, source: torch.Tensor
) -> None:
    # SIGSTOP: the process keeps its sockets but never reads; only the deadline ends the wait.
    # The payload must exceed what the socket buffers absorb, or the write would just finish.
    big = torch.randn(512, 2, 2, 16, 8, 64)  # 16 MiB
    rp = ReceiverProcess(backend, big.shape, hosted=hosted)
    sender = open_sender(backend, big)
    pid = rp.process.pid
    assert pid is not None
    pages = list(range(512))

    async def run() -> float:
        try:
            await sender.write(rp.handle, [0], [0], timeout=5)
            os.kill(pid, signal.SIGSTOP)
            start = time.perf_counter()
            with pytest.raises(KVTransferError, match="within 2 s|DEADLINE_EXCEEDED"):
                await sender.write(rp.handle, pages, pages, timeout=2)
            return time.perf_counter() - start
        finally:
            # the hung process dies, as an operator or a liveness probe would end it; gRPC's
            # keepalive would otherwise take ~15 s to drop the wedged connection
            os.kill(pid, signal.SIGCONT)
            rp.kill()
            await sender.close()

    elapsed = asyncio.run(run())
    assert 1.9 < elapsed < 3.5


def test_grpc_receiver_refuses_a_handle_from_before_its_restart(
    source: torch.Tensor,
) -> None:
    with ReceiverProcess("grpc", SHAPE) as rp:
        stale = dataclasses.replace(rp.handle, receiver_id="0" * 32)
        sender = open_sender("grpc", source)

        async def run() -> None:
            try:
                await sender.write(stale, [0], [0], timeout=5)
            finally:
                await sender.close()

        with pytest.raises(KVTransferError, match="FAILED_PRECONDITION.*register again"):
            asyncio.run(run())
        assert not rp.read(list(range(SHAPE[0]))).any()


@pytest.mark.parametrize("backend", ["mooncake", "grpc"])
def test_layout_mismatch_is_named_and_nothing_is_sent(backend: str, source: torch.Tensor) -> None:
    # the receiver has 8-token pages (the sender 4) and bfloat16 (the sender float32)
    with ReceiverProcess(backend, (32, 2, 2, 8, 2, 8), dtype="bfloat16") as rp:
        errors = layout_of(source).compatibility_errors(rp.handle.layout)
        assert errors == ["page_size: 4 != 8", "dtype: float32 != bfloat16"]
        sender = open_sender(backend, source)

        async def run() -> None:
            try:
                await sender.write(rp.handle, [0], [0], timeout=5)
            finally:
                await sender.close()

        with pytest.raises(KVTransferError, match="page_size: 4 != 8; dtype: float32 != bfloat16"):
            asyncio.run(run())
        assert not rp.read(list(range(32))).any()


def test_mooncake_writes_after_the_first_all_land_while_many_are_in_flight(
    source: torch.Tensor,
) -> None:
    # the first write opens the receiver's segment from a pool thread; the later ones submit on
    # the event loop and share one waiter thread, here 8 at a time for 3 rounds
    rng = random.Random(2)
    with ReceiverProcess("mooncake", SHAPE) as rp:
        sender = open_sender("mooncake", source)
        rounds = []
        for _ in range(3):
            dst_all = rng.sample(range(SHAPE[0]), 48)
            rounds.append(
                [(list(range(6 * i, 6 * i + 6)), dst_all[6 * i : 6 * i + 6]) for i in range(8)]
            )

        async def run() -> list[torch.Tensor]:
            seen = []
            try:
                await sender.write(rp.handle, [0], [0], timeout=10)
                for rooms in rounds:
                    writes = (sender.write(rp.handle, s, d, timeout=10) for s, d in rooms)
                    await asyncio.wait_for(asyncio.gather(*writes), 30)
                    # read while the loop is idle: the receiver's pages of this round only
                    seen.append(rp.read(list(range(SHAPE[0]))))
            finally:
                await sender.close()
            return seen

        for rooms, got in zip(rounds, asyncio.run(run())):
            for src, dst in rooms:
                assert torch.equal(got[dst], source[src])


def test_a_cancelled_mooncake_write_leaves_the_sender_usable(source: torch.Tensor) -> None:
    # a room cancelled mid-transfer: its blocks are still waited for (Mooncake reads our
    # memory), the next write lands, and close() returns
    big = torch.randn(256, 2, 2, 16, 8, 64, generator=torch.Generator().manual_seed(3))  # 32 MiB
    with ReceiverProcess("mooncake", big.shape) as rp:
        sender = open_sender("mooncake", big)

        async def run() -> None:
            try:
                await sender.write(rp.handle, [0], [0], timeout=10)
                room = asyncio.ensure_future(
                    sender.write(rp.handle, list(range(1, 200)), list(range(1, 200)), timeout=10)
                )
                await asyncio.sleep(0)  # submitted: its write call ran up to the await
                room.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await room
                await sender.write(rp.handle, [200, 201], [250, 251], timeout=10)
            finally:
                await asyncio.wait_for(sender.close(), 30)

        asyncio.run(run())
        assert torch.equal(rp.read([250, 251]), big[[200, 201]])


@pytest.mark.parametrize("threaded", [False, True], ids=["raw", "raw-thread"])
def test_raw_baseline_copies_exactly_and_names_a_dead_receiver(
    threaded: bool, source: torch.Tensor
) -> None:
    # the benchmark's reference must move the same bytes as the backends it is compared with
    from benchmarks.kv_reference.raw_socket import RawSocketSender, ThreadedRawSocketSender

    cls = ThreadedRawSocketSender if threaded else RawSocketSender
    rp = ReceiverProcess("raw", SHAPE)
    sender = cls.open(source, layout_of(source), "127.0.0.1")
    writes = [(list(range(0, 8)), list(range(20, 28))), ([30, 5, 47], [63, 0, 33])]

    async def run() -> None:
        try:
            for src, dst in writes:
                await sender.write(rp.handle, src, dst, timeout=10)
            got = rp.read(list(range(SHAPE[0])))
            for src, dst in writes:
                assert torch.equal(got[dst], source[src])
            rp.kill()
            with pytest.raises(KVTransferError) as e:
                await sender.write(rp.handle, [1], [1], timeout=5)
            assert e.value.peer == rp.handle.address
        finally:
            await sender.close()

    try:
        asyncio.run(run())
    finally:
        rp.kill()
