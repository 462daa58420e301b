"""The worker's flags, one dataclass field per ``--flag``; the engine's are
``pdmesh.engine.EngineConfig``'s, parsed beside these.

``WorkerServiceConfig``: aggregated and decode workers (``--mode``); ``PrefillServiceConfig``:
prefill workers. Both are ``PDServerConfig``s: the KV transfer flags that both PD sides have,
over ``pdmesh.rpc.config.ServerConfig``'s host, port, log level and grace period."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag
from pdmesh.kv_transfer import DEFAULT_BACKEND, backend_names
from pdmesh.kv_transfer.mooncake_transport import DEFAULT_PROTOCOL, PROTOCOLS
from pdmesh.rpc.config import PORT_HELP, WILDCARDS, ServerConfig, check_port, grace_flag

DEFAULT_PORT = 50053
DEFAULT_PREFILL_PORT = 50054
DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port
MODES = ("aggregated", "decode")
NOT_SERVING_AT_ONCE = "health turns NOT_SERVING at once, so balancers stop sending"


@dataclass(frozen=True)
class PDServerConfig(ServerConfig):
    """The KV transfer flags of both PD sides; each side re-declares the backend and host
    flags for its own help text."""

    kv_transfer_backend: str = flag(
        DEFAULT_BACKEND, f"KV transfer backend: {', '.join(backend_names())}"
    )
    kv_transfer_host: str = flag(
        "", "address of this host for the KV transfer engine; empty = --host"
    )
    kv_transfer_protocol: str = flag(
        DEFAULT_PROTOCOL,
        "transport of this worker's Mooncake engine (--kv-transfer-backend mooncake or auto): "
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

    @property
    def transfers_kv(self) -> bool:
        """Whether this worker opens a KV transfer engine (a PD side), so needs its host."""
        return True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_transfer_backend not in backend_names():
            raise ValueError(
                f"--kv-transfer-backend={self.kv_transfer_backend!r}; choose "
                f"{', '.join(backend_names())}"
            )
        if self.transfers_kv and (self.kv_transfer_host or self.host) in WILDCARDS:
            raise ValueError(
                f"--host={self.host} is a wildcard: set --kv-transfer-host to the address "
                "peers reach this worker's KV transfer engine at"
            )
        if self.kv_transfer_protocol not in PROTOCOLS:
            raise ValueError(
                f"--kv-transfer-protocol={self.kv_transfer_protocol!r}; choose "
                f"{', '.join(PROTOCOLS)}"
            )


@dataclass(frozen=True)
class WorkerServiceConfig(PDServerConfig):
    port: int = flag(DEFAULT_PORT, PORT_HELP)
    mode: str = flag(
        "aggregated",
        "worker role: 'aggregated' (prefill and decode locally) or 'decode' (PD disaggregation: "
        "requests whose 'disagg' names a prefill worker get their prompt's KV and first token "
        "from it; requests without are prefilled here). Prefill workers are python -m "
        "services.prefill",
    )
    waiting_timeout: float = flag(
        60.0,
        "--mode decode: seconds a disaggregated request may wait, from its arrival, for free KV "
        "pages and then for its KV and first token from the prefill; it then fails "
        "(RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED) and frees its pages",
        env="PDMESH_DISAGGREGATION_WAITING_TIMEOUT",
    )
    heartbeat_interval: float = flag(
        5.0,
        "--mode decode: seconds between pings of each prefill worker this decode holds rooms on",
        env="PDMESH_DISAGGREGATION_HEARTBEAT_INTERVAL",
    )
    heartbeat_max_failures: int = flag(
        2,
        "--mode decode: consecutive missed pings after which a prefill counts as lost: all its "
        "rooms fail at once and free their pages, the other rooms keep going",
        env="PDMESH_DISAGGREGATION_HEARTBEAT_MAX_FAILURE",
    )
    kv_transfer_backend: str = flag(
        DEFAULT_BACKEND,
        f"--mode decode: how prefills write KV into this worker: {', '.join(backend_names())} "
        "(auto: offers cuda_ipc when the cache is on a GPU, then mooncake, and each prefill takes "
        "the first it can use; otherwise it must match the prefill workers'); grpc hosts its "
        "receiver on --port",
    )
    kv_transfer_host: str = flag(
        "",
        "--mode decode: address prefill workers reach this worker's KV receiver at (the "
        "mooncake session host); empty = --host, which must then not be a wildcard",
    )
    migration_limit: int = flag(
        0,
        "how many times the router may migrate a request from this worker to another when "
        "its stream breaks mid-way through a worker fault (a lost connection, a crash; never a "
        "client error) (advertised in GetModelInfo); 0 = disabled",
    )
    stream_interval: int = flag(
        1,
        "WorkerService.Stream (the router's connection): send a request's tokens once N of them "
        "are unsent (its last ones at once), as SGLang's --stream-interval; 1 = every step. "
        "Larger values cost fewer messages per token and coarser streaming",
    )
    engine_process: bool | None = flag(
        None,
        "run the engine in a process of its own (aggregated workers only): its step loop then "
        "has a core and a GIL to itself, instead of sharing them with this process's gRPC "
        "streams (what SGLang's scheduler and vLLM's EngineCore processes do); worth it on a "
        "GPU at high batch, where the worker's Python, not the GPU, sets the step time (on an "
        "H100 at batch 256: 1.5-2x the tokens/s through the mesh). Unset: on for an aggregated "
        "worker on CUDA, off on CPU (where the engine is the slow part and a second process "
        "only adds a hop); --no-engine-process keeps it in this process",
    )
    grace_period: float = grace_flag(30.0, "in-flight generations", NOT_SERVING_AT_ONCE)

    @property
    def transfers_kv(self) -> bool:
        return self.mode == "decode"

    def runs_engine_process(self, device: str) -> bool:
        """Whether the engine gets a process of its own on ``device`` (``--device``'s
        resolved type: "cuda" or "cpu")."""
        if self.engine_process is None:
            return self.mode == "aggregated" and device == "cuda"
        return self.engine_process

    def __post_init__(self) -> None:
        if self.mode == "prefill":
            raise ValueError("--mode=prefill: prefill workers are python -m services.prefill")
        if self.mode not in MODES:
            raise ValueError(f"--mode={self.mode!r}; choose {', '.join(MODES)}")
        super().__post_init__()
        if self.engine_process and self.mode != "aggregated":
            raise ValueError(
                "--engine-process: aggregated workers only (a PD decode's transfers use the "
                "engine's KV memory in the worker's own process)"
            )
        for name in ("waiting_timeout", "heartbeat_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        if self.heartbeat_max_failures < 1:
            raise ValueError(f"--heartbeat-max-failures={self.heartbeat_max_failures} must be >= 1")
        if self.migration_limit < 0:
            raise ValueError(f"--migration-limit={self.migration_limit} must be >= 0")
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval={self.stream_interval} must be >= 1")


@dataclass(frozen=True)
class PrefillServiceConfig(PDServerConfig):
    port: int = flag(
        DEFAULT_PREFILL_PORT,
        "gRPC port of the WorkerService; 0 picks a free one (the log says which)",
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
    grace_period: float = grace_flag(30.0, "in-flight prefills", NOT_SERVING_AT_ONCE)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_port("bootstrap_port", self.bootstrap_port)
        if self.port and self.port == self.bootstrap_port:
            raise ValueError(f"--port and --bootstrap-port are both {self.port}")
        for name in ("bootstrap_timeout", "transfer_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be > 0")
        if not 0.0 <= self.optimistic_prefill_share <= 1.0:
            raise ValueError(
                f"--optimistic-prefill-share={self.optimistic_prefill_share} must be in [0, 1]"
            )
