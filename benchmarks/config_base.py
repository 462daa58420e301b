"""What the benchmarks' config dataclasses share: the run flags of the benchmarks that start
their own processes, and the checks every config's ``__post_init__`` makes.

``MeshRunConfig`` is the base of every benchmark that starts a mesh of processes and sends it
requests (``mesh``, ``pd-vs-agg``, ``vs-smg``, ``router-overhead``, ``routing-quality``);
``ReportedRunConfig`` adds the JSON file and the progress bars that all of them but ``mesh``
have (``mesh`` names its file ``--output`` and draws no bars). A subclass that needs another
default or help text redeclares the field: it keeps its place, so ``--help`` lists the shared
flags first, in the same order everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag


@dataclass(frozen=True)
class MeshRunConfig:
    seed: int = flag(1, "seed of the prompts")
    startup_timeout: float = flag(
        600.0, "seconds the processes get to become healthy (the first start converts the model)"
    )
    request_timeout: float = flag(600.0, "seconds one request may take before it counts as failed")
    log_dir: str = flag("", "where the processes' logs go; empty: a new temporary directory")

    def __post_init__(self) -> None:
        require_positive(self, "startup_timeout", "request_timeout")


@dataclass(frozen=True)
class ReportedRunConfig(MeshRunConfig):
    json_out: str = flag("", "also write the config and every figure to this JSON file")
    progress: bool = flag(True, "show progress bars on stderr")


def dash(name: str) -> str:
    """The flag of a field: ``max_model_len`` -> ``max-model-len``."""
    return name.replace("_", "-")


def require_positive(cfg: object, *names: str) -> None:
    """``ValueError`` naming the first of these fields that is not > 0 (nan is not)."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ValueError(f"--{dash(name)}={value} must be > 0")


def require_at_least(cfg: object, minimum: int, *names: str) -> None:
    """``ValueError`` naming the first of these fields below ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ValueError(f"--{dash(name)}={value} must be >= {minimum}")


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """``ValueError`` unless ``--name``'s ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"--{name}={value!r}; choose {', '.join(choices)}")


def name_list(text: str) -> list[str]:
    """A comma-separated flag (``--arms``, ``--topologies``, ...) as its stripped, non-empty
    items, in order."""
    return [item.strip() for item in text.split(",") if item.strip()]


def int_list(text: str) -> list[int]:
    """A comma-separated ``--concurrency``'s levels; [] when one is not an int (the caller's
    check then rejects it with an example)."""
    try:
        return [int(x) for x in name_list(text)]
    except ValueError:
        return []


def positive_ints(cfg: object, name: str) -> list[int]:
    """The comma-separated ints of field ``name`` (``--decode-batches``, ``--tp-size``, ...);
    ``ValueError`` naming the flag when one is not an int or not > 0, or there is none."""
    raw = getattr(cfg, name)
    try:
        values = [int(x) for x in name_list(raw)]
    except ValueError as e:
        raise ValueError(f"--{dash(name)}={raw!r}: not a list of ints") from e
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"--{dash(name)}={raw!r}: values must be > 0")
    return values
