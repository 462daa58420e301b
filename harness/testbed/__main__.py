"""Bring the multi-host bed up and hold it until Ctrl-C / SIGTERM (root, ``ip netns``):

    python -m harness.testbed                  # the whole mesh on hosts a, b, c; prints where
    python -m harness.testbed --network-only   # only the namespaces (the teardown tests use it)

Everything is torn down on the way out, also on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from harness.testbed.bed import HOSTS, BedConfig, MultiHostBed
from harness.testbed.netns import Network, unavailable_reason


def _wait_for_signal() -> None:
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    signal.sigwait(stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.testbed", description=__doc__)
    parser.add_argument("--log-dir", type=Path, default=None, help="logs (default: a temp dir)")
    parser.add_argument(
        "--network-only", action="store_true", help="make the namespaces only, no services"
    )
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"error: the multi-host bed cannot run here: {reason}", file=sys.stderr)
        return 2
    if args.network_only:
        with Network(HOSTS) as net:
            print(f"ready {' '.join(net.namespaces)}", flush=True)
            _wait_for_signal()
        return 0
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="pdmesh-testbed-"))
    with MultiHostBed(BedConfig(log_dir)) as bed:
        print(f"ready: gateway {bed.gateway_url}  (logs: {log_dir})", flush=True)
        for s in bed.services.values():
            print(f"  {s.name:10} host {s.host} {s.address:18} via {s.local}", flush=True)
        _wait_for_signal()
    return 0


if __name__ == "__main__":
    sys.exit(main())
