"""The two topologies on one host's GPUs, as real processes behind one pdmesh router.

    1p1d:  router (PD mode) ─► prefill worker (cuda:0) ──KV──► decode worker (cuda:1)
    2agg:  router (round_robin) ─► aggregated worker (cuda:0), aggregated worker (cuda:1)

Every worker gets the same engine flags; the router gets a tokenizer address nobody listens on,
since token-id prompts with ``detokenize: false`` never need one (``benchmarks.routers.launch``
says so too).

GPUs are given with ``CUDA_VISIBLE_DEVICES``, not ``--device cuda:N``: the engine launches its
Triton kernels and captures its CUDA graphs on the current device, which is the first visible
one. Each worker sees its own GPU as cuda:0; the prefill also sees the decode's GPU (listed
second), since cuda_ipc maps the decode's KV memory there (matched by UUID).

The prefill worker logs at debug level: its per-room line ("room R: N pages
(B bytes) to D in T ms") is where the transfer figures come from (``transfer.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from benchmarks.pd_vs_agg.config import PdVsAggConfig
from benchmarks.routers.fleet import Child, Fleet, free_port
from benchmarks.routers.launch import pdmesh_router_args
from pdmesh.v1 import worker_pb2, worker_pb2_grpc

GRACE = ["--grace-period", "2"]


@dataclass
class Topology:
    name: str
    router: str  # host:port of the router's gRPC
    workers: dict[str, str]  # worker name -> host:port
    children: list[Child]
    prefill: Child | None = None  # 1p1d: its log holds the transfers

    def loads(self) -> dict[str, worker_pb2.GetLoadResponse]:
        """Every worker's GetLoad now."""
        out = {}
        for name, address in self.workers.items():
            with grpc.insecure_channel(address) as channel:
                stub = worker_pb2_grpc.WorkerServiceStub(channel)
                out[name] = stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
        return out


def engine_args(cfg: PdVsAggConfig, step_tokens: int = 0) -> list[str]:
    return [
        "--model", cfg.model, "--device", "cuda:0" if cfg.device == "cuda" else "cpu",
        "--num-pages", str(cfg.num_pages), "--page-size", str(cfg.page_size),
        "--max-model-len", str(cfg.max_model_len),
        "--max-running-requests", str(cfg.max_running_requests),
        "--max-num-batched-tokens", str(step_tokens or cfg.max_num_batched_tokens),
    ]  # fmt: skip


def start(cfg: PdVsAggConfig, fleet: Fleet, name: str) -> Topology:
    """Start ``name``'s workers and router and wait until all answer their health checks."""
    if name == "1p1d":
        return _start_pd(cfg, fleet)
    return _start_agg(cfg, fleet)


@contextmanager
def visible_gpus(cfg: PdVsAggConfig, gpus: tuple[int, ...]) -> Iterator[None]:
    """``CUDA_VISIBLE_DEVICES`` for a child started inside (Popen copies the environment):
    these indices into this process's own visible GPUs. A no-op with --device cpu."""
    if cfg.device != "cuda":
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    ours = before.split(",") if before else [str(i) for i in range(max(gpus) + 1)]
    if max(gpus) >= len(ours):
        raise ValueError(f"GPU {max(gpus)} wanted but CUDA_VISIBLE_DEVICES={before!r}")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ours[g] for g in gpus)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _worker(
    cfg: PdVsAggConfig, fleet: Fleet, name: str, module: str, args: list[str],
    gpus: tuple[int, ...],
) -> tuple[Child, str]:  # fmt: skip
    port = free_port()
    with visible_gpus(cfg, gpus):
        child = fleet.start(
            name, ["-m", module, "--port", str(port), *args, *GRACE], f"grpc://127.0.0.1:{port}"
        )
    return child, f"127.0.0.1:{port}"


def _router(fleet: Fleet, name: str, workers: list[str], pd_args: list[str]) -> tuple[Child, str]:
    port = free_port()
    # round_robin: with two equal workers it spreads the streams and the long prompts evenly
    child = fleet.start(
        name, [*pdmesh_router_args(workers, port, "round_robin"), *pd_args, *GRACE],
        f"grpc://127.0.0.1:{port}",
    )  # fmt: skip
    return child, f"127.0.0.1:{port}"


def _start_agg(cfg: PdVsAggConfig, fleet: Fleet) -> Topology:
    workers: dict[str, str] = {}
    children = []
    for i in range(2):
        child, address = _worker(
            cfg, fleet, f"2agg-worker-{i}", "services.decode",
            [*engine_args(cfg), "--log-level", "warning"], (i,),
        )  # fmt: skip
        children.append(child)
        workers[child.name] = address
    fleet.wait_healthy(children)
    router, address = _router(fleet, "2agg-router", list(workers.values()), [])
    fleet.wait_healthy([router])
    return Topology("2agg", address, workers, [*children, router])


def _start_pd(cfg: PdVsAggConfig, fleet: Fleet) -> Topology:
    kv = ["--kv-transfer-backend", cfg.kv_transfer_backend]
    prefill, p_address = _worker(
        cfg, fleet, "1p1d-prefill", "services.prefill",
        [*engine_args(cfg, cfg.prefill_max_num_batched_tokens), *kv,
         "--bootstrap-port", str(free_port()), "--log-level", "debug"], (0, 1),
    )  # fmt: skip
    decode, d_address = _worker(
        cfg, fleet, "1p1d-decode", "services.decode",
        [*engine_args(cfg), *kv, "--mode", "decode", "--log-level", "warning"], (1,),
    )  # fmt: skip
    fleet.wait_healthy([prefill, decode])
    router, address = _router(
        fleet, "1p1d-router", [],
        ["--prefill-workers", p_address, "--decode-workers", d_address,
         "--disagg-min-prompt-tokens", str(cfg.disagg_min_prompt_tokens)],
    )  # fmt: skip
    fleet.wait_healthy([router])
    workers = {prefill.name: p_address, decode.name: d_address}
    # stopped last: the prefill holds a mapping of the decode's KV memory (cuda_ipc)
    return Topology("1p1d", address, workers, [decode, prefill, router], prefill)
