"""PD flags of the prefill, decode and router services: defaults, PDMESH_DISAGGREGATION_* env
overrides (the SGLang names with a PDMESH_ prefix), and refused values."""

from __future__ import annotations

import pytest

from pdmesh.config import from_args
from services.decode.__main__ import build_parser as decode_parser
from services.prefill.__main__ import build_parser as prefill_parser
from services.router.__main__ import build_parser as router_parser
from services.router.config import RouterServiceConfig
from services.worker.config import PrefillServiceConfig, WorkerServiceConfig


def decode_config(*argv: str) -> WorkerServiceConfig:
    return from_args(WorkerServiceConfig, decode_parser().parse_args(list(argv)))


def prefill_config(*argv: str) -> PrefillServiceConfig:
    return from_args(PrefillServiceConfig, prefill_parser().parse_args(list(argv)))


def test_defaults_are_short_and_documented() -> None:
    decode = decode_config("--mode", "decode")
    assert (decode.heartbeat_interval, decode.heartbeat_max_failures) == (5.0, 2)
    assert decode.waiting_timeout == 60.0 and decode.kv_transfer_backend == "auto"
    prefill = prefill_config()
    assert (prefill.bootstrap_port, prefill.bootstrap_timeout) == (8998, 30.0)
    help_text = decode_parser().format_help() + prefill_parser().format_help()
    for env in (
        "PDMESH_DISAGGREGATION_HEARTBEAT_INTERVAL",
        "PDMESH_DISAGGREGATION_HEARTBEAT_MAX_FAILURE",
        "PDMESH_DISAGGREGATION_WAITING_TIMEOUT",
        "PDMESH_DISAGGREGATION_BOOTSTRAP_TIMEOUT",
    ):
        assert env in " ".join(help_text.split())


def test_env_names_set_the_pd_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDMESH_DISAGGREGATION_HEARTBEAT_INTERVAL", "0.5")
    monkeypatch.setenv("PDMESH_DISAGGREGATION_HEARTBEAT_MAX_FAILURE", "3")
    monkeypatch.setenv("PDMESH_DISAGGREGATION_WAITING_TIMEOUT", "12")
    monkeypatch.setenv("PDMESH_DISAGGREGATION_BOOTSTRAP_TIMEOUT", "7")
    decode = decode_config("--mode", "decode")
    assert (decode.heartbeat_interval, decode.heartbeat_max_failures) == (0.5, 3)
    assert decode.waiting_timeout == 12.0
    assert prefill_config().bootstrap_timeout == 7.0
    assert decode_config("--mode", "decode", "--heartbeat-interval", "2").heartbeat_interval == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--mode", "prefill"), "python -m services.prefill"),
        (("--mode", "decode", "--heartbeat-interval", "0"), "must be > 0"),
        (("--mode", "decode", "--heartbeat-max-failures", "0"), "must be >= 1"),
        (
            ("--mode", "decode", "--kv-transfer-backend", "nixl"),
            "choose auto, cuda_ipc, grpc, mooncake",
        ),
        (("--mode", "decode", "--host", "0.0.0.0"), "--kv-transfer-host"),
    ],
)
def test_bad_decode_flags_are_refused(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_config(*argv)
    decode_config("--host", "0.0.0.0")  # aggregated: no KV receiver, a wildcard is fine


def test_bad_prefill_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="both 9000"):
        prefill_config("--port", "9000", "--bootstrap-port", "9000")
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        prefill_config("--optimistic-prefill-share", "2")
    with pytest.raises(ValueError, match="must be > 0"):
        prefill_config("--bootstrap-timeout", "0")


def test_router_pd_flags() -> None:
    args = router_parser().parse_args(
        ["--prefill-workers", "a:1,b:2", "--decode-workers", "c:3", "--workers", "d:4"]
    )
    config = from_args(RouterServiceConfig, args)
    assert config.workers_by_role == {
        "aggregated": ("d:4",),
        "prefill": ("a:1", "b:2"),
        "decode": ("c:3",),
    }
    assert config.disagg_min_prompt_tokens == 0
    with pytest.raises(ValueError, match="listed twice"):
        from_args(
            RouterServiceConfig,
            router_parser().parse_args(["--prefill-workers", "a:1", "--decode-workers", "a:1"]),
        )
