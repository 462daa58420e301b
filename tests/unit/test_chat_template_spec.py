"""``--chat-template``: built-in names and files, and the built-in ``smollm2-tools`` over the
default model's tokenizer (skipped when it was never converted here): without tools it renders
exactly as the model's own template, with tools in the Hermes form the qwen25 parser reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdmesh.models.fetch import is_complete, model_dir
from pdmesh.tokenizer import Tokenizer
from pdmesh.tokenizer.chat import ChatMessage, ChatRequest
from pdmesh.tokenizer.chat_template_spec import builtin_templates, read_chat_template

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CONVERSATIONS = [
    (ChatMessage("user", "Hi"),),
    (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")),
    (ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"), ChatMessage("user", "Bye")),
]


def test_builtin_names_and_files(tmp_path: Path) -> None:
    assert "smollm2-tools" in builtin_templates()
    assert "<tool_call>" in read_chat_template("smollm2-tools")
    own = tmp_path / "t.jinja"
    own.write_text("{{ messages[0]['content'] }}")
    assert read_chat_template(str(own)) == "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="neither a file nor a built-in"):
        read_chat_template("no-such-template")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if %}")
    with pytest.raises(ValueError, match="does not compile"):
        read_chat_template(str(broken))


@pytest.fixture(scope="module")
def model_path() -> Path:
    path = model_dir()
    if not is_complete(path):
        pytest.skip("the default model is not cached (python -m pdmesh.models.fetch)")
    return path


@pytest.mark.model
def test_smollm2_tools_equals_the_models_template_without_tools(model_path: Path) -> None:
    own = Tokenizer.from_dir(model_path)
    tools = Tokenizer.from_dir(model_path, chat_template=read_chat_template("smollm2-tools"))
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            request = ChatRequest(messages, add_generation_prompt=prompt)
            assert tools.apply_chat_template(request) == own.apply_chat_template(request)


@pytest.mark.model
def test_smollm2_tools_renders_tools_calls_and_results(model_path: Path) -> None:
    tok = Tokenizer.from_dir(model_path, chat_template=read_chat_template("smollm2-tools"))
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
    }
    request = ChatRequest(
        (
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", None, tool_calls=(call,)),
            ChatMessage("tool", "sunny", tool_call_id="call_1"),
        ),
        tools=(WEATHER,),
    )
    text = tok.apply_chat_template(request)
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_continue_final_message_cuts_after_the_last_content() -> None:
    from pdmesh.errors import InvalidRequestError
    from pdmesh.tokenizer.chat import ChatTemplate

    chatml = ChatTemplate(read_chat_template("smollm2-tools"))
    messages = (ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello, I am"))
    open_ = ChatRequest(messages, add_generation_prompt=False, continue_final_message=True)
    assert chatml.render(open_, {}).endswith("<|im_start|>assistant\nHello, I am")
    closed = chatml.render(ChatRequest(messages, add_generation_prompt=False), {})
    assert closed.endswith("Hello, I am<|im_end|>\n")
    with pytest.raises(InvalidRequestError) as info:
        chatml.render(ChatRequest(messages, continue_final_message=True), {})
    assert info.value.field == "continue_final_message"
    # a template that does not write the content verbatim cannot be left open
    shouting = ChatTemplate("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with pytest.raises(InvalidRequestError) as info:
        shouting.render(open_, {})
    assert info.value.field == "continue_final_message"
