"""Typed configuration shared by the services; each field maps 1:1 to a ``--flag``.

``add_dataclass_args`` turns a config dataclass into argparse flags (help text from the field's
``metadata["help"]``, default from the dataclass), and ``from_args`` builds it back.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


def flag(
    default: Any, help: str, env: str | tuple[str, ...] | None = None, secret: bool = False
) -> Any:
    """A dataclass field with its ``--help`` text and an optional env override (``PDMESH_*``;
    with several names the first one set wins). A ``secret`` (API key, token) stays out of the
    dataclass's repr, so a config that is printed or logged does not show it."""
    names = (env,) if isinstance(env, str) else env
    return dataclasses.field(
        default=default, repr=not secret, metadata={"help": help, "env": names}
    )


def env_value(f: dataclasses.Field[Any]) -> tuple[str, str] | None:
    """The first of the field's env variables that is set, with its value."""
    for name in f.metadata.get("env") or ():
        if name in os.environ:
            return name, os.environ[name]
    return None


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        typ = _base_type(hints[f.name])
        default = f.default
        help_text = f.metadata.get("help", "")
        if env := f.metadata.get("env"):
            help_text += f" (env {' or '.join(env)})"
        if typ is bool:
            parser.add_argument(
                name,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text + f" (default: {default})",
            )
        else:
            parser.add_argument(
                name,
                dest=f.name,
                type=typ,
                default=default,
                help=help_text + f" (default: {default!r})",
            )


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from parsed args; a ``PDMESH_*`` env var wins over a flag left at default."""
    hints = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, f.name)
        found = env_value(f)
        if found is not None and value == f.default:
            value = _parse_env(_base_type(hints[f.name]), found[1], found[0])
        values[f.name] = value
    return cls(**values)


def _base_type(t: Any) -> type:
    # ``int | None`` → int
    if get_origin(t) in (Union, types.UnionType):
        t = next(a for a in get_args(t) if a is not type(None))
    return t if isinstance(t, type) else str


def _parse_env(typ: type, raw: str, name: str) -> Any:
    if typ is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        return typ(raw)
    except ValueError as e:
        raise ValueError(
            f"environment variable {name}={raw!r} is not a valid {typ.__name__}"
        ) from e
