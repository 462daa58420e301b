"""Session-wide services for the integration tests: one tokenizer, one worker, one router in
front of them, each a real process on a free loopback port (see ``procs.py``).

Tests that need a service of their own (SIGTERM, a second worker) start it with
``start_service`` instead of sharing these. Teardown SIGTERMs each and asserts exit code 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.procs import ServiceProc, start_service, worker_args


@pytest.fixture(scope="session")
def tokenizer_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    log_dir = tmp_path_factory.mktemp("tokenizer")
    svc = start_service("services.tokenizer", ["--grace-period", "2"], "tokenizer", log_dir=log_dir)
    yield svc
    svc.stop_and_check()


@pytest.fixture(scope="session")
def worker_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    # the session's shared worker runs its engine in a process of its own (--engine-process):
    # every router, gateway and worker test through it covers that path, and the tests that
    # start workers of their own cover the engine thread
    log_dir = tmp_path_factory.mktemp("worker")
    args = worker_args("--engine-process")
    svc = start_service("services.decode", args, "worker", log_dir=log_dir)
    yield svc
    svc.stop_and_check()


@pytest.fixture(scope="session")
def router_proc(
    tmp_path_factory: pytest.TempPathFactory,
    tokenizer_proc: ServiceProc,
    worker_proc: ServiceProc,
) -> Iterator[ServiceProc]:
    args = ["--workers", worker_proc.address, "--tokenizer", tokenizer_proc.address]
    log_dir = tmp_path_factory.mktemp("router")
    svc = start_service(
        "services.router", [*args, "--grace-period", "2"], "router", log_dir=log_dir
    )
    yield svc
    svc.stop_and_check()
