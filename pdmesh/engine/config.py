"""Engine configuration: one frozen dataclass, each field a ``--flag`` of the worker services."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pdmesh.config import flag

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str = flag(
        "smollm2-135m-instruct",
        "model to serve: 'smollm2-135m-instruct' (fetched and converted on first use), a local "
        "Hugging Face directory, or 'random:<preset>' (e.g. random:llama-3.1-8b)",
    )
    device: str = flag("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = flag(
        "auto",
        "'auto' (bfloat16 on CUDA; on CPU bfloat16 where the CPU has native bf16 instructions "
        "(avx512_bf16/amx_bf16: measured 1.2-1.9x faster than float32), else float32), "
        "'float32', 'bfloat16' or 'float16'",
        env="PDMESH_DTYPE",
    )
    page_size: int = flag(16, "tokens per KV page")
    num_pages: int = flag(0, "KV pages in the pool; 0 sizes the pool from --kv-cache-memory-gb")
    kv_cache_memory_gb: float = flag(
        0.0, "memory for the KV pool when --num-pages is 0; 0 = 1 GB on CPU, 80%% of free on CUDA"
    )
    max_running_requests: int = flag(64, "most requests decoding at once")
    max_num_batched_tokens: int = flag(512, "token budget of one step (prefill chunk size)")
    max_model_len: int = flag(0, "context length; 0 = the model's, capped at 32768")
    default_max_tokens: int = flag(
        0,
        "most tokens a request that sets no max_tokens / max_new_tokens generates; 0 = what "
        "is left of the context length (OpenAI's and vLLM's default)",
    )
    enable_prefix_cache: bool = flag(True, "reuse KV of full pages shared with earlier prompts")
    seed: int = flag(0, "seed of the engine's generator for unseeded requests")
    disable_cuda_graph: bool = flag(
        False, "CUDA: launch every decode step's kernels one by one instead of replaying graphs"
    )
    cuda_graph_max_bs: int = flag(
        0,
        "CUDA: largest decode batch captured as a CUDA graph (bigger ones run eagerly); "
        "0 = --max-running-requests",
    )

    tp_size: int = flag(
        1,
        "tensor parallelism: shard the model over N devices, one engine process per rank "
        "(cuda:0..N-1 of the visible GPUs, joined by NCCL; on CPU N processes over gloo). The "
        "worker process serves gRPC and sends every engine call to rank 0, which runs it and "
        "broadcasts it to the other ranks, so all schedule the same steps; aggregated workers",
    )
    tp_timeout: float = flag(
        30.0,
        "tensor parallelism: seconds a collective may wait for the other ranks before the "
        "rank gives up (a rank that died then takes its worker down instead of hanging it)",
    )

    disable_overlap_schedule: bool | None = flag(
        None,
        "run each step's CPU work (schedule, inputs, outputs) after its GPU work instead of "
        "while the previous step runs (SGLang's name); unset = overlap on CUDA, not on CPU "
        "(nothing runs asynchronously there); --no-disable-overlap-schedule forces it on",
    )

    def __post_init__(self) -> None:
        for name in ("page_size", "max_running_requests", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("num_pages", "max_model_len", "cuda_graph_max_bs", "default_max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.tp_size < 1:
            raise ValueError(f"tp_size={self.tp_size} must be >= 1")
        if self.tp_timeout <= 0:
            raise ValueError(f"tp_timeout={self.tp_timeout} must be > 0")
        if self.kv_cache_memory_gb < 0:
            raise ValueError(f"kv_cache_memory_gb={self.kv_cache_memory_gb} must be >= 0")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose auto, {', '.join(DTYPES)}")

    def graph_max_batch(self) -> int:
        """Decode batch sizes up to this run as CUDA graphs (0: none)."""
        if self.disable_cuda_graph:
            return 0
        return self.cuda_graph_max_bs or self.max_running_requests

    def overlap_schedule(self, device: torch.device) -> bool:
        """Whether a step launches before the previous step's tokens reach the host."""
        if self.disable_overlap_schedule is None:
            return device.type == "cuda"
        return not self.disable_overlap_schedule

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def for_rank(self, rank: int) -> EngineConfig:
        """This config on tensor-parallel rank ``rank``: its own GPU (``cuda:<rank>``, or
        ``cuda:<N + rank>`` from ``cuda:N``); every rank of a CPU worker on the CPU."""
        device = self.torch_device()
        if device.type != "cuda":
            return self
        return dataclasses.replace(self, device=f"cuda:{(device.index or 0) + rank}")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            fast_bf16 = device.type == "cuda" or cpu_has_native_bf16()
            return torch.bfloat16 if fast_bf16 else torch.float32
        return DTYPES[self.dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively; without it bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
