"""``/tokenize`` and ``/detokenize`` through a real mesh (tokenizer + worker + router + gateway,
each a process), in vLLM's and SGLang's shapes, checked against transformers' tokenizer of the
default model (an implementation the mesh does not use): text, an SGLang batch, a chat (the
chat template as transformers renders it), vocabulary strings, the round trip back through
``/detokenize``, and the errors (ids outside the vocabulary, model, unknown field, API key)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.procs import ServiceProc
from tests.integration.test_gateway import MODEL, start_gateway
from tests.integration.test_gateway_errors import assert_openai_error

pytestmark = pytest.mark.model

KEY = "sk-tokenize-test"
MAX_MODEL_LEN = 2048  # the test worker's --max-model-len (procs.WORKER_ARGS)
TEXTS = ["Hello, world!", "  naïve café — 東京 🚀\nnew line", ""]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Again, in French?"},
]


@pytest.fixture(scope="module")
def gateway(router_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_dir = tmp_path_factory.mktemp("gateway-tokenize")
    flags = ["--api-key", KEY, "--grace-period", "1"]
    svc = start_gateway(router_proc.address, *flags, log_dir=log_dir, name="tokenize-gateway")
    yield f"http://{svc.address}"
    svc.stop_and_check()


@pytest.fixture(scope="module")
def http(gateway: str) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=gateway, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from pdmesh.models.fetch import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model(progress=False))


def hf_chat_ids(hf_tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers: BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.parametrize("text", TEXTS)
def test_text_as_vllm_tokenizes_it(http: httpx.Client, hf_tokenizer: Any, text: str) -> None:
    expected = hf_tokenizer(text, add_special_tokens=True)["input_ids"]
    body = post(http, "/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True})
    assert body == {
        "count": len(expected),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": expected,
        "token_strs": hf_tokenizer.convert_ids_to_tokens(expected),
    }
    # and back: vLLM reads "prompt", SGLang "text"
    back = post(http, "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
    assert back == {"prompt": text, "text": text}


def test_sglang_batch_and_v1_paths(http: httpx.Client, hf_tokenizer: Any) -> None:
    expected = [hf_tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    body = post(http, "/v1/tokenize", {"prompt": TEXTS, "add_special_tokens": False})
    assert body["tokens"] == expected
    assert body["count"] == [len(ids) for ids in expected]
    assert body["max_model_len"] == MAX_MODEL_LEN
    back = post(http, "/v1/detokenize", {"tokens": expected})
    assert back == {"prompt": TEXTS, "text": TEXTS}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_is_the_templates_rendering(
    http: httpx.Client, hf_tokenizer: Any, add_generation_prompt: bool
) -> None:
    expected = hf_chat_ids(hf_tokenizer, CHAT, add_generation_prompt=add_generation_prompt)
    body = post(
        http,
        "/tokenize",
        {"model": MODEL, "messages": CHAT, "add_generation_prompt": add_generation_prompt},
    )
    assert body["tokens"] == expected and body["count"] == len(expected)
    rendered = hf_tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    # the round trip keeps the template's special tokens (vLLM's default) ...
    back = post(http, "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
    assert back["prompt"] == back["text"] == rendered == hf_tokenizer.decode(expected)
    # ... and SGLang's skip_special_tokens leaves them out
    skipped = post(http, "/detokenize", {"tokens": expected, "skip_special_tokens": True})
    assert skipped["text"] == hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert skipped["text"] != rendered


def test_chat_tokens_are_the_chat_completions_prompt(http: httpx.Client) -> None:
    """The same conversion as /v1/chat/completions: its usage counts the same prompt."""
    messages = CHAT[:2]
    tokens = post(http, "/tokenize", {"model": MODEL, "messages": messages})
    reply = post(
        http, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1}
    )
    assert reply["usage"]["prompt_tokens"] == tokens["count"]


def test_errors_name_the_field(http: httpx.Client, gateway: str, hf_tokenizer: Any) -> None:
    vocab = len(hf_tokenizer)
    error = assert_openai_error(
        http.post("/detokenize", json={"tokens": [1, vocab]}), 400, "tokens"
    )
    assert str(vocab) in error["message"]
    batch = http.post("/detokenize", json={"tokens": [[1], [vocab + 5]]})
    assert_openai_error(batch, 400, "tokens[1]")
    assert_openai_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")
    unknown_model = http.post("/tokenize", json={"model": "no-such-model", "prompt": "x"})
    assert_openai_error(unknown_model, 404, "model")
    extra = http.post("/tokenize", json={"prompt": "x", "truncate_prompt_tokens": 2})
    assert_openai_error(extra, 400, "truncate_prompt_tokens")
    both = http.post("/tokenize", json={"prompt": "x", "messages": CHAT})
    assert_openai_error(both, 400, "prompt")
    role = http.post("/tokenize", json={"messages": [{"role": "robot", "content": "x"}]})
    assert_openai_error(role, 400, "messages[0].role")
    # the API key is needed as on every other route
    no_key = httpx.post(f"{gateway}/tokenize", json={"prompt": "x"}, timeout=10)
    assert_openai_error(no_key, 401)
    no_key = httpx.post(f"{gateway}/detokenize", json={"tokens": [1]}, timeout=10)
    assert_openai_error(no_key, 401)
