"""``BenchConfig``: the benchmark's flags, one dataclass field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.config_base import require_at_least, require_positive
from pdmesh.config import flag
from pdmesh.engine.config import DTYPES


@dataclass(frozen=True)
class BenchConfig:
    model: str = flag(
        "smollm2-135m-instruct",
        "model for both sides: 'smollm2-135m-instruct', a local Hugging Face directory (transformers "
        "loads it from there), or 'random:<preset>' (transformers gets pdmesh's random weights)",
    )
    device: str = flag("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N'")
    dtype: str = flag(
        "auto",
        "'auto' (the engine's choice: float32 on CPU, bfloat16 on CUDA), 'float32' or "
        "'bfloat16'; both sides run it",
    )
    prompt_len: int = flag(128, "tokens per prompt (random ids from --seed)")
    prefill_batch: int = flag(0, "prompts in the prefill measurement; 0 = 4 on CPU, 16 on CUDA")
    decode_tokens: int = flag(32, "new tokens per request in the decode measurement (greedy)")
    decode_batches: str = flag(
        "",
        "comma-separated batch sizes of the decode measurement; empty = 1,16 on CPU, 1,32 on CUDA",
    )
    repeats: int = flag(3, "timed runs of each measurement; the table shows their median")
    warmup: int = flag(
        1, "untimed runs of each measurement first (same prompts and length as the timed ones)"
    )
    page_size: int = flag(16, "pdmesh KV page size in tokens")
    seed: int = flag(0, "seed of the random prompt token ids")
    threads: int = flag(0, "torch CPU threads (torch.set_num_threads); 0 = torch's default")
    compare_dtypes: bool = flag(
        False,
        "instead of the comparison with transformers, time pdmesh alone in float32 and "
        "bfloat16 (prefill and decode) and say which is faster",
    )
    skip_reference: bool = flag(False, "time pdmesh only, no transformers")
    profile_steps: int = flag(
        0,
        "after the timings, profile this many pdmesh decode steps at the largest decode batch "
        "(torch.profiler) and print the time per step phase and the top ops; 0 = off",
    )
    json_out: str = flag("", "also write every measurement (all repeats and medians) to this file")

    def __post_init__(self) -> None:
        require_positive(self, "prompt_len", "decode_tokens", "repeats", "page_size")
        require_at_least(self, 0, "prefill_batch", "warmup", "threads", "profile_steps")
        if self.decode_tokens < 2:
            raise ValueError("--decode-tokens must be >= 2: a decode step needs a second token")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype={self.dtype!r}; choose auto, {', '.join(DTYPES)}")
        self.batches()  # fail on a malformed --decode-batches before any model loads

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def on_cuda(self) -> bool:
        return self.torch_device().type == "cuda"

    def batches(self) -> list[int]:
        """The decode batch sizes, with the device's default when the flag is empty."""
        raw = self.decode_batches or ("1,32" if self.on_cuda() else "1,16")
        try:
            sizes = [int(x) for x in raw.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(
                f"--decode-batches={raw!r} is not a comma-separated list of ints"
            ) from e
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"--decode-batches={raw!r} needs positive batch sizes")
        return sizes

    def prefill_size(self) -> int:
        return self.prefill_batch or (16 if self.on_cuda() else 4)

    def dtype_names(self) -> list[str]:
        """The dtypes to run, by name; 'auto' resolves the way the engine resolves it."""
        if self.compare_dtypes:
            return ["float32", "bfloat16"]
        if self.dtype == "auto":
            return ["bfloat16" if self.on_cuda() else "float32"]
        return [self.dtype]

    def max_batch(self) -> int:
        return max(self.prefill_size(), *self.batches())
