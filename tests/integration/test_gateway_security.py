"""The gateway's guards in front of a real mesh: several API keys (flag list and key file), the
limit on open streams per client, the bounds on n / max_tokens / token ids, and no key in the
logs (the gateway runs at debug level, so every log call it makes is in the file)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.integration.procs import ServiceProc
from tests.integration.test_gateway import GREETING, MODEL, start_gateway
from tests.integration.test_gateway_errors import assert_openai_error

pytestmark = pytest.mark.model

FLAG_KEYS = ("sk-flag-one", "sk-flag-two")
FILE_KEY = "sk-from-the-file"
WRONG_KEY = "sk-wrong-guess"
RELEASE_WITHIN_S = 30.0  # a closed stream gives its slot back once the gateway sees it gone


@dataclass
class Guarded:
    url: str
    proc: ServiceProc


@pytest.fixture(scope="module")
def gateway(
    router_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Guarded]:
    log_dir = tmp_path_factory.mktemp("gateway-security")
    key_file = log_dir / "keys"
    key_file.write_text(f"# one key per line\n{FILE_KEY}\n")
    flags = [
        "--api-key", ",".join(FLAG_KEYS), "--api-key-file", str(key_file),
        "--max-streams-per-client", "1", "--model-name", MODEL,
        "--log-level", "debug", "--grace-period", "1",
    ]  # fmt: skip
    svc = start_gateway(router_proc.address, *flags, log_dir=log_dir, name="guarded-gateway")
    yield Guarded(f"http://{svc.address}", svc)
    svc.stop_and_check()
    for secret in (*FLAG_KEYS, FILE_KEY, WRONG_KEY):
        assert secret not in svc.log, f"{secret} is in the gateway's log"


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": GREETING, "max_tokens": 2, **overrides}


def test_every_key_of_the_list_and_the_file_is_accepted(gateway: Guarded) -> None:
    models = f"{gateway.url}/v1/models"
    for key in (*FLAG_KEYS, FILE_KEY):
        response = httpx.get(models, headers=auth(key), timeout=10)
        assert response.status_code == 200, (key, response.text)
    for bad in (WRONG_KEY, ",".join(FLAG_KEYS), FLAG_KEYS[0][:-1], FLAG_KEYS[0] + "x"):
        error = assert_openai_error(httpx.get(models, headers=auth(bad), timeout=10), 401)
        assert error["code"] == "invalid_api_key"
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200


def test_open_streams_are_limited_per_key(gateway: Guarded) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    long = chat(max_tokens=2000, ignore_eos=True, stream=True)
    with httpx.stream("POST", url, json=long, headers=auth(FLAG_KEYS[0]), timeout=60) as held:
        assert held.status_code == 200
        # one iterator, kept: a dropped one closes the response (a client disconnect)
        lines = held.iter_lines()
        assert next(lines).startswith("data: ")  # the stream is open on the worker
        # the same key again, streamed or not: over its limit of one
        for body in (chat(), chat(stream=True)):
            refused = httpx.post(url, json=body, headers=auth(FLAG_KEYS[0]), timeout=60)
            error = assert_openai_error(refused, 429)
            assert error["code"] == "too_many_streams" and error["type"] == "rate_limit_error"
        # another key is another client
        other = httpx.post(url, json=chat(), headers=auth(FILE_KEY), timeout=60)
        assert other.status_code == 200, other.text
    # closing the stream gives the slot back (the gateway cancels it down to the worker)
    deadline = time.monotonic() + RELEASE_WITHIN_S
    while True:
        again = httpx.post(url, json=chat(), headers=auth(FLAG_KEYS[0]), timeout=60)
        if again.status_code != 429 or time.monotonic() > deadline:
            break
    assert again.status_code == 200, again.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat(n=65), "n"),
        ("/v1/chat/completions", chat(max_tokens=2**31), "max_tokens"),
        ("/v1/chat/completions", chat(max_completion_tokens=2**40), "max_completion_tokens"),
        ("/v1/chat/completions", chat(stop_token_ids=[2**31]), "stop_token_ids[0]"),
        ("/v1/completions", {"model": MODEL, "prompt": [2**31], "max_tokens": 2}, "prompt[0]"),
        ("/v1/completions", {"model": MODEL, "prompt": ["a"] * 5, "n": 64}, "n"),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2**31}}, None),
        ("/generate", {"input_ids": [[1]] * 257}, "n"),
    ],
    ids=[
        "n",
        "max_tokens",
        "max_completion_tokens",
        "stop_token_ids",
        "prompt ids",
        "prompts x n",
        "max_new_tokens",
        "batch",
    ],
)
def test_counts_and_ids_past_their_limits_are_400(
    gateway: Guarded, path: str, body: dict[str, Any], param: str | None
) -> None:
    response = httpx.post(f"{gateway.url}{path}", json=body, headers=auth(FILE_KEY), timeout=30)
    error = assert_openai_error(response, 400, param)
    assert error["type"] == "invalid_request_error"
