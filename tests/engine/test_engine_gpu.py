"""The engine on CUDA (skipped without a GPU): same tokens as on the CPU, bf16 runs."""

from __future__ import annotations

import pytest

from pdmesh.engine import SamplingParams
from tests.engine.conftest import EngineFactory, assert_all_pages_free, generate

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 60)), [7] * 33]
GREEDY = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)


def test_cuda_float32_matches_cpu(make_tiny_engine: EngineFactory) -> None:
    cpu_engine = make_tiny_engine(device="cpu")
    cpu = generate(cpu_engine, PROMPTS, GREEDY)
    # CUDA graphs and the triton kernels (exact float32 products) against the CPU's SDPA;
    # random init draws from a per-device generator, so the GPU engine gets the CPU's weights
    gpu_engine = make_tiny_engine(device="cuda", dtype="float32", max_running_requests=4)
    gpu_engine.runner.model.load_state_dict(cpu_engine.runner.model.state_dict())
    assert gpu_engine.runner.graphs is not None
    assert generate(gpu_engine, PROMPTS, GREEDY) == cpu
    assert_all_pages_free(gpu_engine)


def test_cuda_bfloat16_default_and_kv_layout(make_tiny_engine: EngineFactory) -> None:
    # dtype auto (the factory's default is float32); chunked prefill too
    engine = make_tiny_engine(device="cuda", dtype="auto", max_num_batched_tokens=8)
    assert engine.dtype.is_floating_point and str(engine.dtype) == "torch.bfloat16"
    outs = generate(engine, PROMPTS, GREEDY)
    assert [len(o) for o in outs] == [16, 16, 16]
    layout = engine.kv_layout()
    assert layout.device.startswith("cuda") and layout.dtype == "bfloat16"
    assert layout.page_addr(0) == engine.runner.kv_cache.data_ptr()
    assert_all_pages_free(engine)


def test_engine_on_a_second_gpu_of_the_process_is_correct(make_tiny_engine: EngineFactory) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    first = make_tiny_engine(device="cuda:0", dtype="float32", max_running_requests=4)
    second = make_tiny_engine(device="cuda:1", dtype="float32", max_running_requests=4)
    second.runner.model.load_state_dict(first.runner.model.state_dict())
    # cuda:1 of a process runs plain torch ops (cuda_graphs.use_kernels says why), correctly
    assert second.runner.graphs is None and not second.runner.kernels
    assert first.runner.graphs is not None
    assert generate(second, PROMPTS, GREEDY) == generate(first, PROMPTS, GREEDY)
    assert_all_pages_free(second)
