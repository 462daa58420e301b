"""``PdVsAggConfig``: the flags of ``python -m benchmarks pd-vs-agg``, one field per ``--flag``."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.config_base import ReportedRunConfig, name_list, require_choice, require_positive
from pdmesh.config import flag

TOPOLOGIES = ("1p1d", "2agg")
KV_BACKENDS = ("auto", "cuda_ipc", "mooncake", "grpc")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class PdVsAggConfig(ReportedRunConfig):
    # --- the workers (the same engine flags for every worker of both topologies)
    model: str = flag(
        "random:llama-3.1-8b",
        "model every worker serves (services.decode --model); random:<preset> needs no weights "
        "and no tokenizer: prompts are token ids and nothing is detokenized",
    )
    device: str = flag(
        "cuda",
        "'cuda': two GPUs, the first two visible ones (CUDA_VISIBLE_DEVICES): 1p1d = prefill "
        "on the first, decode on the second; 2agg = one worker on each. 'cpu': every worker "
        "on the CPU",
    )
    topologies: str = flag(
        "1p1d,2agg",
        "comma-separated topologies to run, in this order: '1p1d' (one prefill + one decode "
        "worker, router in PD mode) and '2agg' (two aggregated workers, round_robin)",
    )
    kv_transfer_backend: str = flag(
        "auto",
        "1p1d: how KV moves from prefill to decode (the workers' --kv-transfer-backend): auto, "
        "cuda_ipc, mooncake, grpc; 'auto' = the workers negotiate: cuda_ipc between GPUs of one "
        "host, mooncake otherwise",
    )
    disagg_min_prompt_tokens: int = flag(
        1024,
        "1p1d: the router's --disagg-min-prompt-tokens: shorter prompts (the streams') are "
        "prefilled on the decode worker itself, longer ones on the prefill worker. Measured on "
        "2 H200s (docs/benchmarks.md): sending the streams' 128-token prompts to the prefill "
        "worker too (0) kept the decode's ITL p99 at 10 ms instead of 16, but queued them "
        "behind the long prefills (stream TTFT p50 570 ms instead of 35) and cost 28%% of the "
        "output throughput (1646 vs 2295 tok/s)",
    )
    num_pages: int = flag(8192, "KV pages of every worker")
    page_size: int = flag(16, "tokens per KV page")
    max_model_len: int = flag(16384, "context length of every worker")
    max_running_requests: int = flag(
        48, "most requests decoding at once on a worker (also the largest CUDA-graph batch)"
    )
    max_num_batched_tokens: int = flag(
        512,
        "token budget of one engine step (the prefill chunk): the knob an aggregated worker "
        "trades long-prompt TTFT against the ITL of the streams it decodes meanwhile",
    )
    prefill_max_num_batched_tokens: int = flag(
        0,
        "1p1d: the prefill worker's step budget (it decodes nothing, so bigger chunks cost no "
        "ITL); 0 = --max-num-batched-tokens",
    )
    # --- the workload: steady streams and long prompts at once
    stream_clients: int = flag(
        16,
        "steady streams: clients that each send a short prompt asking for a long output, and "
        "the next as soon as it ends, until the long prompts are done (closed loop)",
    )
    stream_input_len: int = flag(128, "streams: prompt tokens")
    stream_output_len: int = flag(256, "streams: output tokens (EOS ignored: exact)")
    long_requests: int = flag(24, "long prompts sent during the run")
    long_input_min: int = flag(4096, "long prompts: fewest prompt tokens (uniform draw)")
    long_input_max: int = flag(8192, "long prompts: most prompt tokens")
    long_output_len: int = flag(16, "long prompts: output tokens (EOS ignored: exact)")
    long_rate: float = flag(
        1.0, "long prompts per second, Poisson arrivals from --seed (the same in every topology)"
    )
    repeats: int = flag(
        1, "timed runs per topology (each with new prompts, the same across topologies); medians"
    )
    # --- the run (the rest: ReportedRunConfig)
    seed: int = flag(1, "seed of the prompts and arrivals")
    startup_timeout: float = flag(
        600.0, "seconds the processes of a topology get to become healthy"
    )
    json_out: str = flag("", "also write the config, every figure and the ratios to this file")

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(
            self, "num_pages", "page_size", "max_model_len", "max_running_requests",
            "max_num_batched_tokens", "stream_clients", "stream_input_len",
            "stream_output_len", "long_requests", "long_input_min", "long_input_max",
            "long_output_len", "repeats",
        )  # fmt: skip
        require_choice("device", self.device, DEVICES)
        require_choice("kv-transfer-backend", self.kv_transfer_backend, KV_BACKENDS)
        names = self.topology_list()
        if not names or any(t not in TOPOLOGIES for t in names) or len(set(names)) != len(names):
            raise ValueError(
                f"--topologies={self.topologies!r}: a comma-separated subset of "
                f"{', '.join(TOPOLOGIES)}"
            )
        if self.long_input_min > self.long_input_max:
            raise ValueError(
                f"--long-input-min={self.long_input_min} exceeds "
                f"--long-input-max={self.long_input_max}"
            )
        longest = max(self.long_input_max + self.long_output_len,
                      self.stream_input_len + self.stream_output_len)  # fmt: skip
        if longest > self.max_model_len:
            raise ValueError(
                f"a request of {longest} tokens does not fit --max-model-len={self.max_model_len}"
            )
        if self.disagg_min_prompt_tokens < 0 or self.prefill_max_num_batched_tokens < 0:
            raise ValueError(
                "--disagg-min-prompt-tokens and --prefill-max-num-batched-tokens must be >= 0"
            )
        require_positive(self, "long_rate")

    def topology_list(self) -> list[str]:
        return name_list(self.topologies)
