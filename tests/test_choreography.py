"""Seeds 001 and 003: the registration choreographed over RabbitMQ. A's /register stores
the user and publishes an event; B and C react in turn; a failure or refusal sends the
undo back by events, in reverse order. No orchestrator in the path, nothing lost when a
service dies between its commit and its publish, or when the broker restarts."""

import os
import signal
import time

import pika
import pytest

from saga.common import SERVICES, Settings
from conftest import SEED_INPUT, in_background, join
from brokers import list_descendants
from launcher import free_port, wait_for
from saga.participant.choreography import bindings
from saga.participant.events import dead_letter_queue, service_queue
from saga.definitions import SAGA_TYPES

FORWARD = [("A", "invoke", None, "success"),
           ("A", "publish", "registration.user.done", "published"),
           ("B", "invoke", "registration.user.done", "success"),
           ("B", "publish", "registration.address.done", "published"),
           ("C", "invoke", "registration.address.done", "success"),
           ("C", "publish", "registration.payment.done", "published")]


def test_choreographed_registration_completes_with_one_row_per_table(live_system):
    resp = live_system.register()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "COMPLETED" and body["type"] == "registration"
    sid = body["saga"]
    assert live_system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    assert live_system.events(sid) == FORWARD
    assert live_system.log(sid)[-1] == ("SAGA", None, None, "COMPLETED")
    # The orchestrator's read API shows it, as a choreography.
    item = live_system.get(f"/sagas/{sid}").json()
    assert (item["mode"], item["transport"], item["status"]) == (
        "choreography", "rabbitmq", "COMPLETED")
    assert item["input"] == SEED_INPUT
    assert item["results"]["A"]["user_id"] > 0 and "payment_id" in item["results"]["C"]


def test_choreography_needs_no_orchestrator(live_system):
    live_system.system.kill("orchestrator")
    resp = live_system.register()
    assert resp.status_code == 200, resp.text
    assert live_system.row_counts(resp.json()["saga"]) == {"TABLE_A": 1, "TABLE_B": 1,
                                                           "TABLE_C": 1}


def undo_events(live_system, sid):
    return [(s, e, st) for s, a, e, st in live_system.events(sid) if a == "compensate"]


@pytest.mark.parametrize("failed", ["B", "C"])
def test_refusal_sends_the_undo_back_in_reverse_order(live_system, failed):
    live_system.set_fault(failed, mode="reject")
    resp = live_system.register()
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["status"] == "COMPENSATED" and body["failed_step"] == failed
    sid = body["saga"]
    op = {"B": "address", "C": "payment"}[failed]
    if failed == "C":
        assert undo_events(live_system, sid) == [
            ("B", "registration.payment.failed", "success"),
            ("A", "registration.address.undone", "success")]
    else:
        assert undo_events(live_system, sid) == [("A", "registration.address.failed", "success")]
    assert (failed, "invoke", "rejected") in [(s, a, st) for s, a, _, st in live_system.events(sid)]
    assert (failed, "publish", f"registration.{op}.failed", "published") in live_system.events(sid)
    assert live_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


@pytest.mark.parametrize("failed", ["B", "C"])
def test_failing_handler_is_redelivered_up_to_the_limit_then_undone(live_system, failed):
    live_system.set_fault(failed, mode="fail")
    resp = live_system.register()
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    tries = [(a, st) for s, a, e, st in live_system.events(sid) if s == failed and a == "invoke"]
    assert tries == [("invoke", "failed")] * 3, tries
    attempts = live_system.query("SELECT attempt FROM SAGA_LOG WHERE saga_id = %s AND "
                                 "service = %s AND action = 'invoke' ORDER BY id", (sid, failed))
    assert [a for (a,) in attempts] == [1, 2, 3]
    assert live_system.status(sid) == "COMPENSATED"
    assert live_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


def test_a_handler_that_fails_once_succeeds_on_redelivery(live_system):
    live_system.set_fault("C", mode="fail", next=1)
    resp = live_system.register()
    assert resp.status_code == 200, resp.text
    c = [(a, st) for s, a, e, st in live_system.events(resp.json()["saga"]) if s == "C"]
    assert c == [("invoke", "failed"), ("invoke", "success"), ("publish", "published")]


@pytest.mark.parametrize("mode", ["crash", "drop"])
@pytest.mark.parametrize("service", ["B", "C"])
def test_service_killed_between_its_commit_and_its_publish_loses_nothing(live_system, service,
                                                                        mode):
    # crash: the process dies right after its transaction (row + event in OUTBOX)
    # committed, before the event went out and before the message was acknowledged;
    # drop: the connection to the broker is cut instead. The event is published by
    # the relay of the restarted process; the redelivered message is a repeat.
    live_system.set_fault(service, mode=mode, next=1)
    resp = live_system.register()
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    assert live_system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    handled = [st for s, a, e, st in live_system.events(sid) if s == service and a == "invoke"]
    assert handled == ["success"]
    assert live_system.query("SELECT COUNT(*) FROM OUTBOX WHERE saga_id = %s AND "
                             "published_at IS NULL", (sid,))[0][0] == 0


def test_broker_restart_mid_run_loses_nothing(make_system, rabbitmq):
    live_system = make_system()
    live_system.set_fault("B", mode="slow", seconds=1, next=3)
    clients = [in_background(live_system.register) for _ in range(3)]
    live_system.wait_serving("B")
    rabbitmq.kill()
    rabbitmq.start()
    for thread, _ in clients:
        join(thread, 90)
    live_system.wait_quiet(timeout=90)
    done = live_system.query("SELECT COUNT(*) FROM SAGA WHERE status = 'COMPLETED'")[0][0]
    assert done == 3
    live_system.assert_all_or_nothing()
    assert live_system.query("SELECT COUNT(*) FROM OUTBOX WHERE published_at IS NULL")[0][0] == 0


def test_register_with_the_same_idempotency_key_registers_once(live_system):
    headers = {"Idempotency-Key": "reg-key-1"}
    first, again = live_system.register(headers=headers), live_system.register(headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["saga"] == first.json()["saga"] and again.json()["repeated"] is True
    other = live_system.register({**SEED_INPUT, "username": "x"}, headers=headers)
    assert other.status_code == 422
    assert live_system.row_counts() == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


@pytest.mark.parametrize("body, field", [({"username": "a", "address": "b"}, "payment"),
                                         ({**SEED_INPUT, "username": ""}, "username"),
                                         ({**SEED_INPUT, "extra": 1}, "extra")])
def test_bad_register_is_400_and_writes_nothing(live_system, body, field):
    resp = live_system.register(body)
    assert resp.status_code == 400 and resp.json()["field"] == field
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 0


def test_only_the_first_steps_service_starts_registrations(live_system):
    resp = live_system.post_service("B", "/register", SEED_INPUT)
    assert resp.status_code == 404


def test_first_step_failing_once_is_tried_again_by_a(live_system):
    live_system.set_fault("A", mode="fail", next=1)
    resp = live_system.register()
    assert resp.status_code == 200, resp.text
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 1


def test_first_step_failing_every_time_answers_503_and_writes_nothing(live_system):
    live_system.set_fault("A", mode="fail")
    resp = live_system.register()
    assert resp.status_code == 503 and "nothing was written" in resp.json()["error"]
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 0
    assert live_system.get_service("A", "/faults")["calls"] == 3


MALFORMED = [
    (b"not json", {}),
    (b"[1, 2]", {}),
    (b'"text"', {}),
    (b'{"type": "registration", "input": {}, "results": {}}', {}),              # no saga_id
    (b'{"saga_id": 7, "type": "registration", "input": {}, "results": {}}', {}),
    (b'{"saga_id": "s", "type": "registration", "input": [], "results": {}}', {}),
    (b'{"saga_id": "s", "type": "other", "input": {}, "results": {}}', {}),
    (b'{"saga_id": "s", "type": "registration", "input": {}, "results": {}}',
     {"x-saga-attempt": "first"}),
    (b'{"saga_id": "s", "type": "registration", "input": {}, "results": {}}',
     {"x-saga-attempt": -1}),
]


def test_malformed_messages_are_parked_and_every_consumer_keeps_consuming(live_system):
    settings = Settings(db_name=live_system.dbname)
    conn = pika.BlockingConnection(pika.URLParameters(live_system.rabbitmq.url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for service in SERVICES:
            for body, headers in MALFORMED:
                # Under the routing key of an event the service does react to.
                event = bindings([SAGA_TYPES["registration"]])[service][0]
                channel.basic_publish("", service_queue(settings, service), body,
                                      pika.BasicProperties(headers={"x-saga-event": event,
                                                                    **headers}))

        def parked():
            return [channel.queue_declare(dead_letter_queue(settings, s), passive=True)
                    .method.message_count for s in SERVICES]

        wait_for(lambda: parked() == [len(MALFORMED)] * 3, 30, "every message to be parked")
    finally:
        conn.close()
    counted = sum(live_system.get_service(s, "/health")["rabbitmq"]["dead_lettered"]
                  for s in SERVICES)
    assert counted == 3 * len(MALFORMED)
    # Every consumer of every service is still there: sagas of every mode run.
    for _ in range(2 * int(live_system.system.env["SAGA_CONSUMERS"])):
        assert live_system.register().status_code == 200
    assert live_system.start().status_code == 200
    assert live_system.transfer({"amount": 5}).status_code == 200
    live_system.assert_all_or_nothing()
    live_system.assert_money_conserved()


def test_an_undo_that_keeps_failing_parks_the_saga_failed_and_an_operator_retry_redrives_it(
        live_system):
    live_system.set_fault("C", mode="reject", next=1)
    live_system.set_fault("B", mode="fail", on="compensate")
    resp = live_system.register()
    # SAGA_COMPENSATE_FOR is 3 s here: B's undo is retried that long, then the saga waits
    # for an operator instead of being redelivered unseen forever.
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    assert resp.json()["status"] == "FAILED" and "kept failing" in resp.json()["reason"]
    assert live_system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 0}
    listed = live_system.get("/sagas?status=FAILED&mode=choreography").json()["sagas"]
    assert [s["id"] for s in listed] == [sid]

    live_system.set_fault("B", mode="off")
    retried = live_system.post(f"/sagas/{sid}/retry")
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "COMPENSATED"
    assert live_system.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    assert [e for e in live_system.events(sid) if e[1] == "compensate"][-2:] == [
        ("B", "compensate", "registration.payment.undone", "success"),
        ("A", "compensate", "registration.address.undone", "success")]
    live_system.assert_all_or_nothing()


def test_a_service_killed_inside_its_handler_gets_the_event_again(live_system):
    live_system.set_fault("B", mode="slow", seconds=60, next=1)
    thread, answer = in_background(live_system.register)
    live_system.wait_serving("B")
    # The event B was handling was not acknowledged: the broker hands it out again to
    # the B that comes back (its faults start off).
    live_system.system.restart("service_b")
    join(thread)
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert answer["resp"].json()["status"] == "COMPLETED"
    live_system.assert_all_or_nothing()


def signal_broker(broker, sig):
    for pid in [broker.proc.pid, *list_descendants(broker.proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_no_event_is_marked_published_before_the_broker_confirms_it(make_system, rabbitmq):
    system = make_system()
    signal_broker(rabbitmq, signal.SIGSTOP)
    try:
        thread, answer = in_background(system.register)
        pending = wait_for(lambda: system.query("SELECT saga_id FROM OUTBOX"), 20,
                           "A's event to be committed")
        sid = pending[0][0]
        # The relay has sent it and waits for the frozen broker's confirm: a negative
        # can only be watched for a while, not polled for.
        watch_until = time.monotonic() + 3
        while time.monotonic() < watch_until:
            assert system.query("SELECT COUNT(*) FROM OUTBOX WHERE published_at IS NOT NULL"
                                ) == [(0,)]
            time.sleep(0.1)
    finally:
        signal_broker(rabbitmq, signal.SIGCONT)
    join(thread, 90)
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert system.status(sid) == "COMPLETED"
    assert system.query("SELECT COUNT(*) FROM OUTBOX WHERE published_at IS NULL") == [(0,)]


def test_a_broker_that_cannot_be_reached_is_named_in_the_warnings(make_system):
    port = free_port()
    system = make_system(RABBITMQ_URL=f"amqp://guest:guest@127.0.0.1:{port}/%2F")
    log_path = os.path.join(system.system.logdir, "service_a.log")

    def warnings():
        with open(log_path, encoding="utf-8") as f:
            return [line for line in f if "relay-A:" in line and "retrying" in line]

    found = wait_for(warnings, 30, "the relay to say it cannot reach the broker")
    assert all(f"not reachable at 127.0.0.1:{port}" in line for line in found), found


def test_an_event_no_queue_takes_does_not_jam_the_relay(live_system):
    # An event nobody is bound to, committed ahead of a registration's events.
    live_system.query("INSERT INTO OUTBOX (service, saga_id, event, payload) "
                      "VALUES ('A', 'nobody', 'registration.nobody.listens', '{}')")
    resp = live_system.register()
    assert resp.status_code == 200 and resp.json()["status"] == "COMPLETED", resp.text
    wait_for(lambda: live_system.query("SELECT COUNT(*) FROM OUTBOX WHERE published_at IS NULL")
             == [(0,)], 10, "every outbox row to be let go")
