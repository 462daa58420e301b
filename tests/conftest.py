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
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
