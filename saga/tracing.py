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
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("saga")

EXPORTERS = ("none", "otlp", "console")
EXPORTER = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
ENABLED = EXPORTER != "none"
CLIENT, SERVER, PRODUCER, CONSUMER = (SpanKind.CLIENT, SpanKind.SERVER, SpanKind.PRODUCER,
                                      SpanKind.CONSUMER)

_propagator = TraceContextTextMapPropagator()
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
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
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
    return _span(name, parent, kind, attributes)


@contextmanager
def _span(name, parent, kind, attributes):
    context = _propagator.extract({"traceparent": parent}) if parent else None
    with _tracer.start_as_current_span(name, context=context, kind=kind,
                                       attributes=attributes) as current:
        yield current


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
    carrier = {}
    context = trace.set_span_in_context(current) if current is not None else None
    _propagator.inject(carrier, context=context)
    return carrier.get("traceparent")


def header_value(headers, name: str = "traceparent") -> str | None:
    """A traceparent from message headers (a dict, or Kafka's list of pairs)."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, dict) else headers
    for key, value in pairs:
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
