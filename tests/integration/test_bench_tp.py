"""``python -m benchmarks tp`` on the CPU (gloo): TP 1 and 2 of the tiny model in one run, every
figure of the report present and positive, bad flags refused with exit 2."""

from __future__ import annotations

import pytest

from benchmarks import tp
from benchmarks.tp import TPBenchConfig

pytestmark = pytest.mark.bench


def test_tp_bench_reports_every_size_and_batch(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = TPBenchConfig(
        model="random:tiny",
        device="cpu",
        dtype="float32",
        tp_size="1,2",
        decode_batches="1,4",
        context=32,
        prefill_tokens=64,
        steps=3,
        repeats=1,
    )
    results = tp.run(cfg)
    assert [r.tp for r in results] == [1, 2]
    for r in results:
        assert set(r.decode_ms) == {1, 4} and all(v > 0 for v in r.decode_ms.values())
        assert r.prefill_tok_s > 0
    assert results[0].allreduce_us == {} and set(results[1].allreduce_us) == {1, 4}
    assert all(v > 0 for v in results[1].bus_gb_s.values())
    text = tp.report(cfg, results)
    assert "decode ms/step" in text and "prefill tok/s" in text


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert tp.main(["--tp-size", "0", "--device", "cpu"]) == 2
    assert "--tp-size='0': values must be > 0" in capsys.readouterr().err
    assert tp.main(["--device", "tpu"]) == 2
