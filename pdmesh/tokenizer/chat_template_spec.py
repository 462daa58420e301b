"""``--chat-template``: a chat template chosen by the operator instead of the model's own.

The spec is a built-in name (a ``.jinja`` file shipped in ``pdmesh/tokenizer/templates/``) or the
path of a Jinja file, as vLLM's and SGLang's ``--chat-template`` take a file. A built-in exists
where a model's own template cannot render what the API needs: SmolLM2-Instruct's ignores
``tools``, so ``smollm2-tools`` adds them in the Hermes / Qwen2.5 ``<tool_call>`` form.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pdmesh.tokenizer.chat import ChatTemplate

TEMPLATES_PACKAGE = "pdmesh.tokenizer"
TEMPLATES_DIR = "templates"


def builtin_templates() -> tuple[str, ...]:
    """The names ``--chat-template`` accepts besides a path."""
    folder = resources.files(TEMPLATES_PACKAGE).joinpath(TEMPLATES_DIR)
    return tuple(
        sorted(f.name[: -len(".jinja")] for f in folder.iterdir() if f.name.endswith(".jinja"))
    )


def read_chat_template(spec: str) -> str:
    """The template source of ``spec`` (a built-in name or a file), compiled once to check it.
    Raises ValueError saying what is wrong."""
    if spec in builtin_templates():
        source = (
            resources.files(TEMPLATES_PACKAGE)
            .joinpath(TEMPLATES_DIR, f"{spec}.jinja")
            .read_text(encoding="utf-8")
        )
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(
                f"--chat-template={spec!r} is neither a file nor a built-in template "
                f"({', '.join(builtin_templates())})"
            )
        source = path.read_text(encoding="utf-8")
    ChatTemplate(source)  # raises ValueError with the line of a syntax error
    return source
