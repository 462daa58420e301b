from __future__ import annotations

import os

import pytest
import torch

# keep test runs on 2-core CI machines predictable
torch.set_num_threads(min(2, os.cpu_count() or 1))
# float32 everywhere in tests, services started as subprocesses included: outputs are compared
# token for token with transformers (float32) and across batch shapes, where bf16 rounding
# would flip near-ties. Serving defaults to bf16 on CPUs with native bf16 (see EngineConfig).
os.environ.setdefault("PDMESH_DTYPE", "float32")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the benchmark harnesses' own tests (each starts a whole mesh, some smg too) keep the
    # default suite inside its time on 2-core CI machines; make test-bench runs them
    bench = os.environ.get("PDMESH_BENCH_TESTS") == "1"
    skip_bench = pytest.mark.skip(reason="benchmark harness: make test-bench runs it")
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
        if "bench" in item.keywords and not bench:
            item.add_marker(skip_bench)
