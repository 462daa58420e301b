"""How the router benchmarks start the routers they compare: pdmesh's ``services.router`` and
sglang-router (PyPI ``sglang-router``, the optional extra ``bench``), with the same flags in
both benchmarks."""

from __future__ import annotations

import importlib.util

from benchmarks.routers.fleet import free_port

SGLANG_MISSING = (
    "sglang_router is not importable: pip install 'pdmesh[bench]' (or make bench-router)"
)


def sglang_router_available() -> bool:
    return importlib.util.find_spec("sglang_router") is not None


def sglang_router_args(worker_urls: list[str], port: int, policy: str) -> list[str]:
    """``python`` arguments of sglang-router on ``port`` in front of ``worker_urls``."""
    return [
        "-m", "sglang_router.launch_router",
        "--worker-urls", *worker_urls,
        "--host", "127.0.0.1", "--port", str(port),
        "--policy", policy,
        # per-request INFO lines would cost it time pdmesh's router does not spend
        "--log-level", "warn",
        # its metrics server defaults to 0.0.0.0:29000: keep it on loopback, on a free port
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
    ]  # fmt: skip


def pdmesh_router_args(workers: list[str], port: int, policy: str) -> list[str]:
    """``python`` arguments of pdmesh's router on ``port`` over the ``workers``' gRPC."""
    return [
        "-m", "services.router",
        "--port", str(port),
        "--workers", ",".join(workers),
        "--policy", policy,
        # never called: token-id prompts with detokenize=false need no tokenizer
        "--tokenizer", f"127.0.0.1:{free_port()}",
        "--log-level", "warning",
    ]  # fmt: skip
