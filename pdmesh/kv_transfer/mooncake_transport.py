"""Which transport a Mooncake engine runs: ``--kv-transfer-protocol`` (auto, rdma, tcp) and
``--disaggregation-ib-device`` (SGLang's flag: RDMA device names, comma-separated) resolved to
what is asked of Mooncake, then checked against what Mooncake found.

    plan = plan_transport("auto", "")          # rdma where /sys/class/infiniband has devices
    engine.initialize(host, "P2PHANDSHAKE", plan.protocol, plan.device_name)
    transport, reason = effective_transport(plan, engine.get_local_topology(""))

``auto`` asks for rdma only where the kernel lists an RDMA device (all of the named ones when
``--disaggregation-ib-device`` names some), else for tcp. ``rdma`` is passed to Mooncake as it
is: where Mooncake's topology discovery finds no usable device it installs its tcp transport
instead (its own fallback), which ``effective_transport`` reports, so the worker says which
transport it really runs. Torch-free, so the choice can be tested without a KV cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROTOCOLS = ("auto", "rdma", "tcp")
MOONCAKE_BACKENDS = ("mooncake", "auto")  # the --kv-transfer-backend values that use Mooncake
DEFAULT_PROTOCOL = "auto"
IB_SYSFS = Path("/sys/class/infiniband")  # one entry per RDMA device (mlx5_0, efa_0, ...)
TCP, RDMA = "tcp", "rdma"


def parse_devices(spec: str) -> list[str]:
    """``"mlx5_0, mlx5_1"`` -> ``["mlx5_0", "mlx5_1"]`` (SGLang's comma-separated form)."""
    return [d.strip() for d in spec.split(",") if d.strip()]


def rdma_devices(sysfs: Path = IB_SYSFS) -> list[str]:
    """The RDMA devices the kernel lists (``ibv_devices`` reads the same directory)."""
    try:
        return sorted(p.name for p in sysfs.iterdir())
    except OSError:  # no RDMA stack at all: the directory does not exist
        return []


@dataclass(frozen=True)
class TransportPlan:
    requested: str  # --kv-transfer-protocol
    protocol: str  # what Mooncake's initialize is given: "rdma" or "tcp"
    device_name: str  # what it is given as device names ("" = Mooncake discovers them)
    reason: str  # for the log line


def plan_transport(
    requested: str, ib_device: str = "", available: list[str] | None = None
) -> TransportPlan:
    """``available``: the host's RDMA devices (default: ``rdma_devices()``)."""
    if requested not in PROTOCOLS:
        raise ValueError(f"--kv-transfer-protocol={requested!r}; choose {', '.join(PROTOCOLS)}")
    wanted = parse_devices(ib_device)
    devices = ",".join(wanted)
    if requested == TCP:
        return TransportPlan(TCP, TCP, "", "--kv-transfer-protocol tcp")
    if requested == RDMA:
        return TransportPlan(RDMA, RDMA, devices, "--kv-transfer-protocol rdma")
    found = rdma_devices() if available is None else available
    if wanted:
        missing = [d for d in wanted if d not in found]
        if not missing:
            return TransportPlan("auto", RDMA, devices, f"auto: RDMA devices {devices} present")
        return TransportPlan(
            "auto",
            TCP,
            "",
            f"auto: --disaggregation-ib-device {', '.join(missing)} not in {IB_SYSFS} "
            f"(found: {', '.join(found) or 'none'})",
        )
    if found:
        return TransportPlan("auto", RDMA, "", f"auto: RDMA devices {', '.join(found)} present")
    return TransportPlan("auto", TCP, "", f"auto: no RDMA device in {IB_SYSFS}")


def topology_devices(topology: str) -> list[str] | None:
    """The RDMA devices (HCAs) in Mooncake's topology JSON (``get_local_topology``:
    ``{"cpu:0": [[preferred...], [available...]], ...}``); None when it does not parse."""
    try:
        parsed = json.loads(topology)
    except (TypeError, ValueError):
        return None
    if not isinstance(parsed, dict):
        return None
    names: set[str] = set()
    for entry in parsed.values():
        if not isinstance(entry, list):
            return None
        for group in entry:
            if isinstance(group, list):
                names.update(str(n) for n in group)
    return sorted(names)


def effective_transport(plan: TransportPlan, topology: str) -> tuple[str, str]:
    """The transport the engine runs after ``initialize`` and why: rdma asked for with no
    device found in Mooncake's topology is Mooncake's fallback to tcp."""
    if plan.protocol == TCP:
        return TCP, plan.reason
    devices = topology_devices(topology)
    if devices is None:  # cannot tell: trust the request
        return RDMA, f"{plan.reason} (Mooncake's topology did not parse)"
    if not devices:
        return TCP, (
            f"{plan.reason}, but Mooncake found no RDMA device"
            + (f" among {plan.device_name}" if plan.device_name else "")
            + ": it fell back to tcp"
        )
    return RDMA, f"{plan.reason}; Mooncake uses {', '.join(devices)}"


def pair_refusal(receiver_transport: str, sender_transport: str) -> str | None:
    """Why a sender running ``sender_transport`` cannot write to a receiver running
    ``receiver_transport`` (Mooncake selects the transport from the receiver's segment, and an
    engine has only the one it installed); "" counts as tcp."""
    receiver_transport = receiver_transport or TCP
    if receiver_transport == (sender_transport or TCP):
        return None
    return (
        f"it receives KV over mooncake {receiver_transport}, this prefill's Mooncake engine runs "
        f"{sender_transport or TCP} (set the same --kv-transfer-protocol on both, or auto on "
        "hosts that both have, or both lack, RDMA devices)"
    )


def describe(backend: str, transport: str) -> str:
    """``mooncake tcp``, ``cuda_ipc``: how a pair moves KV, for logs and the bootstrap reply."""
    return f"{backend} {transport}" if transport else backend
