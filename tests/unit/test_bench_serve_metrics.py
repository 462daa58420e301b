"""``bench serve`` bookkeeping and metrics on synthetic records: timing, percentiles, goodput."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.metrics import SLO, Distribution, first_errors, summarize
from benchmarks.serve.report import RunInfo, render_table, to_json, write_json
from benchmarks.serve.timing import RequestResult, StreamClock


def clock_of(*times: float) -> StreamClock:
    it = iter(times)
    return StreamClock(clock=lambda: next(it))


def ok(
    ttft: float, e2e: float, out: int, itl: list[float] | None = None, prompt: int = 10
) -> RequestResult:
    r = RequestResult(index=0, prompt_len=prompt, expected_output_len=out)
    r.success, r.ttft_s, r.e2e_s, r.output_tokens, r.prompt_tokens = True, ttft, e2e, out, prompt
    r.itl_s = itl or []
    return r


def failed(msg: str) -> RequestResult:
    r = RequestResult(index=0, prompt_len=10, expected_output_len=5)
    r.error = msg
    return r


# --------------------------------------------------------------------------------- timing


def test_stream_clock_ttft_itl_and_multi_token_chunks() -> None:
    # sent at 10.0; chunks at 10.1 (1 token), 10.3 (1), 10.6 (3 tokens); finished at 10.7
    clock = clock_of(10.0, 10.1, 10.3, 10.6, 10.7)
    for n in (1, 0, 1, 3):  # an empty chunk is no output and reads no time
        clock.arrived(n)
    r = clock.finish(RequestResult(0, 4, 5))
    assert r.success
    assert r.ttft_s == pytest.approx(0.1)
    assert r.e2e_s == pytest.approx(0.7)
    # the 3-token chunk's 0.3 s gap is spread over its 3 tokens
    assert r.itl_s == pytest.approx([0.2, 0.1, 0.1, 0.1])
    assert (r.output_tokens, r.chunks, r.usage_reported, r.prompt_tokens) == (5, 3, False, 4)
    assert r.tpot_s == pytest.approx((0.7 - 0.1) / 4)


def test_stream_clock_prefers_server_usage_and_stops_at_the_end_marker() -> None:
    clock = clock_of(0.0, 0.5, 0.9, 5.0)
    clock.arrived(1)
    clock.stop()  # [DONE] at 0.9; the final read at 5.0 does not count
    clock.stop()  # only the first end marker counts
    r = clock.finish(RequestResult(0, 4, 5), completion_tokens=7, prompt_tokens=12)
    assert r.e2e_s == pytest.approx(0.9)
    assert (r.output_tokens, r.prompt_tokens, r.usage_reported) == (7, 12, True)


def test_stream_clock_without_output_chunks_has_ttft_at_the_end() -> None:
    r = clock_of(1.0, 1.4).finish(RequestResult(0, 4, 1), completion_tokens=1)
    assert r.ttft_s == pytest.approx(0.4) and r.e2e_s == pytest.approx(0.4)
    assert r.tpot_s is None  # one token: no time per output token


def test_stream_clock_fail() -> None:
    r = clock_of(0.0, 2.0).fail(RequestResult(0, 4, 5), "boom")
    assert not r.success and r.error == "boom" and r.e2e_s == pytest.approx(2.0)
    assert r.tpot_s is None


# ---------------------------------------------------------------------------- percentiles


def test_distribution_percentiles() -> None:
    d = Distribution.of([float(x) for x in range(100, 0, -1)])  # order must not matter
    assert d is not None
    assert d.count == 100
    assert (d.min, d.max, d.mean) == (1.0, 100.0, 50.5)
    # linear interpolation between closest ranks
    assert d.p50 == pytest.approx(50.5)
    assert d.p90 == pytest.approx(90.1)
    assert d.p99 == pytest.approx(99.01)
    assert d.std == pytest.approx(math.sqrt((100**2 - 1) / 12))
    single = Distribution.of([7.0])
    assert single is not None and single.p50 == single.p99 == 7.0
    assert Distribution.of([]) is None


# ------------------------------------------------------------------------- summary, goodput


def records() -> list[RequestResult]:
    return [
        ok(ttft=0.05, e2e=0.45, out=5, itl=[0.1] * 4, prompt=10),  # tpot 100 ms
        ok(ttft=0.20, e2e=0.50, out=4, itl=[0.1] * 3, prompt=20),  # tpot 100 ms
        ok(ttft=0.08, e2e=1.08, out=3, itl=[0.5, 0.5], prompt=30),  # tpot 500 ms
        ok(ttft=0.09, e2e=0.09, out=1, prompt=40),  # one token: no tpot
        failed("HTTP 500: oops"),
    ]


def test_summary_counts_throughputs_and_latencies() -> None:
    s = summarize(records(), duration_s=2.0, max_in_flight=3)
    assert (s.completed, s.failed) == (4, 1)
    assert (s.total_input_tokens, s.total_output_tokens) == (100, 13)
    assert s.request_throughput == pytest.approx(2.0)
    assert s.input_throughput == pytest.approx(50.0)
    assert s.output_throughput == pytest.approx(6.5)
    assert s.total_token_throughput == pytest.approx(56.5)
    assert s.concurrency == pytest.approx((0.45 + 0.5 + 1.08 + 0.09) / 2.0)
    assert s.max_in_flight == 3
    assert s.ttft_ms is not None and s.ttft_ms.mean == pytest.approx(105.0)
    assert s.ttft_ms.p50 == pytest.approx(85.0)
    assert s.tpot_ms is not None and s.tpot_ms.count == 3  # the one-token request has none
    assert s.tpot_ms.p50 == pytest.approx(100.0)
    assert s.itl_ms is not None and s.itl_ms.count == 9  # every gap of every request, pooled
    assert s.itl_ms.max == pytest.approx(500.0)
    assert s.e2e_ms is not None and s.e2e_ms.max == pytest.approx(1080.0)
    assert s.goodput is None and s.good_requests is None  # no SLO given
    assert [(e.message, e.count) for e in s.errors] == [("HTTP 500: oops", 1)]


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        (SLO(ttft_ms=100), 3),  # 50, 80, 90 ms pass; 200 ms does not
        (SLO(tpot_ms=200), 3),  # the 500 ms one fails; the one-token request has nothing to miss
        (SLO(e2e_ms=500), 3),  # 450, 500 (inclusive), 90 pass; 1080 fails
        (SLO(ttft_ms=100, tpot_ms=200), 2),  # every given SLO must hold
        (SLO(ttft_ms=100, tpot_ms=200, e2e_ms=100), 1),
        (SLO(ttft_ms=1), 0),
    ],
)
def test_goodput_counts_requests_meeting_all_given_slos(slo: SLO, good: int) -> None:
    s = summarize(records(), duration_s=4.0, slo=slo)
    assert s.good_requests == good
    assert s.goodput == pytest.approx(good / 4.0)


def test_failed_requests_are_never_good_nor_in_latencies() -> None:
    s = summarize([failed("x"), failed("y")], duration_s=1.0, slo=SLO(e2e_ms=1e9))
    assert s.good_requests == 0 and s.completed == 0
    assert s.ttft_ms is None and s.itl_ms is None and s.request_throughput == 0.0


def test_first_errors_are_distinct_in_order_with_counts() -> None:
    msgs = ["a", "b", "a", "c", "d", "a", "e", "f", "b"]
    got = first_errors([failed(m) for m in msgs], limit=4)
    assert [(e.message, e.count) for e in got] == [("a", 3), ("b", 2), ("c", 1), ("d", 1)]


def test_output_length_mismatch_is_counted() -> None:
    r = ok(0.1, 0.2, out=5)
    r.expected_output_len = 8  # stopped early at EOS
    s = summarize([r, ok(0.1, 0.2, out=5)], duration_s=1.0)
    assert s.output_len_mismatch == 1


# -------------------------------------------------------------------------------- report


def test_table_and_json(tmp_path: Path) -> None:
    cfg = ServeBenchConfig(api_key="secret", slo_ttft_ms=100, output_json="x.json")
    slo = SLO(ttft_ms=100)
    s = summarize(records(), duration_s=2.0, slo=slo)
    info = RunInfo("abc", "http://h/v1/completions", "m", 5)
    table = render_table(cfg, info, s, slo)
    for needle in (
        "Successful requests:",
        "Failed requests:",
        "TTFT",
        "ITL",
        "TPOT",
        "E2E",
        "Goodput (req/s) [ttft<=100ms]",
        "[1x] HTTP 500: oops",
        "inf (all at once)",
    ):
        assert needle in table
    doc = to_json(cfg, info, s, records())
    path = tmp_path / "out" / "r.json"
    write_json(path, doc)
    back = json.loads(path.read_text())  # strict JSON: inf/nan were replaced
    assert back["config"]["request_rate"] == "inf"
    assert "api_key" not in back["config"]
    assert back["summary"]["completed"] == 4 and back["summary"]["good_requests"] == 3
    assert s.ttft_ms is not None
    assert back["summary"]["ttft_ms"]["p99"] == pytest.approx(s.ttft_ms.p99)
    assert len(back["requests"]) == 5 and back["requests"][4]["error"] == "HTTP 500: oops"
    no_time = summarize([], duration_s=0.0)
    write_json(tmp_path / "empty.json", to_json(cfg, info, no_time, None))  # nan -> null
    assert (
        json.loads((tmp_path / "empty.json").read_text())["summary"]["request_throughput"] is None
    )
