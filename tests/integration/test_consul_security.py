"""A mesh service against a real Consul dev agent with ACLs on (default policy deny) whose own
TLS certificate is one of the mesh CA's: without a token the service refuses to start and says
why; with the token (from ``PDMESH_CONSUL_TOKEN``) it registers, and Consul's gRPC check of its
mutual-TLS port passes. The token appears in no log."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdmesh.discovery import TOKENIZER
from pdmesh.discovery.dev_agent import ConsulDevAgent
from tests.certs import Pki, make_pki
from tests.integration.procs import REPO_ROOT, ServiceProc, free_port

TOKEN = "pdmesh-root-secret-token"
CHECK_PASSING_WITHIN_S = 20.0  # first check within the interval (1 s), slow 2-core machines
REFUSAL_WITHIN_S = 120.0  # the tokenizer loads before it registers


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def agent(pki: Pki) -> Iterator[ConsulDevAgent]:
    # With enable_agent_tls_for_checks the agent presents its cert_file as the client
    # certificate of its gRPC checks, which a mutual-TLS port requires.
    hcl = (
        f'acl {{ enabled = true, default_policy = "deny", tokens {{ master = "{TOKEN}" }} }}\n'
        f'cert_file = "{pki.cert}"\nkey_file = "{pki.key}"\n'
        "enable_agent_tls_for_checks = true\n"
    )
    with ConsulDevAgent(extra_args=["-hcl", hcl]) as running:
        yield running


def consul_flags(agent: ConsulDevAgent) -> list[str]:
    return [
        "--discovery", "consul", "--consul-addr", agent.http_addr,
        "--consul-check-interval", "1", "--grace-period", "1",
    ]  # fmt: skip


def test_registration_without_the_token_fails_clearly(
    agent: ConsulDevAgent, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PDMESH_CONSUL_TOKEN", "CONSUL_HTTP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    argv = [sys.executable, "-m", "services.tokenizer", "--host", "127.0.0.1"]
    argv += ["--port", str(free_port()), *consul_flags(agent), *pki.server_flags()]
    done = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=REFUSAL_WITHIN_S
    )
    assert done.returncode == 1, done.stderr
    assert "cannot register with Consul" in done.stderr
    assert "403" in done.stderr and "Permission denied" in done.stderr


def test_with_the_token_it_registers_and_its_tls_check_passes(
    agent: ConsulDevAgent, pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    monkeypatch.setenv("PDMESH_CONSUL_TOKEN", TOKEN)  # the child inherits it
    args = [*consul_flags(agent), *pki.server_flags(), "--log-level", "debug"]
    svc = ServiceProc(
        "services.tokenizer", args, "tokenizer", free_port(), tmp_path, pki.tls_config()
    )
    with svc:
        svc.wait_until_serving()
        path = f"/v1/health/service/{TOKENIZER}?passing=1"
        deadline = time.monotonic() + CHECK_PASSING_WITHIN_S
        passing: object = []
        while not passing and time.monotonic() < deadline:
            passing = agent.get(path, TOKEN)
            time.sleep(0.2)
        assert isinstance(passing, list) and len(passing) == 1, agent.get(path[:-10], TOKEN)
        check = passing[0]["Checks"][-1]
        assert check["Type"] == "grpc" and check["Status"] == "passing"
        # a client without the token sees nothing: the catalog is not public
        assert agent.get(path) == []
    # a graceful stop deregistered it
    assert agent.get(f"/v1/health/service/{TOKENIZER}", TOKEN) == []
    assert TOKEN not in svc.log
