"""``bench serve`` client side without a server: SSE parsing, Poisson arrivals, the runner's
concurrency cap, the flags, and the request bodies each backend builds."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import numpy as np
import pytest

from benchmarks.serve.__main__ import build_parser
from benchmarks.serve.backends import Backend
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.grpc_backend import GrpcBackend
from benchmarks.serve.openai_backend import OpenAIBackend, error_message
from benchmarks.serve.runner import poisson_arrivals, run_requests
from benchmarks.serve.sse import SSEDecoder
from benchmarks.serve.timing import RequestResult, StreamClock
from pdmesh.config import from_args
from pdmesh.v1 import common_pb2

# ------------------------------------------------------------------------------------- SSE

STREAM = (
    ": keep-alive comment\r\n\r\n"
    'data: {"text": "héllo 世界 🎉"}\r\n\r\n'
    "event: message\nid: 7\ndata: line one\ndata:line two\n\n"
    "data: [DONE]\n\n"
).encode()
EVENTS = ['{"text": "héllo 世界 🎉"}', "line one\nline two", "[DONE]"]


def test_sse_whole_stream() -> None:
    d = SSEDecoder()
    assert d.feed(STREAM) + d.flush() == EVENTS


def test_sse_split_at_every_byte_boundary() -> None:
    # reads split lines, CRLF pairs and multi-byte characters anywhere
    for cut in range(1, len(STREAM)):
        d = SSEDecoder()
        assert d.feed(STREAM[:cut]) + d.feed(STREAM[cut:]) + d.flush() == EVENTS, cut


def test_sse_byte_by_byte_and_unterminated_last_event() -> None:
    d = SSEDecoder()
    out = [e for b in b'data: {"a": 1}\n\ndata: tail' for e in d.feed(bytes([b]))]
    assert out == ['{"a": 1}']
    assert d.flush() == ["tail"]  # a server that closes without the final blank line
    assert d.flush() == []


def test_error_message_shapes() -> None:
    assert error_message('{"error": {"message": "bad top_p", "type": "x"}}') == "bad top_p"
    assert error_message('{"detail": "Not Found"}') == "Not Found"
    assert error_message("<html>502</html>") == "<html>502</html>"
    assert len(error_message("x" * 5000)) == 300


# -------------------------------------------------------------------------------- arrivals


def test_poisson_mean_inter_arrival_is_one_over_rate() -> None:
    rate = 8.0
    t = poisson_arrivals(20_000, rate, seed=3)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # exponential gaps: standard deviation equal to the mean (coefficient of variation 1)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    assert poisson_arrivals(100, rate, seed=3) == t[:100]  # fixed by the seed
    assert poisson_arrivals(100, rate, seed=4) != t[:100]


def test_infinite_rate_sends_all_at_once() -> None:
    assert poisson_arrivals(5, math.inf, seed=0) == [0.0] * 5
    assert poisson_arrivals(0, 1.0, seed=0) == []


# ---------------------------------------------------------------------------------- runner


class SleepBackend(Backend):
    """Answers every request after ``delay`` seconds, recording concurrency and send times."""

    def __init__(self, delay: float) -> None:
        super().__init__(ServeBenchConfig())
        self.delay = delay
        self.active = 0
        self.peak = 0
        self.sent: list[tuple[str, float]] = []

    @property
    def target(self) -> str:
        return "sleep"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def _stream(
        self, req: BenchRequest, request_id: str, clock: StreamClock, result: RequestResult
    ) -> RequestResult:
        self.sent.append((request_id, clock.start))
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(self.delay)
        clock.arrived(1)
        self.active -= 1
        return clock.finish(result, completion_tokens=req.output_len)


def requests(n: int) -> list[BenchRequest]:
    return [BenchRequest(i, [1, 2, 3], 3, 4) for i in range(n)]


def test_runner_respects_max_concurrency() -> None:
    backend = SleepBackend(delay=0.02)
    run = asyncio.run(run_requests(backend, requests(12), [0.0] * 12, 3, "t", progress=False))
    assert backend.peak == 3 and run.max_in_flight == 3
    assert len(run.results) == 12 and all(r.success for r in run.results)
    assert [r.index for r in run.results] == list(range(12))  # results keep send order
    assert sorted(rid for rid, _ in backend.sent) == sorted(f"bench-t-{i}" for i in range(12))
    assert all(r.start_s >= 0 for r in run.results)  # made relative to the run's start


def test_runner_sends_no_request_before_its_arrival_time() -> None:
    backend = SleepBackend(delay=0.0)
    arrivals = [0.0, 0.05, 0.1, 0.15]
    run = asyncio.run(run_requests(backend, requests(4), arrivals, 0, "t", progress=False))
    for r, at in zip(run.results, arrivals):
        assert r.start_s >= at
    assert run.duration_s >= 0.15


def test_send_turns_a_timeout_into_a_failed_result() -> None:
    backend = SleepBackend(delay=5.0)
    backend.timeout = 0.05
    r = asyncio.run(backend.send(requests(1)[0], "x"))
    assert not r.success and "timed out after 0.05 s" in r.error


# ----------------------------------------------------------------------------------- flags


def parse(*argv: str) -> ServeBenchConfig:
    return from_args(ServeBenchConfig, build_parser().parse_args(list(argv)))


def test_every_flag_has_help_and_maps_to_a_field() -> None:
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(ServeBenchConfig)}
    assert all(a.help and len(a.help) > 20 for a in flags.values())


def test_flags_parse_into_the_config() -> None:
    cfg = parse(
        "--request-rate",
        "inf",
        "--max-concurrency",
        "4",
        "--slo-ttft-ms",
        "250",
        "--ignore-eos",
        "--backend",
        "grpc",
        "--input-format",
        "token-ids",
    )
    assert math.isinf(cfg.request_rate) and cfg.max_concurrency == 4
    assert cfg.slo_ttft_ms == 250.0 and cfg.slo_tpot_ms is None
    assert cfg.ignore_eos and cfg.backend == "grpc"
    assert parse("--request-rate", "2.5").request_rate == 2.5


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--backend", "vllm"], "choose one of"),
        (["--backend", "openai-chat", "--input-format", "token-ids"], "text"),
        (["--random-range-ratio", "1.5"], r"\[0, 1\]"),
        (["--request-rate", "0"], "> 0"),
        (["--request-rate", "nan"], "> 0"),
        (["--dataset", "sharegpt"], "--dataset-path"),
        (["--num-prompts", "0"], "> 0"),
        (["--slo-tpot-ms", "-1"], "> 0"),
        (["--extra-request-body", "[1]"], "JSON object"),
        (["--extra-request-body", "{bad"], "valid JSON"),
        (["--output-details"], "--output-json"),
    ],
)
def test_bad_flags_are_rejected(argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse(*argv)


# ----------------------------------------------------------------------------- request bodies


def test_openai_completions_body() -> None:
    cfg = ServeBenchConfig(model="m", ignore_eos=True, extra_request_body='{"top_k": 5}')
    backend = OpenAIBackend(cfg, chat=False)
    req = BenchRequest(3, "question", 5, 17, prefix="system", group=0)
    body = backend.payload(req)
    assert body == {
        "model": "m",
        "prompt": "system\n\nquestion",
        "max_tokens": 17,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "top_k": 5,
    }
    ids = backend.payload(BenchRequest(0, [4, 5], 2, 3))
    assert ids["prompt"] == [4, 5] and json.loads(json.dumps(ids)) == ids


def test_openai_chat_body_and_base_url_forms() -> None:
    backend = OpenAIBackend(ServeBenchConfig(base_url="http://h:1/v1/", model="m"), chat=True)
    assert backend.url == "http://h:1/v1/chat/completions"
    body = backend.payload(BenchRequest(0, "q", 1, 2, prefix="s"))
    assert body["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
    ]
    assert "prompt" not in body and "ignore_eos" not in body


def test_grpc_request_text_ids_and_sampling() -> None:
    cfg = ServeBenchConfig(
        backend="grpc",
        ignore_eos=True,
        temperature=0.5,
        extra_request_body='{"topP": 0.9, "stopTokenIds": [7]}',
    )
    backend = GrpcBackend(cfg)
    msg = backend.request(BenchRequest(0, [1, 2], 4, 9, prefix=[8]), "rid")
    assert msg.request_id == "rid"
    assert msg.WhichOneof("input") == "token_ids" and list(msg.token_ids.ids) == [8, 1, 2]
    sp = msg.sampling_params
    assert (sp.max_new_tokens, sp.temperature, sp.ignore_eos) == (9, 0.5, True)
    assert sp.top_p == pytest.approx(0.9) and list(sp.stop_token_ids) == [7]
    assert not sp.HasField("top_k")  # unset stays unset: the server default, not proto3's 0
    text = backend.request(BenchRequest(1, "hi", 1, 2), "r2")
    assert text.WhichOneof("input") == "text" and text.text == "hi"
    assert text.sampling_params.max_new_tokens == 2  # each request its own length
    plain = GrpcBackend(ServeBenchConfig(backend="grpc")).request(BenchRequest(1, "hi", 1, 2), "r")
    assert not plain.sampling_params.HasField("ignore_eos")
    assert isinstance(plain.sampling_params, common_pb2.SamplingParams)


def test_grpc_rejects_unknown_sampling_fields() -> None:
    with pytest.raises(ValueError, match="SamplingParams"):
        GrpcBackend(ServeBenchConfig(backend="grpc", extra_request_body='{"nope": 1}'))
