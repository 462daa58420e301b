"""``harness.testbed.netns``: hosts as namespaces on a switch of the run's own, a link down is a
partition both ways, nothing lands in this process's namespace, and every namespace goes at the
end: after an exception, on SIGTERM, and (reaped by the next run) after a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.testbed.netns import Network, list_namespaces, reap_stale
from tests.multihost.conftest import needs_netns

pytestmark = needs_netns
TIMEOUT_S = 20.0


def _root_view() -> tuple[str, str]:
    addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return addrs.stdout, "\n".join(line.split(":")[1] for line in links.stdout.splitlines())


def _connects(net: Network, src: str, dst: str, port: int = 7000) -> bool:
    """Whether ``src`` reaches a listener on ``dst``'s service address."""
    listen = (
        "import socket; s = socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        f"s.bind(({net.address(dst)!r}, {port})); s.listen(); s.settimeout(3); "
        "print('up', flush=True); c, _ = s.accept(); c.sendall(b'ok')"
    )
    dial = (
        f"import socket; c = socket.create_connection(({net.address(dst)!r}, {port}), timeout=1.5); "
        "print(c.recv(2).decode())"
    )
    server = subprocess.Popen(
        net.command(dst, [sys.executable, "-c", listen]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        client = subprocess.run(
            net.command(src, [sys.executable, "-c", dial]),
            capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        return client.stdout.strip() == "ok"
    finally:
        server.kill()
        server.wait()


def test_hosts_reach_each_other_only_over_their_links_and_leave_nothing_behind() -> None:
    before = _root_view()
    net = Network(["x", "y"])
    with pytest.raises(RuntimeError, match="the test's own failure"), net:
        names = net.namespaces
        assert set(names) <= set(list_namespaces())
        assert net.address("y") == "10.77.0.2" and net.gossip_address("x") == "10.77.1.1"
        assert _root_view() == before  # no address, no link in this namespace
        assert _connects(net, "x", "y")
        net.set_link("y", up=False)  # a partition: nothing in or out
        assert not net.link_up("y")
        assert not _connects(net, "x", "y", port=7001)
        net.set_link("y", up=True)
        assert _connects(net, "x", "y", port=7002)
        raise RuntimeError("the test's own failure")
    assert not set(names) & set(list_namespaces())
    assert _root_view() == before


def test_two_runs_side_by_side_do_not_collide() -> None:
    with Network(["x"]) as one, Network(["x"]) as two:
        assert not set(one.namespaces) & set(two.namespaces)
        assert one.address("x") == two.address("x")  # each its own switch: no clash
    assert not set(one.namespaces + two.namespaces) & set(list_namespaces())


def _start_holder() -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.testbed", "--network-only"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", line
    return proc, line[1:]


def test_sigterm_tears_the_network_down() -> None:
    proc, names = _start_holder()
    assert set(names) <= set(list_namespaces())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT_S) == 0
    assert not set(names) & set(list_namespaces())


def test_a_killed_runs_namespaces_are_reaped_by_the_next() -> None:
    proc, names = _start_holder()
    proc.kill()
    proc.wait(TIMEOUT_S)
    assert set(names) <= set(list_namespaces())  # SIGKILL: nothing could clean up
    deadline = time.monotonic() + TIMEOUT_S
    while os.path.exists(f"/proc/{proc.pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(names) <= set(reap_stale())
    assert not set(names) & set(list_namespaces())


def test_reserved_ports_are_never_ephemeral_inside_a_host_and_only_there() -> None:
    sysctl = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
    outside = sysctl.read_text()
    with Network(["x"], reserved_ports=[50054, 50051, 8998]) as net:
        read = [
            sys.executable,
            "-c",
            "print(open('/proc/sys/net/ipv4/ip_local_reserved_ports').read())",
        ]
        inside = subprocess.run(
            net.command("x", read), capture_output=True, text=True, timeout=TIMEOUT_S, check=True
        )
        assert inside.stdout.strip() == "8998,50051,50054"
    assert sysctl.read_text() == outside
    with pytest.raises(ValueError, match="reserved_ports"):
        Network(["x"], reserved_ports=[0])
