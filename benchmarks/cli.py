"""The steps every benchmark command's ``main`` repeats: its flags into its config, its run
guarded so that failures exit with a message instead of a traceback, its JSON file.

Exit codes, the same in every command: 2 for bad flags, 1 for a run that failed, 130 after
Ctrl-C (the shell's code for SIGINT).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pdmesh.config import from_args

C = TypeVar("C")
T = TypeVar("T")

BAD_FLAGS, FAILED, INTERRUPTED = 2, 1, 130


def parse_config(parser: argparse.ArgumentParser, cls: type[C], argv: list[str] | None) -> C | None:
    """``argv`` parsed into ``cls``; None after printing why the flags were refused (the
    config's ``__post_init__`` checks): the caller returns ``BAD_FLAGS``."""
    args = parser.parse_args(argv)
    try:
        return from_args(cls, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def run_or_fail(work: Callable[[], T], errors: tuple[type[Exception], ...]) -> T | int:
    """``work()``'s result; ``FAILED`` after one of ``errors`` (its message on stderr: a
    process that died, a bad file, ...), ``INTERRUPTED`` after Ctrl-C."""
    try:
        return work()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def write_json(path: str, doc: Any) -> None:
    """``doc`` as indented JSON in ``path``, with a final newline."""
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")
