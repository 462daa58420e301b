"""The multi-host bed for ``tests/multihost`` (``harness.testbed``): skipped, naming the reason,
where network namespaces cannot be made (not root, no ``ip netns``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.testbed import BedConfig, MultiHostBed, unavailable_reason

REASON = unavailable_reason()
needs_netns = pytest.mark.skipif(
    REASON is not None,
    reason=f"the multi-host bed needs root and ip netns ({REASON}); run make test-multihost as root",
)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHostBed]:
    if REASON is not None:
        pytest.skip(f"the multi-host bed needs root and ip netns: {REASON}")
    bed = MultiHostBed(BedConfig(tmp_path_factory.mktemp("multihost"))).start()
    try:
        yield bed
    finally:
        failures = bed.stop()
    assert not failures, "\n".join(failures)
