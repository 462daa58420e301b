"""Backends by name (``--kv-transfer-backend auto|mooncake|grpc|cuda_ipc``), imported only when asked for, so a host
without Mooncake can still use the grpc backend."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pdmesh.kv_transfer.base import KVReceiver, KVSender

# cuda_ipc between GPUs of one host, mooncake otherwise (on CPU hosts: mooncake)
DEFAULT_BACKEND = "auto"
# name -> (module, receiver class, sender class)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    # the fastest both sides of each pair can use, negotiated at registration
    "auto": ("pdmesh.kv_transfer.auto", "AutoReceiver", "AutoSender"),
    "mooncake": ("pdmesh.kv_transfer.mooncake_backend", "MooncakeReceiver", "MooncakeSender"),
    "grpc": ("pdmesh.kv_transfer.grpc_backend", "GrpcReceiver", "GrpcSender"),
    # GPUs of one host: device-to-device copies through CUDA IPC
    "cuda_ipc": ("pdmesh.kv_transfer.cuda_ipc_backend", "CudaIpcReceiver", "CudaIpcSender"),
}


@dataclass(frozen=True)
class Backend:
    name: str
    receiver: type[KVReceiver]
    sender: type[KVSender]


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        module_name, receiver, sender = _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown KV transfer backend {name!r}; choose one of: {', '.join(backend_names())}"
        ) from None
    module = importlib.import_module(module_name)
    return Backend(name, getattr(module, receiver), getattr(module, sender))
