"""saga/otlp.py writes the OTLP protobuf of finished spans by hand. Whatever the spans
hold, its bytes must be the library's bytes: spans made by the real SDK, with every kind,
parent (none, local, remote), status, attribute type and value range, and the parts it
hands to the library (events, links, trace state, lists, dropped attributes), from two
tracers so that grouping by scope counts too."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (Link, NonRecordingSpan, SpanContext, SpanKind, Status,
                                 StatusCode, TraceFlags, TraceState, set_span_in_context)

from saga import otlp

memory = InMemorySpanExporter()
provider = TracerProvider(resource=Resource.create({"service.name": "test-otlp",
                                                    "service.instance.id": "host:1"}),
                          span_limits=SpanLimits(max_span_attributes=6))
provider.add_span_processor(SimpleSpanProcessor(memory))
tracers = [provider.get_tracer("saga"), provider.get_tracer("other", "1.2", "https://schema/1")]

text = st.text(max_size=12)
scalar = st.one_of(text, st.booleans(), st.integers(-2 ** 63, 2 ** 63 - 1),
                   st.floats(allow_nan=False))
value = st.one_of(scalar, scalar, scalar, st.integers(2 ** 63, 2 ** 70),
                  st.lists(st.integers(-5, 5), max_size=3), st.lists(text, max_size=3))
span_spec = st.fixed_dictionaries({
    "tracer": st.sampled_from(tracers), "name": text, "kind": st.sampled_from(list(SpanKind)),
    "parent": st.sampled_from(["none", "local", "remote"]),
    "attributes": st.dictionaries(st.sampled_from(["saga.id", "saga.step", "a", "b.c", "d", "e",
                                                   "f", "g"]), value, max_size=8),
    "status": st.sampled_from([None, StatusCode.OK, StatusCode.ERROR]),
    "description": text, "event": st.booleans(), "link": st.booleans(),
    "trace_state": st.booleans()})


def make(spec):
    remote = SpanContext(0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331, is_remote=True,
                         trace_flags=TraceFlags(1),
                         trace_state=TraceState([("k", "v")]) if spec["trace_state"] else None)
    tracer = spec["tracer"]
    context = None
    if spec["parent"] == "remote":
        context = set_span_in_context(NonRecordingSpan(remote))
    elif spec["parent"] == "local":
        context = set_span_in_context(tracer.start_span("parent"))
    span = tracer.start_span(spec["name"], context=context, kind=spec["kind"],
                             attributes=spec["attributes"],
                             links=[Link(remote, {"l": 1})] if spec["link"] else ())
    if spec["event"]:
        span.add_event("e", {"n": 1})
    if spec["status"] is not None:
        span.set_status(Status(spec["status"], spec["description"]))
    span.end()


@settings(max_examples=300, deadline=None)
@given(st.lists(span_spec, min_size=1, max_size=6))
def test_the_bytes_are_the_librarys_whatever_the_spans_hold(specs):
    memory.clear()
    for spec in specs:
        make(spec)
    spans = memory.get_finished_spans()
    assert otlp.encode_spans(spans) == library_encode(spans).SerializeToString()


def test_the_spans_this_project_makes_take_the_fast_path(monkeypatch):
    """The saga's own spans (scalar attributes, remote parent, an error status) never
    reach the library's per-span encoder: that is where the time would go."""
    memory.clear()
    make({"tracer": tracers[0], "name": "invoke B create_b", "kind": SpanKind.CLIENT,
          "parent": "remote", "attributes": {"saga.id": "x", "saga.type": "registration",
                                             "saga.step": 2, "saga.attempt": 1,
                                             "saga.outcome": "failed", "f": math.pi},
          "status": StatusCode.ERROR, "description": "failed", "event": False,
          "link": False, "trace_state": False})
    spans = memory.get_finished_spans()
    expected = library_encode(spans).SerializeToString()
    otlp.encode_spans(spans)   # the resource and scope are encoded (by the library) once
    monkeypatch.setattr(otlp, "_library_span", lambda span: (_ for _ in ()).throw(
        AssertionError("fell back to the library")))
    assert otlp.encode_spans(spans) == expected


def test_text_that_is_not_utf8_loses_what_the_library_loses_and_no_more(caplog):
    """A lone surrogate (valid in JSON, not in UTF-8) in an attribute: the library drops
    that attribute, and so do these bytes; in a name, that span is left out, alone."""
    memory.clear()
    for name, value in (("ok", "fine"), ("bad value", "\ud800"), ("bad name \udfff", "x"),
                        ("after", "fine")):
        make({"tracer": tracers[0], "name": name, "kind": SpanKind.SERVER, "parent": "none",
              "attributes": {"saga.id": value, "saga.step": 1}, "status": None,
              "description": "", "event": False, "link": False, "trace_state": False})
    spans = memory.get_finished_spans()
    expected = ExportTraceServiceRequest.FromString(
        library_encode([s for s in spans if s.name != "bad name \udfff"]).SerializeToString())
    sent = ExportTraceServiceRequest.FromString(otlp.encode_spans(spans))
    assert sent == expected
    names = [s.name for s in sent.resource_spans[0].scope_spans[0].spans]
    assert names == ["ok", "bad value", "after"]
    assert "left out" in caplog.text
