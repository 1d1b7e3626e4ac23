"""One OpenTelemetry trace per saga, configured by the standard variables only:
OTEL_TRACES_EXPORTER (none, the default; otlp; console), OTEL_EXPORTER_OTLP_ENDPOINT and
OTEL_EXPORTER_OTLP_PROTOCOL (http/protobuf), OTEL_SERVICE_NAME, and the SDK's own
(OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS...).

A saga's trace context is the start's span, stored with the saga (SAGA.trace), so every
later call, by whichever orchestrator drives it after a takeover, is a child of it. Each
call carries its span's W3C `traceparent` (an HTTP header, a Kafka or RabbitMQ message
header), and the participant's span is that span's child; an event written to the
outbox keeps the context it was written in (OUTBOX.trace) for the relay to send on.

The spans are this module's own `Span`: the SDK's sampler, ids, resource, batch processor
and exporter decide and send them, but making one costs a third of the SDK's span (which
locks, bounds and copies what these few spans never need). With tracing off, `span()`
hands back one shared do-nothing span: the hot path pays a function call."""

import functools
import logging
import os
import re
import socket
import time
import weakref
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode,
                                 TraceFlags)

log = logging.getLogger("saga")

EXPORTERS = ("none", "otlp", "console")
EXPORTER = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
# OTEL_SDK_DISABLED=true turns the SDK off whatever the exporter, as the SDK does.
ENABLED = EXPORTER != "none" and \
    os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"
CLIENT, SERVER, PRODUCER, CONSUMER = (SpanKind.CLIENT, SpanKind.SERVER, SpanKind.PRODUCER,
                                      SpanKind.CONSUMER)

_sdk = None   # what makes and sends the spans, once set up: _Sdk


class ConfigError(ValueError):
    pass


class _Sdk:
    """The parts of the SDK a span uses, read once."""

    def __init__(self, provider, processor):
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.sdk.trace import Span as SdkSpan
        from opentelemetry.sdk.trace.sampling import DEFAULT_ON
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        self.readable, self.event = ReadableSpan, Event
        # The SDK's own, which needs only add_event of the span it is given.
        self.record_exception = SdkSpan.record_exception
        self.provider, self.sampler, self.ids = provider, provider.sampler, provider.id_generator
        self.resource = provider.resource
        self.processor = processor
        # A service's app is built in gunicorn's master and its workers are forks: the
        # SDK gives a forked child a resource of its own, and so does this, naming it.
        if hasattr(os, "register_at_fork"):
            forked = weakref.WeakMethod(self.forked)

            def after_in_child():
                if (method := forked()) is not None:
                    method()
            os.register_at_fork(after_in_child=after_in_child)
        self.scope = InstrumentationScope("saga")
        # The default sampler (parentbased_always_on) decides without being asked: a
        # span is sampled if its parent is, or if it starts a trace.
        self.follow_parent = self.sampler is DEFAULT_ON

    def forked(self) -> None:
        from opentelemetry.sdk.resources import Resource
        self.resource = self.provider.resource.merge(
            Resource({"service.instance.id": instance_id()}))


def instance_id() -> str:
    """Which process made a span: host:pid (an orchestrator's is the start of its owner id)."""
    return f"{socket.gethostname()[:30]}:{os.getpid()}"


def setup(default_name: str) -> None:
    """Install the exporter OTEL_TRACES_EXPORTER names, for this process (once)."""
    global _sdk
    if not ENABLED or _sdk is not None:
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
        from saga.otlp import SpanExporter
        exporter = SpanExporter()   # OTEL_EXPORTER_OTLP_ENDPOINT, headers, timeout
    else:
        exporter = ConsoleSpanExporter()
    name = os.environ.get("OTEL_SERVICE_NAME") or default_name
    # Which process made a span is the resource's (said once per batch, not per span):
    # an orchestrator's instance id is the start of its owner id in /health.
    provider = TracerProvider(resource=Resource.create({
        "service.name": name, "service.instance.id": instance_id()}))
    # The batch processor starts its thread again in a forked worker by itself.
    processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)   # (for spans of other libraries' tracers)
    trace.set_tracer_provider(provider)
    _sdk = _Sdk(provider, processor)
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
    if _sdk is None:
        return OFF
    return Span(name, parent, kind, attributes)


_SCALARS = (str, bool, int, float)


class Span(trace.Span):
    """A span of OpenTelemetry's API, sampled by the SDK's sampler like one of its own,
    handed to its batch processor as a ReadableSpan when the `with` block ends. Not made
    (nor its attributes bounded) by the SDK: a saga's spans carry a handful of scalar
    attributes, so none of its limits can apply."""
    __slots__ = ("name", "parent", "kind", "attributes", "context", "parent_context",
                 "start", "status", "events", "links", "token", "ended")

    def __init__(self, name, parent, kind, attributes):
        self.name, self.parent, self.kind, self.attributes = name, parent, kind, attributes
        self.status, self.events, self.links, self.ended = _UNSET, (), (), False

    def __enter__(self):
        sdk = _sdk
        parent = _parent_of(self.parent) if self.parent else None
        if parent is None:
            parent = trace.get_current_span().get_span_context()
        if parent.is_valid:
            trace_id, random_id = parent.trace_id, parent.trace_flags.random_trace_id
        else:
            parent, trace_id = None, sdk.ids.generate_trace_id()
            random_id = sdk.ids.is_trace_id_random()
        if sdk.follow_parent:
            sampled = recording = parent is None or parent.trace_flags.sampled
            trace_state = parent.trace_state if parent is not None else None
        else:
            sampling = sdk.sampler.should_sample(
                trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None,
                trace_id, self.name, self.kind, self.attributes)
            sampled, recording = sampling.decision.is_sampled(), sampling.decision.is_recording()
            trace_state, self.attributes = sampling.trace_state, dict(sampling.attributes)
        flags = TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT
        if random_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        self.context = SpanContext(trace_id, sdk.ids.generate_span_id(), is_remote=False,
                                   trace_flags=TraceFlags(flags), trace_state=trace_state)
        self.parent_context = parent
        if recording:
            self.start, current = time.time_ns(), self
        else:
            self.ended, current = True, NonRecordingSpan(self.context)
        self.token = otel_context.attach(trace.set_span_in_context(current))
        return current

    def __exit__(self, exc_type, exc, tb):
        otel_context.detach(self.token)
        if exc is not None:
            self.set_status(Status(StatusCode.ERROR, f"{exc_type.__name__}: {exc}"))
        self.end()
        return False

    def end(self, end_time: int | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        _sdk.processor.on_end(_sdk.readable(
            self.name, self.context, self.parent_context, _sdk.resource, self.attributes,
            self.events, self.links, self.kind, None, self.status, self.start,
            end_time or time.time_ns(), _sdk.scope))

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return not self.ended

    def set_attribute(self, key: str, value) -> None:
        if self.ended:
            return
        if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value):
            value = tuple(value)
        elif not isinstance(value, _SCALARS):
            log.warning("tracing: attribute %s dropped: %s is not a value OTLP carries",
                        key, type(value).__name__)
            return
        self.attributes[key] = value

    def set_attributes(self, attributes) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes=None, timestamp: int | None = None) -> None:
        if not self.ended:
            self.events += (_sdk.event(name, attributes, timestamp or time.time_ns()),)

    def add_link(self, context: SpanContext, attributes=None) -> None:
        if not self.ended and context.is_valid:
            self.links += (trace.Link(context, attributes),)

    def update_name(self, name: str) -> None:
        if not self.ended:
            self.name = name

    def set_status(self, status, description: str | None = None) -> None:
        # As the SDK's: OK is final, UNSET is no change, only an error keeps a description.
        status = status if isinstance(status, Status) else Status(status, description)
        if self.ended or self.status.status_code is StatusCode.OK or \
                status.status_code is StatusCode.UNSET:
            return
        self.status = status

    def record_exception(self, exception: BaseException, attributes=None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        _sdk.record_exception(self, exception, attributes, timestamp, escaped)


_UNSET = Status(StatusCode.UNSET)


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _parent_of(traceparent: str) -> SpanContext | None:
    """The remote parent a version-00 traceparent names (None: not a valid one, and the
    span starts under the current one)."""
    return _parsed(traceparent) if len(traceparent) == 55 else None


@functools.lru_cache(maxsize=256)   # a saga's calls share its traceparent
def _parsed(traceparent: str) -> SpanContext | None:
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    context = SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                          trace_flags=TraceFlags(int(flags, 16)))
    return context if context.is_valid else None


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
    if _sdk is not None:
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
    if _sdk is None or current is OFF:
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
