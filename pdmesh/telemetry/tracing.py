"""OpenTelemetry tracing, configured only by the standard ``OTEL_*`` environment variables.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an
OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``…_TRACES_ENDPOINT``), and
``OTEL_SDK_DISABLED`` is not ``true``. Otherwise ``setup_tracing`` installs nothing: the OTel
API stays a no-op and the gRPC interceptors are not even added — no cost when off.

- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or ``…_TRACES_PROTOCOL``): ``grpc`` (default, as the Python
  SDK's own auto-configuration) or ``http/protobuf``. Endpoint, headers, timeout, compression
  and certificates are read by the exporters themselves from their usual variables.
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: ``parentbased_always_on`` (default),
  ``always_on``, ``always_off``, ``traceidratio`` and the ``parentbased_`` forms; the ratio is
  in [0, 1]. A bad value is an error at start, not a silent 100 %.
- ``OTEL_SERVICE_NAME`` overrides the service name; ``OTEL_RESOURCE_ATTRIBUTES`` adds to it.

Spans by hand (names and attributes in ``spans``):

    with span(ROUTE, policy="round_robin", worker=w.id):
        ...
    event(FIRST_TOKEN)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.util.types import AttributeValue

from pdmesh.telemetry.spans import ATTRIBUTE_PREFIX

log = logging.getLogger(__name__)

TRACER_NAME = "pdmesh"
# A proxy tracer: it forwards to whatever provider is installed later (or to none — a no-op),
# so modules can hold it from import time. It is OTel's own global machinery.
_tracer = trace.get_tracer(TRACER_NAME)

Env = Mapping[str, str]


def tracing_enabled(env: Env | None = None) -> bool:
    """Whether the environment asks for traces to be exported."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER")
    if exporters is not None:
        return any(name not in ("", "none") for name in _names(exporters))
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def setup_tracing(service_name: str, env: Env | None = None) -> trace.Tracer:
    """Install a tracer provider exporting as the ``OTEL_*`` variables say, once per process;
    when they ask for nothing, install nothing. Returns pdmesh's tracer either way."""
    env = os.environ if env is None else env
    if not tracing_enabled(env):
        return _tracer
    if tracing_installed():
        log.warning("tracing already set up in this process; keeping the first provider")
        return _tracer
    name = env.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: name}), sampler=sampler_from_env(env)
    )
    for exporter in exporters_from_env(env):
        # batches leave from a background thread; the provider flushes them at exit
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on: service.name=%s, sampler %s", name, provider.sampler.get_description())
    return _tracer


def tracing_installed() -> bool:
    """Whether a real (SDK) tracer provider is installed in this process."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def exporters_from_env(env: Env) -> list[SpanExporter]:
    names = _names(env.get("OTEL_TRACES_EXPORTER", "otlp"))
    exporters: list[SpanExporter] = []
    for name in names:
        if name in ("", "none"):
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp_exporter(env))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: pdmesh supports otlp, console, none")
    return exporters


def _otlp_exporter(env: Env) -> SpanExporter:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    # imported on demand: each exporter pulls in its transport (grpc or requests)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter()
    raise ValueError(f"OTLP protocol {protocol!r}: choose grpc or http/protobuf")


def sampler_from_env(env: Env) -> Sampler:
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    fixed: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
    }
    if name in fixed:
        return fixed[name]
    if name in ("traceidratio", "parentbased_traceidratio"):
        ratio = parse_ratio(env.get("OTEL_TRACES_SAMPLER_ARG"))
        base = TraceIdRatioBased(ratio)
        return ParentBased(base) if name.startswith("parentbased_") else base
    known = ", ".join([*fixed, "traceidratio", "parentbased_traceidratio"])
    raise ValueError(f"OTEL_TRACES_SAMPLER={name!r}; choose {known}")


def parse_ratio(raw: str | None) -> float:
    """``OTEL_TRACES_SAMPLER_ARG`` as a ratio in [0, 1] (unset: 1.0, as the spec says)."""
    if raw is None or not raw.strip():
        return 1.0
    try:
        ratio = float(raw)
    except ValueError:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is not a number") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} must be in [0, 1]")
    return ratio


def span(
    name: str, attributes: Mapping[str, AttributeValue] | None = None, **attrs: AttributeValue
) -> AbstractContextManager[trace.Span]:
    """A child span of the current one, current inside the block. ``attrs`` become
    ``pdmesh.<key>`` attributes; ``attributes`` are taken as named. An exception escaping the
    block marks the span as an error. Tracing off: a shared no-op context (about 1 µs)."""
    if not tracing_installed():
        return _NO_SPAN
    # None values are left out, so callers can pass what they may not know (``worker=None``)
    merged: dict[str, AttributeValue] = {
        ATTRIBUTE_PREFIX + k: v for k, v in attrs.items() if v is not None
    }
    if attributes:
        merged.update(attributes)
    return _tracer.start_as_current_span(name, attributes=merged or None)


_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


def trace_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``…), for a request that travels
    in a message of a stream shared by many requests (whose metadata names no single one);
    empty while tracing is off."""
    if not tracing_installed():
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def start_detached_span(
    name: str,
    carrier: Mapping[str, str],
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue] | None = None,
    **attrs: AttributeValue,
) -> trace.Span | None:
    """A span continuing the trace of ``carrier`` (see ``trace_carrier``), not made current:
    its owner ends it (``span.end()``) when the request ends. ``attrs`` become ``pdmesh.<key>``
    attributes, ``attributes`` are taken as named. None while tracing is off."""
    if not tracing_installed():
        return None
    context = propagate.extract(dict(carrier)) if carrier else None
    merged: dict[str, AttributeValue] = {
        ATTRIBUTE_PREFIX + k: v for k, v in attrs.items() if v is not None
    }
    merged.update(attributes or {})
    return _tracer.start_span(name, context=context, kind=kind, attributes=merged or None)


@contextlib.contextmanager
def current_span(span_: trace.Span | None) -> Iterator[None]:
    """Make ``span_`` (from ``start_detached_span``) current inside the block, so the calls
    made there continue its trace; a no-op for None."""
    if span_ is None:
        yield
        return
    with trace.use_span(span_, end_on_exit=False):
        yield


def event(name: str, **attrs: AttributeValue) -> None:
    """Add an event (e.g. ``FIRST_TOKEN``) to the current span."""
    trace.get_current_span().add_event(name, {ATTRIBUTE_PREFIX + k: v for k, v in attrs.items()})


def set_attributes(**attrs: AttributeValue) -> None:
    """Add ``pdmesh.<key>`` attributes to the current span (e.g. counts known at the end)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes({ATTRIBUTE_PREFIX + k: v for k, v in attrs.items()})


def _names(raw: str) -> list[str]:
    return [part.strip().lower() for part in raw.split(",")]
