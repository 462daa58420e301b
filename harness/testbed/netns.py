"""Hosts as Linux network namespaces, wired to a switch of their own.

    with Network(["a", "b", "c"]) as net:       # root, and ``ip netns`` allowed
        net.address("b")                        # 10.77.0.2: its service network
        net.gossip_address("b")                 # 10.77.1.2: its Consul agent's network
        net.command("b", ["python", "-m", ...]) # argv that runs inside host b
        net.set_link("c", up=False)             # host c partitioned (both its links)
        net.set_link("b", up=False, nets=("gossip",))   # only b's Consul agent cut off
    # every namespace, veth and bridge is gone here, also after an exception

Each host gets two interfaces: ``eth0`` on the service network (10.77.0.0/24: gRPC, HTTP,
Mooncake) and ``eth1`` on the gossip network (10.77.1.0/24: Consul's serf and RPC), each a veth
pair whose other end is a port of a bridge (``br0``, ``br1``) in a switch namespace of this
run's own. Interfaces are created straight inside the namespaces, so nothing, no address and
no link, ever appears in the namespace the caller runs in; hosts reach each other only over
the bridges, and a port set down cuts a host off both ways (NO-CARRIER on its side).
``reserved_ports`` go into each host's ``net.ipv4.ip_local_reserved_ports`` (a per-namespace
sysctl): services listen on fixed ports inside the ephemeral range (50051..), and an outgoing
connection that the kernel gave such a port first would make the service's bind fail.

Names carry the creating process's pid and a random token (``pdmt<pid>-<token>-<host>``), so
runs side by side never collide; a run that died without tearing down (SIGKILL) leaves
namespaces whose pid is gone, and the next ``Network`` removes them (``reap_stale``) first.
Teardown kills whatever still runs inside a host, then deletes every namespace; it runs on
leaving the ``with`` block, on ``close()``, at interpreter exit, and on SIGTERM (turned into
``KeyboardInterrupt`` while a network is open, so ``finally`` blocks run; pytest stops after its teardowns).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from types import FrameType, TracebackType

PREFIX = "pdmt"
SERVICE_NET, GOSSIP_NET = "service", "gossip"
NETS = (SERVICE_NET, GOSSIP_NET)
_SUBNET = {SERVICE_NET: "10.77.0", GOSSIP_NET: "10.77.1"}
_IFACE = {SERVICE_NET: "eth0", GOSSIP_NET: "eth1"}
_BRIDGE = {SERVICE_NET: "br0", GOSSIP_NET: "br1"}
_NAME = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+-")
IP_TIMEOUT_S = 10.0
KILL_WAIT_S = 5.0


class NetnsUnavailable(RuntimeError):
    """This process may not make network namespaces (not root, no ``ip``, a sandbox)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (None when they can): tried for real, by
    adding and deleting one."""
    if shutil.which("ip") is None:
        return "no 'ip' command (iproute2)"
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    probe = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        done = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"ip netns add failed: {e}"
    if done.returncode != 0:
        return f"ip netns add is not allowed here: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def list_namespaces() -> list[str]:
    done = _ip("netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    done = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(namespaces: Iterable[str]) -> None:
    """SIGKILL every process in ``namespaces`` and wait (bounded) until they are gone."""
    namespaces = list(namespaces)
    for ns in namespaces:
        for pid in namespace_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline and any(namespace_pids(ns) for ns in namespaces):
        time.sleep(0.05)


def delete_namespaces(namespaces: Iterable[str]) -> None:
    """Kill what runs inside, then delete (hosts before the switch; a deleted namespace takes
    its veth ends and bridges with it)."""
    namespaces = list(namespaces)
    _kill_inside(namespaces)
    for ns in namespaces:
        _ip("netns", "del", ns, check=False)


def reap_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone; returns their names."""
    stale = [
        ns
        for ns in list_namespaces()
        if (m := _NAME.match(ns)) and int(m.group(1)) != os.getpid() and not _pid_alive(int(m[1]))
    ]
    delete_namespaces(sorted(stale, key=lambda n: n.endswith("-switch")))
    return stale


class _SigtermGuard:
    """While any ``Network`` is open (in the main thread): SIGTERM raises ``KeyboardInterrupt``
    so the ``finally`` blocks that tear networks down run; the old handler is put back after."""

    _lock = threading.Lock()
    _open = 0
    _previous: object = None

    @classmethod
    def enter(cls) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        with cls._lock:
            if cls._open == 0:
                cls._previous = signal.signal(signal.SIGTERM, cls._handler)
            cls._open += 1

    @classmethod
    def leave(cls) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        with cls._lock:
            cls._open = max(0, cls._open - 1)
            if cls._open == 0 and cls._previous is not None:
                signal.signal(signal.SIGTERM, cls._previous)  # type: ignore[arg-type]
                cls._previous = None

    @staticmethod
    def _handler(signum: int, frame: FrameType | None) -> None:
        # KeyboardInterrupt, not SystemExit: pytest then stops the session after running
        # every fixture's teardown (a SystemExit would fail one test and go on)
        raise KeyboardInterrupt(f"signal {signum}: tearing the network namespaces down")


class Network:
    def __init__(self, hosts: Sequence[str], reserved_ports: Iterable[int] = ()) -> None:
        """``hosts``: short names (letters, digits), one namespace each, addressed .1, .2 ...
        in the order given; ``reserved_ports``: never handed out as ephemeral ports there."""
        if not hosts or len(set(hosts)) != len(hosts) or len(hosts) > 200:
            raise ValueError(f"hosts {hosts!r}: 1 to 200 distinct names")
        for h in hosts:
            if not re.fullmatch(r"[a-z0-9]{1,8}", h):
                raise ValueError(f"host name {h!r}: 1-8 lower-case letters or digits")
        self.hosts = tuple(hosts)
        self.reserved_ports = tuple(sorted(set(reserved_ports)))
        if any(not 0 < p < 65536 for p in self.reserved_ports):
            raise ValueError(f"reserved_ports {self.reserved_ports!r}: 1 to 65535")
        self.run_id = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        self.switch = f"{self.run_id}-switch"
        self._ns = {h: f"{self.run_id}-{h}" for h in self.hosts}
        self._created: list[str] = []
        self.closed = False

    # -- names and addresses ---------------------------------------------------------------

    def namespace(self, host: str) -> str:
        return self._ns[host]

    @property
    def namespaces(self) -> list[str]:
        return [*self._ns.values(), self.switch]

    def address(self, host: str, net: str = SERVICE_NET) -> str:
        return f"{_SUBNET[net]}.{self.hosts.index(host) + 1}"

    def gossip_address(self, host: str) -> str:
        return self.address(host, GOSSIP_NET)

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host`` (``ip netns exec`` execs it: the pid is argv's own)."""
        return ["ip", "netns", "exec", self._ns[host], *argv]

    # -- life --------------------------------------------------------------------------------

    def create(self) -> Network:
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsUnavailable(reason)
        reap_stale()
        _SigtermGuard.enter()
        atexit.register(self.close)
        try:
            self._add_ns(self.switch)
            for net in NETS:
                _ip("-n", self.switch, "link", "add", _BRIDGE[net], "type", "bridge")
                _ip("-n", self.switch, "link", "set", _BRIDGE[net], "up")
            for host in self.hosts:
                ns = self._ns[host]
                self._add_ns(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                if self.reserved_ports:
                    self._reserve_ports(ns)
                for net in NETS:
                    port = self._port(host, net)
                    _ip(
                        "link", "add", _IFACE[net], "netns", ns, "type", "veth",
                        "peer", "name", port, "netns", self.switch,
                    )  # fmt: skip
                    _ip("-n", self.switch, "link", "set", port, "master", _BRIDGE[net])
                    _ip("-n", self.switch, "link", "set", port, "up")
                    _ip(
                        "-n", ns, "addr", "add", f"{self.address(host, net)}/24", "dev", _IFACE[net]
                    )
                    _ip("-n", ns, "link", "set", _IFACE[net], "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)

    def _reserve_ports(self, ns: str) -> None:
        ports = ",".join(map(str, self.reserved_ports))
        sysctl = f"net.ipv4.ip_local_reserved_ports={ports}"
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", sysctl],
            capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"sysctl -w {sysctl} in {ns}: {done.stderr.strip()}")

    def _port(self, host: str, net: str) -> str:
        return f"p{self.hosts.index(host)}{net[0]}"  # the switch's end of host's veth

    def close(self) -> None:
        """Idempotent: kill what runs inside the hosts, delete every namespace."""
        if self.closed:
            return
        self.closed = True
        hosts_first = [ns for ns in self._created if ns != self.switch]
        delete_namespaces([*hosts_first, *([self.switch] if self.switch in self._created else [])])
        atexit.unregister(self.close)
        _SigtermGuard.leave()

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults ------------------------------------------------------------------------------

    def set_link(self, host: str, up: bool, nets: Sequence[str] = NETS) -> None:
        """Set ``host``'s switch ports up or down: down is a partition (nothing in or out on
        those networks), the host's processes keep running."""
        for net in nets:
            _ip("-n", self.switch, "link", "set", self._port(host, net), "up" if up else "down")

    def link_up(self, host: str, net: str = SERVICE_NET) -> bool:
        done = _ip("-n", self.switch, "-o", "link", "show", self._port(host, net))
        return "state UP" in done.stdout or ",UP" in done.stdout.split(">")[0]

    def pids(self, host: str) -> list[int]:
        """Every process running inside ``host``."""
        return namespace_pids(self._ns[host])
