"""Structured outputs, tool calls and the Responses API through a real mesh, called by clients
nobody here wrote: the official ``openai`` client, LangChain (``langchain-openai``) and the
OpenAI Agents SDK (``openai-agents``).

The mesh is the one ``make run`` starts for the default model: the tokenizer with
``--chat-template smollm2-tools`` (SmolLM2's template, plus tools) and the router with
``--tool-call-parser qwen25``. Outputs are greedy and short: CI machines have 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.integration.procs import ServiceProc, start_service
from tests.integration.test_gateway import start_gateway, wait_until_idle

pytestmark = pytest.mark.model

MODEL = "smollm2-135m-instruct"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}},
    "required": ["city"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather of a city",
            "parameters": WEATHER_PARAMS,
        },
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}},
]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
SUBJECTS = [
    "a teacher", "a pilot", "a baker", "a child", "a doctor", "a painter", "a farmer",
    "a singer", "a nurse", "a chef", "a sailor", "a student", "a poet", "a judge", "a miner",
    "a writer", "a coach", "a tailor", "a driver", "a monk",
]  # fmt: skip


# -- the mesh ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_mesh(
    worker_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServiceProc]]:
    logs = tmp_path_factory.mktemp("agent-mesh")
    tokenizer = start_service(
        "services.tokenizer",
        ["--chat-template", "smollm2-tools", "--grace-period", "2"],
        "tokenizer-tools",
        log_dir=logs,
    )
    router = start_service(
        "services.router",
        ["--workers", worker_proc.address, "--tokenizer", tokenizer.address]
        + ["--tool-call-parser", "qwen25", "--grace-period", "2"],
        "router-tools",
        log_dir=logs,
    )
    gateway = start_gateway(router.address, "--grace-period", "2", log_dir=logs)
    try:
        yield f"http://{gateway.address}/v1", worker_proc
    finally:
        for svc in (gateway, router, tokenizer):
            svc.stop_and_check()


@pytest.fixture(scope="module")
def client(agent_mesh: tuple[str, ServiceProc]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=agent_mesh[0], api_key="unused", max_retries=0) as c:
        yield c


def streamed_tool_calls(chunks: Any) -> tuple[list[dict[str, str]], str | None]:
    """Reassemble streamed tool-call deltas as OpenAI's clients do: by index, the first delta
    with id and name, the others appending to the arguments."""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        assert not choice.delta.content, "a forced tool call has no content"
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.function.name and d.type == "function", d
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None, "id and name come once"
            calls[d.index]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


def as_calls(message: Any) -> list[dict[str, str]]:
    return [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ]


# -- the openai client ------------------------------------------------------------------------


def test_json_schema_on_20_prompts_streamed_and_not(
    client: openai.OpenAI, agent_mesh: tuple[str, ServiceProc]
) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }

    def ask(i: int) -> tuple[str, str | None]:
        messages: Any = [{"role": "user", "content": f"Describe {SUBJECTS[i]} as JSON."}]
        kwargs: Any = dict(
            model=MODEL, messages=messages, response_format=response_format, max_tokens=60
        )
        if i % 2:
            text, finish = "", None
            for chunk in client.chat.completions.create(**kwargs, stream=True):
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return text, finish
        r = client.chat.completions.create(**kwargs)
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(len(SUBJECTS))))
    for text, finish in answers:
        jsonschema.validate(json.loads(text), PERSON)
        assert finish == "stop", text  # the grammar completed, not the length limit
    wait_until_idle(agent_mesh[1], time.monotonic(), limit_s=5.0)


def test_json_object_is_json(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give a JSON object with a key 'color'."}],
        response_format={"type": "json_object"},
        max_tokens=40,
        temperature=0,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    else:  # a free-form object may be cut at max_tokens: still a JSON object's prefix
        assert (r.choices[0].message.content or "").lstrip().startswith("{")


@pytest.mark.parametrize(
    ("tool_choice", "finish"),
    [
        ("required", "tool_calls"),
        # OpenAI answers a named choice with "stop"
        ({"type": "function", "function": {"name": "get_weather"}}, "stop"),
    ],
)
def test_forced_tool_calls_streamed_equal_non_streamed(
    client: openai.OpenAI, tool_choice: Any, finish: str
) -> None:
    kwargs: Any = dict(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice=tool_choice,
        temperature=0,
        max_tokens=60,
    )
    r = client.chat.completions.create(**kwargs)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == finish
    assert message.content is None
    calls = as_calls(message)
    assert calls and all(c["id"].startswith("call_") for c in calls)
    for call in calls:
        if call["name"] == "get_weather":
            jsonschema.validate(json.loads(call["arguments"]), WEATHER_PARAMS)
        else:
            assert call["name"] == "get_time" and json.loads(call["arguments"]) == {}
    streamed, streamed_finish = streamed_tool_calls(
        client.chat.completions.create(**kwargs, stream=True)
    )
    assert streamed_finish == finish
    # ids are made per response; everything else is the same greedy output
    assert [{**c, "id": ""} for c in streamed] == [{**c, "id": ""} for c in calls]


def test_a_tool_loop_with_the_result_sent_back(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # exactly one call (the grammar's maxItems)
        max_tokens=60,
    )
    (call,) = first.choices[0].message.tool_calls or []
    assert first.choices[0].finish_reason == "tool_calls"
    messages: Any = [
        *ASK_WEATHER,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    # auto: the router's qwen25 parser reads whatever the model writes next
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=40, temperature=0
    )
    choice = second.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.finish_reason == "tool_calls":
        assert as_calls(choice.message)
    else:
        assert choice.message.content and "<tool_call>" not in choice.message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
                }
            },
            "response_format",
        ),
        (
            {"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"},
            "tool_choice",
        ),
    ],
)
def test_unservable_requests_are_400_naming_the_field(
    agent_mesh: tuple[str, ServiceProc], body: dict[str, Any], param: str
) -> None:
    r = httpx.post(
        f"{agent_mesh[0]}/chat/completions",
        json={"model": MODEL, "messages": ASK_WEATHER, "max_tokens": 8, **body},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param), error
    wait_until_idle(agent_mesh[1], time.monotonic(), limit_s=5.0)


# -- LangChain --------------------------------------------------------------------------------


def test_langchain_structured_output_and_tool_loop(agent_mesh: tuple[str, ServiceProc]) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int = Field(ge=0, le=120)

    llm = ChatOpenAI(
        base_url=agent_mesh[0],
        api_key="unused",  # type: ignore[arg-type]
        model=MODEL,
        temperature=0,
        max_tokens=60,  # type: ignore[call-arg]
        max_retries=0,
    )
    person = llm.with_structured_output(Person).invoke("Describe a person.")
    assert isinstance(person, Person)

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather of a city."""
        return f"sunny in {city}"

    messages: list[Any] = [HumanMessage("What is the weather in Paris?")]
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    (call,) = ai.tool_calls  # type: ignore[attr-defined]
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    messages += [ai, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = llm.bind_tools([get_weather]).invoke(messages)
    assert final.content or final.tool_calls  # type: ignore[attr-defined]


# -- the OpenAI Agents SDK (the Responses API) ------------------------------------------------


def test_agents_sdk_runs_an_agent_with_a_function_tool(
    agent_mesh: tuple[str, ServiceProc],
) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # the SDK would export its traces to api.openai.com
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather of a city."""
        asked.append(city)
        return f"sunny in {city}"

    async def run() -> tuple[Any, Any]:
        client = openai.AsyncOpenAI(base_url=agent_mesh[0], api_key="unused", max_retries=0)
        model = OpenAIResponsesModel(model=MODEL, openai_client=client)
        settings = ModelSettings(tool_choice="required", temperature=0, max_tokens=60)
        # the tool's result is the answer: one model call, one tool call
        once = Agent(
            name="weather",
            instructions="You answer weather questions.",
            tools=[get_weather],
            model=model,
            model_settings=settings,
            tool_use_behavior="stop_on_first_tool",
        )
        first = await Runner.run(once, "What is the weather in Paris?", max_turns=3)
        # the full loop, streamed: call the tool, send its output back, answer
        loop = Agent(
            name="loop", instructions="Be brief.", tools=[get_weather], model=model,
            model_settings=settings,
        )  # fmt: skip
        streamed = Runner.run_streamed(loop, "What is the weather in Rome?", max_turns=4)
        events = [e async for e in streamed.stream_events()]
        assert events
        await client.close()
        return first, streamed

    first, streamed = asyncio.run(asyncio.wait_for(run(), timeout=120))
    assert len(asked) == 2 and all(asked)
    assert first.final_output == f"sunny in {asked[0]}"
    kinds = [type(i).__name__ for i in streamed.new_items]
    assert kinds[:2] == ["ToolCallItem", "ToolCallOutputItem"]
    assert kinds[-1] == "MessageOutputItem" and isinstance(streamed.final_output, str)


def test_continue_final_message_prompt_is_transformers(client: openai.OpenAI) -> None:
    from transformers import AutoTokenizer

    from pdmesh.models.fetch import ensure_default_model

    messages: Any = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=3,
        temperature=0,
        extra_body={"continue_final_message": True},
    )
    hf = AutoTokenizer.from_pretrained(ensure_default_model(progress=False))
    ids = hf.apply_chat_template(messages, continue_final_message=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers: BatchEncoding
        ids = ids["input_ids"]
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    # both at once is refused naming the field, not one of them silently ignored
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=3,
            extra_body={"continue_final_message": True, "add_generation_prompt": True},
        )
    assert info.value.body["param"] == "continue_final_message"  # type: ignore[index]
