"""What a pdmesh worker tells SGLang clients about itself: ``GetModelInfo``, ``GetServerInfo``
and ``GetLoads`` replies, built from the worker's own ``pdmesh.v1`` model info, its model source
and the engine's load.

``server_args`` uses SGLang's ``ServerArgs`` names where one exists (see ``server_args``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

import pdmesh
from pdmesh.engine.outputs import EngineLoad
from pdmesh.models.source import ModelSource
from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.v1 import worker_pb2
from services.sglang_grpc import server_args as sa

SERVER_VERSION = f"pdmesh-{pdmesh.__version__}"


@dataclass(frozen=True)
class WorkerFacts:
    """Everything the info replies need that does not change while the worker serves."""

    model_info: worker_pb2.GetModelInfoResponse  # the worker's pdmesh.v1 GetModelInfo reply
    source: ModelSource
    max_running_requests: int
    started_at: float = field(default_factory=time.time)

    @property
    def tokenizer_dir(self) -> Path | None:
        """The local directory with the model's tokenizer files, if it has one."""
        path = self.source.path
        return path if path is not None and (path / "tokenizer.json").is_file() else None


def model_info_to_pb(facts: WorkerFacts) -> sgl.GetModelInfoResponse:
    info, mcfg = facts.model_info, facts.source.config
    tokenizer_dir = facts.tokenizer_dir
    eos = list(info.eos_token_ids)
    return sgl.GetModelInfoResponse(
        model_path=str(facts.source.path or facts.source.name),
        tokenizer_path=str(tokenizer_dir or ""),
        is_generation=True,
        served_model_name=info.model_name,
        max_context_length=info.max_model_len,
        vocab_size=info.vocab_size,
        supports_vision=False,
        model_type="llama",  # every architecture pdmesh runs is Llama-shaped
        eos_token_ids=eos,
        pad_token_id=eos[0] if eos else 0,
        bos_token_id=mcfg.bos_token_id if mcfg.bos_token_id is not None else 0,
        # a prompt must leave room for at least one generated token
        max_req_input_len=max(info.max_model_len - 1, 0),
        architectures=[mcfg.architecture],
    )


def server_info_to_pb(facts: WorkerFacts, load: EngineLoad) -> sgl.GetServerInfoResponse:
    info = facts.model_info
    args = Struct()
    args.update(
        {
            "model_path": str(facts.source.path or facts.source.name),
            "tokenizer_path": str(facts.tokenizer_dir or ""),
            "served_model_name": info.model_name,
            "context_length": info.max_model_len,
            sa.PAGE_SIZE: info.page_size,
            "dtype": info.dtype,
            "device": info.device,
            "max_running_requests": facts.max_running_requests,
            sa.DISAGGREGATION_MODE: sa.DISAGGREGATION_MODES.get(info.role or "aggregated", "null"),
            sa.BOOTSTRAP_PORT: info.bootstrap_port,
            "grpc_mode": True,
            sa.MIGRATION_LIMIT: info.migration_limit,
        }
    )
    start = Timestamp()
    start.FromSeconds(int(facts.started_at))
    return sgl.GetServerInfoResponse(
        server_args=args,
        active_requests=load.num_running + load.num_waiting,
        uptime_seconds=time.time() - facts.started_at,
        sglang_version=SERVER_VERSION,
        server_type="grpc",
        start_time=start,
        max_total_num_tokens=load.num_total_pages * load.page_size,
    )


def loads_to_pb(facts: WorkerFacts, load: EngineLoad) -> sgl.GetLoadsResponse:
    """One data-parallel rank (pdmesh runs one engine per worker)."""
    total_tokens = load.num_total_pages * load.page_size
    used_tokens = (load.num_total_pages - load.num_free_pages) * load.page_size
    running = load.num_running + load.num_awaiting_kv + load.num_held
    rank = sgl.SchedulerLoad(
        dp_rank=0,
        num_running_reqs=running,
        num_waiting_reqs=load.num_waiting,
        num_total_reqs=running + load.num_waiting,
        num_used_tokens=used_tokens,
        max_total_num_tokens=total_tokens,
        token_usage=load.page_usage,
        cache_hit_rate=load.prefix_hit_rate,
        utilization=load.page_usage,
        max_running_requests=facts.max_running_requests,
    )
    role = facts.model_info.role or "aggregated"
    if role != "aggregated":
        rank.disaggregation.CopyFrom(
            sgl.DisaggregationMetrics(
                mode=sa.DISAGGREGATION_MODES[role],
                prefill_inflight_queue_reqs=load.num_held,
                decode_transfer_queue_reqs=load.num_awaiting_kv,
            )
        )
    return sgl.GetLoadsResponse(
        timestamp=datetime.now(timezone.utc).isoformat(),
        version=SERVER_VERSION,
        dp_rank_count=1,
        loads=[rank],
        aggregate=sgl.AggregateMetrics(
            total_running_reqs=running,
            total_waiting_reqs=load.num_waiting,
            total_reqs=running + load.num_waiting,
            avg_token_usage=load.page_usage,
            avg_utilization=load.page_usage,
        ),
    )
