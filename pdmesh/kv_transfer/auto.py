"""The ``auto`` backend: each decode/prefill pair uses the fastest transfer both can.

A decode worker opens a receiver of every backend its cache allows — ``cuda_ipc`` when the
cache is in GPU memory, then ``mooncake`` — and offers all their handles, fastest first, when
it registers with a prefill. The prefill takes the first one its own sender can use: cuda_ipc
only on the same host with the decode's GPU visible, mooncake everywhere else. So two workers
on GPUs of one host copy over NVLink, while the same decode still takes KV from a prefill on
another host over Mooncake, with no flag per pair. On CPU hosts ``auto`` is exactly mooncake.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.kv_transfer.base import DEFAULT_TIMEOUT_S, KVReceiver, KVSender
from pdmesh.kv_transfer.errors import KVTransferError
from pdmesh.kv_transfer.handle import ReceiverHandle, TransferStats
from pdmesh.kv_transfer.mooncake_transport import DEFAULT_PROTOCOL
from pdmesh.kv_transfer.registry import get_backend

BACKEND = "auto"
log = logging.getLogger(__name__)
T = TypeVar("T")


def _candidates(kv_cache: torch.Tensor) -> list[str]:
    """The backends to open on this cache, fastest first."""
    return (["cuda_ipc"] if kv_cache.is_cuda else []) + ["mooncake"]


def _mooncake_options(name: str, protocol: str, device_name: str) -> dict[str, str]:
    return {"protocol": protocol, "device_name": device_name} if name == "mooncake" else {}


def _open_each(kv_cache: torch.Tensor, side: str, open_one: Callable[[str], T]) -> dict[str, T]:
    opened: dict[str, T] = {}
    for name in _candidates(kv_cache):
        try:
            opened[name] = open_one(name)
        except Exception as e:  # a backend this host cannot run: use the others
            log.warning("auto KV transfer: no %s %s here (%s)", name, side, e)
    if not opened:
        raise KVTransferError(
            f"auto KV transfer: no backend could open a {side} on this {kv_cache.device} cache "
            "(see the warnings above); choose --kv-transfer-backend grpc"
        )
    log.info("auto KV transfer: %s over %s", side, ", ".join(opened))
    return opened


class AutoReceiver(KVReceiver):
    backend = BACKEND

    def __init__(self, receivers: list[KVReceiver]) -> None:
        self._receivers = receivers

    @classmethod
    def open(
        cls,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        host: str,
        *,
        protocol: str = DEFAULT_PROTOCOL,
        device_name: str = "",
    ) -> AutoReceiver:
        """``protocol`` and ``device_name`` go to the mooncake receiver."""

        def one(name: str) -> KVReceiver:
            options = _mooncake_options(name, protocol, device_name)
            return get_backend(name).receiver.open(kv_cache, layout, host, **options)

        return cls(list(_open_each(kv_cache, "receiver", one).values()))

    @property
    def handle(self) -> ReceiverHandle:
        return self._receivers[0].handle

    @property
    def handles(self) -> list[ReceiverHandle]:
        return [r.handle for r in self._receivers]

    def close(self) -> None:
        for r in self._receivers:
            r.close()


class AutoSender(KVSender):
    backend = BACKEND

    def __init__(
        self, kv_cache: torch.Tensor, layout: KVLayout, senders: dict[str, KVSender]
    ) -> None:
        super().__init__(kv_cache, layout)
        self._senders = senders
        self.transport = next((s.transport for s in senders.values() if s.transport), "")

    @classmethod
    def open(
        cls,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        host: str,
        *,
        protocol: str = DEFAULT_PROTOCOL,
        device_name: str = "",
    ) -> AutoSender:
        """``protocol`` and ``device_name`` go to the mooncake sender."""

        def one(name: str) -> KVSender:
            options = _mooncake_options(name, protocol, device_name)
            return get_backend(name).sender.open(kv_cache, layout, host, **options)

        return cls(kv_cache, layout, _open_each(kv_cache, "sender", one))

    def refusal(self, dest: ReceiverHandle) -> str | None:
        sender = self._senders.get(dest.backend)
        if sender is None:
            return (
                f"it offers the {dest.backend!r} transfer backend, this prefill sends with "
                f"{', '.join(self._senders)} ('auto')"
            )
        return sender.refusal(dest)

    async def write(
        self,
        dest: ReceiverHandle,
        src_pages: list[int],
        dst_pages: list[int],
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> TransferStats:
        sender = self._senders.get(dest.backend)
        if sender is None:
            raise KVTransferError(
                f"receiver {dest.address} uses the {dest.backend!r} backend, this sender has "
                f"{', '.join(self._senders)}",
                peer=dest.address,
            )
        return await sender.write(dest, src_pages, dst_pages, timeout)

    async def close(self) -> None:
        for s in self._senders.values():
            await s.close()
