"""One OpenTelemetry trace per saga (DESIGN 'Observability'): the real processes export
over OTLP/HTTP to a small receiver in this test (tools/otlp_receiver.py). A caller's
traceparent is honoured; each participant's span is the child of the orchestrator's
call span over HTTP and Kafka, and of the relay's publish span over RabbitMQ; a saga
resumed by another orchestrator after a kill -9 stays in its trace."""

import os
import secrets

import pytest
import requests

from conftest import in_background, join
from launcher import wait_for
from otlp_receiver import Receiver

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5   # OTLP's SpanKind numbers


@pytest.fixture(scope="module")
def receiver():
    r = Receiver().start()
    yield r
    r.stop()


def traced(receiver, **env):
    # Short export delay: a test waits for spans, not for the batch to fill.
    return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "100",
            **env}


def caller_context():
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def wait_spans(receiver, trace_id, condition, what):
    return wait_for(lambda: (lambda spans: spans if condition(spans) else None)(
        receiver.of_trace(trace_id)), 30, what, interval=0.1)


def by_id(spans):
    return {s["span_id"]: s for s in spans}


def calls(spans, service=None):
    return [s for s in spans if s["kind"] == CLIENT
            and (service is None or s["attributes"]["saga.service"] == service)]


def test_a_saga_is_one_trace_under_the_callers_and_each_service_span_is_its_calls_child(
        make_system, receiver):
    system = make_system(**traced(receiver))
    system.set_fault("A", mode="fail", next=1)   # one retry, so two calls to A
    trace_id, caller_span, header = caller_context()
    resp = requests.post(system.system.url("orchestrator") + "/start", timeout=30,
                         json={"username": "traced", "address": "1 Span St", "payment": "Visa"},
                         headers={"traceparent": header})
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    spans = wait_spans(receiver, trace_id, lambda s: len(
        [x for x in s if x["service"].startswith("saga-service")]) >= 4 and [
            x for x in s if x["kind"] == SERVER and x["service"] == "saga-orchestrator"],
        "the saga's span and the services' spans")
    ids = by_id(spans)
    root, = [s for s in spans if s["kind"] == SERVER and s["service"] == "saga-orchestrator"]
    assert root["parent_id"] == caller_span and root["attributes"]["saga.id"] == sid
    made = calls(spans)
    assert [(c["attributes"]["saga.service"], c["attributes"]["saga.attempt"],
             c["attributes"]["saga.outcome"]) for c in sorted(made, key=lambda c: c["start_ns"])] \
        == [("A", 1, "failed"), ("A", 2, "success"), ("B", 1, "success"), ("C", 1, "success")]
    for call in made:
        assert call["parent_id"] == root["span_id"]
        assert call["attributes"]["saga.id"] == sid
        assert call["attributes"]["saga.type"] == "registration"
        assert call["attributes"]["saga.step"] == "ABC".index(call["attributes"]["saga.service"]) + 1
    served = [s for s in spans if s["service"].startswith("saga-service")]
    assert sorted(s["service"] for s in served) == [
        "saga-service-a", "saga-service-a", "saga-service-b", "saga-service-c"]
    for span in served:
        parent = ids[span["parent_id"]]
        assert parent["kind"] == CLIENT and span["kind"] == SERVER
        assert span["attributes"]["saga.service"] == parent["attributes"]["saga.service"]
        assert span["attributes"]["saga.outcome"] == (
            "500" if parent["attributes"]["saga.outcome"] == "failed" else "200")


def test_a_saga_resumed_after_its_orchestrator_is_killed_stays_in_its_trace(make_system,
                                                                            receiver):
    system = make_system(orchestrators=2, **traced(receiver))
    system.set_fault("B", mode="hang", seconds=2, next=1)
    trace_id, _, header = caller_context()
    thread, answer = in_background(lambda: requests.post(
        system.system.url("orchestrator") + "/start", timeout=30, headers={"traceparent": header},
        json={"username": "taken_over", "address": "2 Span St", "payment": "Visa"}))
    sid = wait_for(lambda: system.query("SELECT id FROM SAGA WHERE step = 1"), 15,
                   "the saga at step B")[0][0]
    first = system.get("/health").json()["owner"]
    # Its calls so far must reach the receiver before the process dies with them.
    wait_spans(receiver, trace_id, lambda s: calls(s, "A"), "A's call exported")
    system.system.kill("orchestrator")
    join(thread, 10)
    second = requests.get(system.system.url("orchestrator2") + "/health", timeout=5).json()["owner"]
    assert system.wait_status(sid) == "COMPLETED"
    spans = wait_spans(receiver, trace_id, lambda s: calls(s, "C"), "C's call by the new owner")
    # Which orchestrator made a call is its process's instance id (its owner id's start).
    drivers = {c["attributes"]["saga.service"]: c["instance"] for c in calls(spans)}
    assert drivers["A"] == first.rsplit(":", 1)[0] and drivers["C"] == second.rsplit(":", 1)[0]
    # The saga's span died unfinished with its process; it lives on in the saga's row,
    # and every call, by either orchestrator, is its child.
    stored, = system.query("SELECT trace FROM SAGA WHERE id = %s", (sid,))[0]
    assert stored.split("-")[1] == trace_id
    assert {c["parent_id"] for c in calls(spans)} == {stored.split("-")[2]}
    system.wait_idle("B")


def test_over_kafka_each_service_span_is_the_child_of_its_command(make_system, kafka, receiver):
    system = make_system(**traced(receiver, SAGA_TRANSPORT="kafka",
                                  KAFKA_BOOTSTRAP=kafka.bootstrap, SAGA_READ_TIMEOUT="2"))
    system.wait_kafka_ready()
    trace_id, caller_span, header = caller_context()
    resp = requests.post(system.system.url("orchestrator") + "/transfer", timeout=30,
                         json={"from": "A", "to": "C", "amount": "5.00"},
                         headers={"traceparent": header})
    assert resp.status_code == 200, resp.text
    spans = wait_spans(receiver, trace_id, lambda s: len(
        [x for x in s if x["kind"] == CONSUMER]) >= 2 and len(calls(s)) >= 2,
        "both calls and both services' command spans")
    ids = by_id(spans)
    served = sorted((s for s in spans if s["kind"] == CONSUMER), key=lambda s: s["start_ns"])
    assert [(s["service"], s["attributes"]["saga.op"]) for s in served] == [
        ("saga-service-a", "debit"), ("saga-service-c", "credit")]
    for span in served:
        assert ids[span["parent_id"]]["kind"] == CLIENT
        assert ids[span["parent_id"]]["attributes"]["saga.op"] == span["attributes"]["saga.op"]


def test_a_choreography_is_one_trace_through_the_outbox_and_the_broker(live_system_traced,
                                                                       receiver):
    trace_id, caller_span, header = caller_context()
    resp = requests.post(live_system_traced.service("A") + "/register", timeout=30,
                         json={"username": "chore", "address": "3 Span St", "payment": "Visa"},
                         headers={"traceparent": header})
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    spans = wait_spans(receiver, trace_id, lambda s: len(
        [x for x in s if x["kind"] == CONSUMER]) >= 3 and len(
            [x for x in s if x["kind"] == PRODUCER]) >= 3 and [
            x for x in s if x["kind"] == SERVER], "the saga's start, events and handlers")
    ids = by_id(spans)
    start, = [s for s in spans if s["kind"] == SERVER]
    assert start["parent_id"] == caller_span and start["service"] == "saga-service-a"
    assert start["attributes"]["saga.id"] == sid
    handled = sorted((s for s in spans if s["kind"] == CONSUMER), key=lambda s: s["start_ns"])
    assert [(s["service"], s["attributes"]["saga.event"]) for s in handled][:3] == [
        ("saga-service-b", "registration.user.done"),
        ("saga-service-c", "registration.address.done"),
        ("saga-service-a", "registration.payment.done")]
    for span in handled:
        published = ids[span["parent_id"]]
        assert published["kind"] == PRODUCER
        assert published["attributes"]["saga.event"] == span["attributes"]["saga.event"]
    # Each event was written in the span of the step before it: the chain is unbroken.
    assert ids[handled[0]["parent_id"]]["parent_id"] == start["span_id"]
    assert ids[handled[1]["parent_id"]]["parent_id"] == handled[0]["span_id"]


@pytest.fixture
def live_system_traced(make_system, receiver):
    return make_system(**traced(receiver))


def test_a_tracing_setting_it_cannot_honour_is_refused_naming_the_variable(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "SAGA_TYPE_MODULES": "sagas.registration"}
    run = subprocess.run([sys.executable, "-c", "import saga.tracing as t; t.setup('x')"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" in run.stderr and "grpc" in run.stderr
