"""The arms of the mesh benchmark: for each, the client of ``benchmarks.serve`` that drives it
and the form its prompts take. Every arm asks for the same ``--output-len`` tokens, greedy,
EOS ignored; they differ only in how far from the worker the client sits and what it asks for.

- direct: ``WorkerService.Generate`` per request, token ids in and out (the baseline);
- router-ids: ``RouterService.Generate``, token ids, ``detokenize: false`` (the routing hop
  alone: no tokenizer, no text);
- router-text: ``RouterService.Generate``, a text prompt, text back (tokenize + detokenize);
- gateway: OpenAI chat completions streamed as SSE, through gateway and router;
- smg: the same chat completions through SGLang's gateway smg (gRPC mode, its own Rust
  tokenizer and detokenizer) to the same worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.mesh.config import DIRECT, GATEWAY, ROUTER_IDS, ROUTER_TEXT, SMG, MeshBenchConfig
from benchmarks.mesh.worker_backend import WorkerBackend
from benchmarks.serve.backends import Backend, make_backend
from benchmarks.serve.config import DEFAULT_BASE_URL, DEFAULT_GRPC_TARGET, ServeBenchConfig


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    backend: str  # ServeBenchConfig.backend ("grpc" for the worker too: see WorkerBackend)
    token_ids: bool  # prompts as token ids (else text)
    detokenize: bool = True


ARMS = {
    DIRECT: Arm(DIRECT, "(1) worker direct, gRPC ids", "grpc", token_ids=True),
    ROUTER_IDS: Arm(
        ROUTER_IDS, "(2) router gRPC, ids, no detok", "grpc", token_ids=True, detokenize=False
    ),
    ROUTER_TEXT: Arm(ROUTER_TEXT, "(3) router gRPC, text", "grpc", token_ids=False),
    GATEWAY: Arm(GATEWAY, "(4) gateway OpenAI chat SSE", "openai-chat", token_ids=False),
    SMG: Arm(SMG, "(5) smg OpenAI chat SSE", "openai-chat", token_ids=False),
}


def serve_config(arm: Arm, target: str, cfg: MeshBenchConfig) -> ServeBenchConfig:
    """The load generator's settings for ``arm`` against ``target`` (host:port or base URL)."""
    grpc_arm = arm.backend == "grpc"
    return ServeBenchConfig(
        backend=arm.backend,
        base_url=DEFAULT_BASE_URL if grpc_arm else target,
        grpc_target=target if grpc_arm else DEFAULT_GRPC_TARGET,
        input_format="token-ids" if arm.token_ids else "text",
        temperature=0.0,
        ignore_eos=True,
        extra_request_body="" if arm.detokenize else '{"detokenize": false}',
        request_timeout=cfg.request_timeout,
        progress=False,
    )


def backend_for(arm: Arm, target: str, cfg: MeshBenchConfig) -> Backend:
    serve = serve_config(arm, target, cfg)
    if arm.name == DIRECT:
        return WorkerBackend(serve)
    return make_backend(serve)
