"""saga.tracing makes its own spans (not the SDK's) and hands them to the SDK's
processor. They must behave as the SDK's would: sampled by the configured sampler,
parents and children of the SDK's spans both ways, statuses and exceptions as the SDK
records them, and a traceparent that says whether the trace is sampled."""

import os
import subprocess
import sys

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from saga import tracing

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED_CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


@pytest.fixture
def sdk(monkeypatch):
    """An SDK whose spans are kept in memory, in place of the process's (none in tests)."""
    def make(sampler=None):
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "test"}),
                                  **({"sampler": sampler} if sampler else {}))
        processor = SimpleSpanProcessor(memory)
        provider.add_span_processor(processor)
        monkeypatch.setattr(tracing, "_sdk", tracing._Sdk(provider, processor))
        return memory, provider.get_tracer("library")
    return make


def test_a_span_under_a_callers_traceparent_is_its_remote_child(sdk):
    memory, _ = sdk()
    with tracing.span("invoke B create_b", CALLER, tracing.CLIENT, **{"saga.id": "s1",
                                                                     "saga.step": 2}) as span:
        header = tracing.traceparent(span)
        tracing.outcome(span, "success")
    [done] = memory.get_finished_spans()
    assert done.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c
    assert done.parent.span_id == 0xb7ad6b7169203331 and done.parent.is_remote
    assert done.kind is SpanKind.CLIENT and done.name == "invoke B create_b"
    assert dict(done.attributes) == {"saga.id": "s1", "saga.step": 2, "saga.outcome": "success"}
    assert header == f"00-{done.context.trace_id:032x}-{done.context.span_id:016x}-01"
    assert done.start_time <= done.end_time and done.resource.attributes["service.name"] == "test"


def test_the_sdks_spans_and_ours_are_each_others_parents(sdk):
    memory, library = sdk()
    with tracing.span("saga registration", None, tracing.SERVER) as outer:
        with library.start_as_current_span("library work"):
            with tracing.span("invoke A create_a", None, tracing.CLIENT):
                tracing.annotate(**{"saga.attempt": 1})
    inner, middle, root = memory.get_finished_spans()
    assert root.parent is None and not outer.is_recording()
    assert middle.parent.span_id == root.context.span_id
    assert inner.parent.span_id == middle.context.span_id
    assert inner.attributes["saga.attempt"] == 1
    assert len({s.context.trace_id for s in (inner, middle, root)}) == 1
    # The flags of a new trace are the SDK's (sampled, and random ids: W3C level 2).
    assert root.context.trace_flags == library.start_span("new").get_span_context().trace_flags


def test_an_exception_marks_the_span_failed_and_an_ok_status_is_final(sdk):
    memory, _ = sdk()
    with pytest.raises(KeyError):
        with tracing.span("handle step.done") as span:
            span.record_exception(ValueError("bad payload"))
            raise KeyError("saga_id")
    with tracing.span("ok") as span:
        span.set_status(StatusCode.OK)
        span.set_status(StatusCode.ERROR, "too late")
    failed, ok = memory.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "KeyError: 'saga_id'"
    [event] = failed.events
    assert event.name == "exception" and event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "bad payload"
    assert ok.status.status_code is StatusCode.OK


def test_an_unsampled_caller_is_followed_and_says_so_downstream(sdk):
    memory, _ = sdk()   # the default sampler follows the parent's decision
    with tracing.span("saga registration", UNSAMPLED_CALLER, tracing.SERVER) as span:
        header = tracing.traceparent(span)
        assert not span.is_recording()
        with tracing.span("invoke A create_a", None, tracing.CLIENT) as child:
            child_header = tracing.traceparent(child)
    assert memory.get_finished_spans() == ()
    assert header.startswith("00-0af7651916cd43dd8448eb211c80319c-") and header.endswith("-00")
    assert child_header.endswith("-00") and child_header != header


@pytest.mark.parametrize("sampler, caller, recorded", [
    (ALWAYS_OFF, None, 0), (ParentBased(TraceIdRatioBased(1.0)), None, 3),
    (ParentBased(TraceIdRatioBased(0.0)), None, 0),
    (ParentBased(TraceIdRatioBased(0.0)), CALLER, 3),   # follows the sampled caller
    (TraceIdRatioBased(0.0), CALLER, 0),                # decides alone
    (ParentBased(TraceIdRatioBased(1.0)), UNSAMPLED_CALLER, 0)])
def test_the_configured_sampler_decides(sdk, sampler, caller, recorded):
    memory, _ = sdk(sampler)
    for _ in range(3):
        with tracing.span("saga registration", caller, tracing.SERVER):
            pass
    assert len(memory.get_finished_spans()) == recorded


@pytest.mark.parametrize("header", [
    CALLER.upper(), "00-0x" + CALLER[5:], CALLER[:-1],
    "ff" + CALLER[2:], CALLER + "-extra", "00-" + "0" * 32 + CALLER[35:], "", "garbage"])
def test_a_malformed_traceparent_starts_a_new_trace(sdk, header):
    memory, _ = sdk()
    with tracing.span("saga registration", header, tracing.SERVER):
        pass
    [done] = memory.get_finished_spans()
    assert done.parent is None and done.context.trace_id != 0x0af7651916cd43dd8448eb211c80319c


def test_a_callers_random_flag_reaches_the_children(sdk):
    """The random-id flag (W3C level 2) of a caller stays on its trace, as the SDK keeps it."""
    sdk()
    with tracing.span("saga registration", CALLER[:-2] + "03", tracing.SERVER) as span:
        assert tracing.traceparent(span).endswith("-03")


def test_unset_does_not_clear_an_error(sdk):
    memory, _ = sdk()
    with tracing.span("x") as span:
        span.set_status(StatusCode.ERROR, "failed")
        span.set_status(StatusCode.UNSET)
    assert memory.get_finished_spans()[0].status.status_code is StatusCode.ERROR


def test_a_forked_worker_names_itself_in_its_spans(sdk):
    """Services build their app in gunicorn's master; each worker is a fork."""
    sdk()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the worker
        try:
            os.write(write, tracing._sdk.resource.attributes["service.instance.id"].encode())
        finally:
            os._exit(0)
    os.close(write)
    named = os.read(read, 200).decode()
    os.waitpid(pid, 0)
    assert named.endswith(f":{pid}")
    assert tracing._sdk.resource.attributes["service.name"] == "test"


def test_otel_sdk_disabled_turns_tracing_off():
    code = ("from saga import tracing; tracing.setup('x'); "
            "print(tracing.span('a') is tracing.OFF)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OTEL_TRACES_EXPORTER": "console",
                              "OTEL_SDK_DISABLED": "true"}, check=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "True"


def test_a_span_keeps_only_values_otlp_carries(sdk):
    memory, _ = sdk()
    with tracing.span("x") as span:
        span.set_attributes({"list": [1, 2], "object": object(), "none": None, "text": "t"})
    [done] = memory.get_finished_spans()
    assert dict(done.attributes) == {"list": (1, 2), "text": "t"}
