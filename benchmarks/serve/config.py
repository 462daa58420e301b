"""``ServeBenchConfig``: the load generator's flags, one dataclass field per ``--flag``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from benchmarks.config_base import dash, require_at_least, require_positive
from pdmesh.config import flag

BACKENDS = ("openai", "openai-chat", "grpc")
DATASETS = ("random", "shared-prefix", "sharegpt")
INPUT_FORMATS = ("text", "token-ids")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_GRPC_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class ServeBenchConfig:
    # --- where to send, and how
    backend: str = flag(
        "openai",
        "'openai': POST {base-url}/v1/completions; 'openai-chat': POST {base-url}/v1/chat/"
        "completions (the prompt as a user message, a shared prefix as the system message); "
        "'grpc': pdmesh.v1.RouterService.Generate on --grpc-target. All of them stream",
    )
    base_url: str = flag(DEFAULT_BASE_URL, "openai backends: the gateway's URL (no /v1 suffix)")
    grpc_target: str = flag(DEFAULT_GRPC_TARGET, "grpc backend: the router's host:port")
    model: str = flag(
        "",
        "openai backends: the 'model' of each request; empty = the first id GET /v1/models lists",
    )
    api_key: str = flag(
        "", "openai backends: sent as 'Authorization: Bearer KEY' when set", env="PDMESH_API_KEY"
    )
    # --- what to send
    dataset: str = flag(
        "random",
        "'random' (random token ids, lengths from --random-*), 'shared-prefix' (--num-groups "
        "system prompts x --prompts-per-group questions each) or 'sharegpt' (--dataset-path)",
    )
    num_prompts: int = flag(
        100, "requests to send (random, sharegpt); shared-prefix sends groups x prompts-per-group"
    )
    input_format: str = flag(
        "text",
        "'text': prompts are text (random ids decoded by --tokenizer); 'token-ids': prompts are "
        "sent as token ids (openai: a list of ints as 'prompt'; grpc: token_ids), so the server "
        "sees exactly the drawn lengths. openai-chat takes text only",
    )
    tokenizer: str = flag(
        "",
        "Hugging Face dir (or tokenizer.json file) that turns random ids into text and counts "
        "tokens; empty = the default model's dir (pdmesh.models.fetch, converted on first use)",
    )
    seed: int = flag(1, "seed for the dataset (lengths, ids, ShareGPT order) and the arrivals")
    random_input_len: int = flag(256, "random: most prompt tokens")
    random_output_len: int = flag(128, "random: most output tokens (max_tokens of the request)")
    random_range_ratio: float = flag(
        0.0,
        "random: lengths are drawn uniformly from [len*(1-ratio), len]; 0 = exactly len, "
        "1 = anywhere in [1, len]. Note SGLang's flag of this name means the reverse",
    )
    num_groups: int = flag(8, "shared-prefix: distinct system prompts (tenants)")
    prompts_per_group: int = flag(16, "shared-prefix: users (questions) per system prompt")
    system_prompt_len: int = flag(512, "shared-prefix: tokens of each system prompt")
    question_len: int = flag(64, "shared-prefix: tokens of each user question")
    shared_prefix_output_len: int = flag(64, "shared-prefix: output tokens of every request")
    dataset_path: str = flag(
        "",
        "sharegpt: a JSON file, a list of {conversations: [{from, value}, ...]}; the first "
        "human turn is the prompt, the following gpt turn's token count the output length",
    )
    sharegpt_output_len: int = flag(
        0, "sharegpt: ask every request for this many output tokens; 0 = the gpt turn's length"
    )
    sharegpt_max_prompt_len: int = flag(
        1024, "sharegpt: skip conversations whose prompt has more tokens; 0 = no limit"
    )
    sharegpt_max_total_len: int = flag(
        2048, "sharegpt: skip conversations whose prompt + output exceed this; 0 = no limit"
    )
    # --- sampling
    temperature: float = flag(0.0, "sampling temperature of every request; 0 = greedy")
    ignore_eos: bool = flag(
        False,
        "ask the server to keep generating past EOS ('ignore_eos' in the OpenAI body, "
        "sampling_params.ignore_eos over gRPC), so output lengths are exactly the asked ones",
    )
    extra_request_body: str = flag(
        "",
        "JSON object merged into every request: the OpenAI body, or the SamplingParams over "
        "gRPC (e.g. '{\"top_p\": 0.9}')",
    )
    json_schema_fraction: float = flag(
        0.0,
        "--backend grpc: this fraction of the requests (spread evenly by index) carries "
        "sampling_params.json_schema = --json-schema; the report compares their output tok/s "
        "and ITL with the free requests of the same run",
    )
    json_schema: str = flag(
        "",
        "the JSON schema of --json-schema-fraction's requests (JSON text); empty = a built-in "
        "object with a title, 6 string tags and a score",
    )
    # --- load
    request_rate: float = flag(
        math.inf,
        "requests per second, with Poisson (exponential inter-arrival) timing from --seed; "
        "inf = send every request at once",
    )
    max_concurrency: int = flag(
        0, "most requests in flight at once (later ones wait for a slot); 0 = no limit"
    )
    request_timeout: float = flag(
        600.0, "seconds one request may take, start to last byte, before it counts as failed"
    )
    warmup_requests: int = flag(
        1,
        "requests sent (at most 16 output tokens each) before the timed run; if all of them "
        "fail, the benchmark stops there with their error. 0 = no warmup",
    )
    # --- SLOs for goodput
    slo_ttft_ms: float | None = flag(None, "goodput SLO: time to first token, ms")
    slo_tpot_ms: float | None = flag(None, "goodput SLO: time per output token, ms")
    slo_e2e_ms: float | None = flag(None, "goodput SLO: end-to-end latency, ms")
    # --- output
    output_json: str = flag("", "also write the config and the results to this JSON file")
    output_details: bool = flag(
        False, "with --output-json: include every request's timings, lengths and error"
    )
    progress: bool = flag(True, "show a progress bar (on stderr) while requests run")

    def __post_init__(self) -> None:
        _choice("backend", self.backend, BACKENDS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("input-format", self.input_format, INPUT_FORMATS)
        if self.backend == "openai-chat" and self.input_format == "token-ids":
            raise ValueError("--backend openai-chat sends messages: use --input-format text")
        require_positive(
            self, "num_prompts", "random_input_len", "random_output_len", "num_groups",
            "prompts_per_group", "system_prompt_len", "question_len", "shared_prefix_output_len",
        )  # fmt: skip
        require_at_least(
            self, 0, "sharegpt_output_len", "sharegpt_max_prompt_len", "sharegpt_max_total_len",
            "max_concurrency", "warmup_requests", "temperature",
        )  # fmt: skip
        if not 0.0 <= self.random_range_ratio <= 1.0:
            raise ValueError(f"--random-range-ratio={self.random_range_ratio} must be in [0, 1]")
        if not self.request_rate > 0:  # also rejects nan
            raise ValueError(f"--request-rate={self.request_rate} must be > 0 (inf = all at once)")
        if not self.request_timeout > 0:
            raise ValueError(f"--request-timeout={self.request_timeout} must be > 0")
        for name in ("slo_ttft_ms", "slo_tpot_ms", "slo_e2e_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{dash(name)}={value} must be > 0")
        if not 0.0 <= self.json_schema_fraction <= 1.0:
            raise ValueError(
                f"--json-schema-fraction={self.json_schema_fraction} must be in [0, 1]"
            )
        if self.json_schema_fraction and self.backend != "grpc":
            raise ValueError("--json-schema-fraction needs --backend grpc")
        if self.dataset == "sharegpt" and not self.dataset_path:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE")
        if self.output_details and not self.output_json:
            raise ValueError("--output-details needs --output-json FILE")
        self.extra_body()  # a malformed --extra-request-body fails before any request is sent

    def extra_body(self) -> dict[str, Any]:
        """``--extra-request-body`` parsed; {} when unset."""
        if not self.extra_request_body:
            return {}
        try:
            body = json.loads(self.extra_request_body)
        except json.JSONDecodeError as e:
            raise ValueError(f"--extra-request-body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise ValueError("--extra-request-body must be a JSON object")
        return body

    def uses_openai(self) -> bool:
        return self.backend in ("openai", "openai-chat")


# "choose one of": the load generator's wording since its first release; tests match it
def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name}={value!r}; choose one of {', '.join(choices)}")
