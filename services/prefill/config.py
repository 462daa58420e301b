"""``PrefillServiceConfig``: the prefill worker's own flags. The engine's flags are
``pdmesh.engine.EngineConfig``'s, parsed beside these (one dataclass field per ``--flag``)."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag
from pdmesh.kv_transfer import DEFAULT_BACKEND, backend_names
from pdmesh.kv_transfer.mooncake_transport import DEFAULT_PROTOCOL, PROTOCOLS
from pdmesh.rpc.server import LOG_LEVELS

DEFAULT_PORT = 50054
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port
WILDCARDS = ("0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class PrefillServiceConfig:
    host: str = flag(
        "127.0.0.1", "address to listen on; 0.0.0.0 or :: to accept other hosts (no auth!)"
    )
    port: int = flag(
        DEFAULT_PORT, "gRPC port of the WorkerService; 0 picks a free one (the log says which)"
    )
    bootstrap_port: int = flag(
        DEFAULT_BOOTSTRAP_PORT,
        "gRPC port of the BootstrapService that decode workers register with and fetch KV "
        "through (advertised by GetModelInfo); 0 picks a free one",
    )
    bootstrap_timeout: float = flag(
        30.0,
        "seconds a bootstrap room waits for its other half (the decode's page ids, or this "
        "worker's own Generate); then it fails and frees its pages",
        env="PDMESH_DISAGGREGATION_BOOTSTRAP_TIMEOUT",
    )
    optimistic_prefill_share: float = flag(
        0.5,
        "share of the KV pool that rooms may prefill into before their decode worker sent its "
        "page ids (hides the bootstrap round trips); rooms beyond it wait for the decode first, "
        "so full pools on both sides cannot wait on each other. 0 = always wait",
    )
    transfer_timeout: float = flag(
        30.0, "seconds one room's KV write into a decode worker may take before it fails"
    )
    kv_transfer_backend: str = flag(
        DEFAULT_BACKEND,
        f"how KV pages are written into decode workers: {', '.join(backend_names())} (auto: "
        "cuda_ipc to decodes on GPUs of this host, mooncake to the others; otherwise it must match "
        "the decode workers')",
    )
    kv_transfer_host: str = flag(
        "",
        "address of this host for the KV transfer engine (the mooncake session host); empty = "
        "--host, which must then not be a wildcard",
    )
    kv_transfer_protocol: str = flag(
        DEFAULT_PROTOCOL,
        "transport of this prefill's Mooncake engine (--kv-transfer-backend mooncake or auto): "
        "'rdma', 'tcp', or 'auto' (rdma where the kernel lists an RDMA device in "
        "/sys/class/infiniband, all of --disaggregation-ib-device's when it names some; else "
        "tcp). Where Mooncake finds no usable RDMA device it falls back to tcp, which the log "
        "and the Consul meta kv_protocol report; a prefill and a decode pair up only on the same "
        "transport",
        env="PDMESH_KV_TRANSFER_PROTOCOL",
    )
    disaggregation_ib_device: str = flag(
        "",
        "RDMA devices Mooncake may use, comma-separated (SGLang's flag), e.g. mlx5_0 or "
        "mlx5_0,mlx5_1: the NICs next to this worker's GPU; empty: every device Mooncake finds",
        env="PDMESH_DISAGGREGATION_IB_DEVICE",
    )
    log_level: str = flag("info", f"log verbosity: {', '.join(LOG_LEVELS)}")
    grace_period: float = flag(
        30.0,
        "seconds in-flight prefills get to finish after SIGTERM/SIGINT before they are "
        "cancelled (health turns NOT_SERVING at once, so balancers stop sending)",
    )

    def __post_init__(self) -> None:
        for name in ("port", "bootstrap_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(
                    f"--{name.replace('_', '-')}={getattr(self, name)} must be in [0, 65535]"
                )
        if self.port and self.port == self.bootstrap_port:
            raise ValueError(f"--port and --bootstrap-port are both {self.port}")
        for name in ("bootstrap_timeout", "transfer_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        if not 0.0 <= self.optimistic_prefill_share <= 1.0:
            raise ValueError(
                f"--optimistic-prefill-share={self.optimistic_prefill_share} must be in [0, 1]"
            )
        if self.kv_transfer_backend not in backend_names():
            raise ValueError(
                f"--kv-transfer-backend={self.kv_transfer_backend!r}; choose "
                f"{', '.join(backend_names())}"
            )
        if not self.host:
            raise ValueError("--host must not be empty")
        if (self.kv_transfer_host or self.host) in WILDCARDS:
            raise ValueError(
                f"--host={self.host} is a wildcard: set --kv-transfer-host to this host's address"
            )
        if self.kv_transfer_protocol not in PROTOCOLS:
            raise ValueError(
                f"--kv-transfer-protocol={self.kv_transfer_protocol!r}; choose "
                f"{', '.join(PROTOCOLS)}"
            )
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level={self.log_level!r}; choose {', '.join(LOG_LEVELS)}")
        if self.grace_period < 0:
            raise ValueError(f"--grace-period={self.grace_period} must be >= 0")
