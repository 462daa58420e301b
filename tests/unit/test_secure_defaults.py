"""Every service binds loopback unless told otherwise, takes the same TLS flags (each with its
help text), and fails at startup with a clear error when a TLS file is unusable."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from services.decode.__main__ import build_parser as decode_parser
from services.decode.__main__ import main as decode_main
from services.gateway.__main__ import build_parser as gateway_parser
from services.gateway.__main__ import main as gateway_main
from services.prefill.__main__ import build_parser as prefill_parser
from services.router.__main__ import build_parser as router_parser
from services.router.__main__ import main as router_main
from services.tokenizer.__main__ import build_parser as tokenizer_parser
from services.tokenizer.__main__ import main as tokenizer_main

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "tokenizer": tokenizer_parser,
    "router": router_parser,
    "decode": decode_parser,
    "prefill": prefill_parser,
    "gateway": gateway_parser,
}
TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-ca", "--tls-client-auth", "--tls-server-name")
LOOPBACK = "127.0.0.1"


@pytest.mark.parametrize("service", sorted(PARSERS))
def test_loopback_by_default_and_every_tls_flag_explained(service: str) -> None:
    parser = PARSERS[service]()
    args = parser.parse_args([])
    assert args.host == LOOPBACK
    for name in ("prometheus_host", "kv_transfer_host"):  # empty: --host
        assert getattr(args, name, "") in ("", LOOPBACK)
    assert args.tls_cert == args.tls_key == args.tls_ca == ""
    actions = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    for flag in TLS_FLAGS:
        assert flag in actions, f"{service} has no {flag}"
        assert len(actions[flag].help or "") > 30, f"{service} {flag} is not explained"


def test_launcher_and_http_sd_bind_loopback() -> None:
    from pdmesh.telemetry.http_sd import HttpSdConfig
    from services.launch import LauncherConfig

    assert LauncherConfig().host == LOOPBACK
    assert HttpSdConfig().host == LOOPBACK


@pytest.mark.parametrize(
    "main", [tokenizer_main, router_main, gateway_main, decode_main], ids=lambda m: m.__module__
)
def test_an_unreadable_tls_file_is_a_startup_error(
    main: Callable[[list[str]], int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--tls-ca", "/nonexistent/ca.pem"]) == 2
    assert "--tls-ca=/nonexistent/ca.pem" in capsys.readouterr().err
