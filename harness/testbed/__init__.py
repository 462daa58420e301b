"""Many hosts on one machine: network namespaces as hosts (``netns``), a forwarder that lets
the caller reach them (``forward``) and the multi-host pdmesh bed on top (``bed``), shared by
``tests/multihost`` and ``make test-multihost`` / ``python -m harness.testbed``. Needs root and
``ip netns``; ``netns.unavailable_reason()`` says why not where it cannot run."""

from harness.testbed.bed import BedConfig, MultiHostBed
from harness.testbed.netns import NetnsUnavailable, Network, unavailable_reason

__all__ = ["BedConfig", "MultiHostBed", "NetnsUnavailable", "Network", "unavailable_reason"]
