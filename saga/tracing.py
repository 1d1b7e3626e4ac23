"""One OpenTelemetry trace per saga, configured by the standard variables only:
OTEL_TRACES_EXPORTER (none, the default; otlp; console), OTEL_EXPORTER_OTLP_ENDPOINT and
OTEL_EXPORTER_OTLP_PROTOCOL (http/protobuf), OTEL_SERVICE_NAME.

A saga's trace context is the start's span, stored with the saga (SAGA.trace), so every
later call, by whichever orchestrator drives it after a takeover, is a child of it. Each
call carries its span's W3C `traceparent` (an HTTP header, a Kafka or RabbitMQ message
header), and the participant's span is that span's child; an event written to the
outbox keeps the context it was written in (OUTBOX.trace) for the relay to send on.

With tracing off, `span()` hands back one shared do-nothing span: the hot path pays a
function call, not the SDK."""

import logging
import os
import socket
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode,
                                 TraceFlags)

log = logging.getLogger("saga")

EXPORTERS = ("none", "otlp", "console")
EXPORTER = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
ENABLED = EXPORTER != "none"
CLIENT, SERVER, PRODUCER, CONSUMER = (SpanKind.CLIENT, SpanKind.SERVER, SpanKind.PRODUCER,
                                      SpanKind.CONSUMER)

_tracer = None


class ConfigError(ValueError):
    pass


def setup(default_name: str) -> None:
    """Install the exporter OTEL_TRACES_EXPORTER names, for this process (once)."""
    global _tracer
    if not ENABLED or _tracer is not None:
        return
    if EXPORTER not in EXPORTERS:
        raise ConfigError(f"OTEL_TRACES_EXPORTER must be one of {', '.join(EXPORTERS)}, "
                          f"not {EXPORTER!r}")
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if EXPORTER == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or \
            os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
        if protocol != "http/protobuf":
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf is "
                              f"supported, not {protocol!r}")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()   # OTEL_EXPORTER_OTLP_ENDPOINT, headers, timeout
    else:
        exporter = ConsoleSpanExporter()
    name = os.environ.get("OTEL_SERVICE_NAME") or default_name
    # Which process made a span is the resource's (said once per batch, not per span):
    # an orchestrator's instance id is the start of its owner id in /health.
    provider = TracerProvider(resource=Resource.create({
        "service.name": name,
        "service.instance.id": f"{socket.gethostname()[:30]}:{os.getpid()}"}))
    # The batch processor starts its thread again in a forked worker by itself.
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("saga")
    log.info("tracing: %s exporter, service.name %s", EXPORTER, name)


class _Off:
    """The span of a process that does not trace: takes everything, records nothing."""

    def set_attribute(self, key, value):
        pass

    def set_status(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


OFF = _Off()


def span(name: str, parent: str | None = None, kind=SpanKind.INTERNAL, **attributes):
    """A span made current for the `with` block: the child of `parent` (a traceparent
    header's value) if given, else of the current span (a new trace if none)."""
    if _tracer is None:
        return OFF
    return _Span(name, parent, kind, attributes)


class _Span:
    """The SDK's start_as_current_span without its layers of context managers: on
    every step call, that is most of what a span costs."""
    __slots__ = ("name", "parent", "kind", "attributes", "span", "token")

    def __init__(self, name, parent, kind, attributes):
        self.name, self.parent, self.kind, self.attributes = name, parent, kind, attributes

    def __enter__(self):
        self.span = _tracer.start_span(self.name, context=_context_of(self.parent),
                                       kind=self.kind, attributes=self.attributes)
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, exc_type, exc, tb):
        otel_context.detach(self.token)
        if exc is not None:
            self.span.set_status(Status(StatusCode.ERROR, f"{exc_type.__name__}: {exc}"))
        self.span.end()
        return False


def _context_of(parent: str | None):
    """The context whose span is a remote parent, from its traceparent (None: none, or
    not a valid one, and the span starts under the current one)."""
    if not parent:
        return None
    parts = parent.split("-")
    try:
        if len(parts) != 4 or parts[0] != "00":
            raise ValueError
        context = SpanContext(int(parts[1], 16), int(parts[2], 16), is_remote=True,
                              trace_flags=TraceFlags(int(parts[3], 16) & 1))
    except ValueError:
        return None
    if not context.is_valid:
        return None
    return trace.set_span_in_context(NonRecordingSpan(context))


def saga_attributes(saga_id: str, saga_type: str, step: int | None = None,
                    attempt: int | None = None, **more) -> dict:
    attributes = {"saga.id": saga_id, "saga.type": saga_type}
    if step is not None:
        attributes["saga.step"] = step
    if attempt is not None:
        attributes["saga.attempt"] = attempt
    return {**attributes, **more}


def annotate(**attributes) -> None:
    """Add attributes to the current span (what a handler learns once it reads its event)."""
    if _tracer is not None:
        current = trace.get_current_span()
        for key, value in attributes.items():
            current.set_attribute(key, value)


def outcome(current, outcome_name: str, failed: bool = False) -> None:
    """Record a call's outcome on its span (and mark the span failed if it failed)."""
    current.set_attribute("saga.outcome", outcome_name)
    if failed:
        current.set_status(Status(StatusCode.ERROR, outcome_name))


def traceparent(current=None) -> str | None:
    """The W3C traceparent of a span (the current one by default), None when off."""
    if _tracer is None or current is OFF:
        return None
    context = (current or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def header_value(headers, name: str = "traceparent") -> str | None:
    """A traceparent from message headers (a dict, or Kafka's list of pairs)."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, dict) else headers
    for key, value in pairs:
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
