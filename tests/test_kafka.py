"""Seed 002 over Kafka (SAGA_TRANSPORT=kafka): the orchestrator sends each step's command
to the topic of the service that owns it and reads the answers on a reply topic, under
the same engine and rules as HTTP. The database is the source of truth: a broker that
restarts empty (this one keeps messages in memory only) costs retries, never a saga."""

import json
import random
import threading
import time
import uuid
from collections import Counter

import pytest
import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from conftest import SEED_INPUT, expected_calls, in_background, join
from saga.kafka_io import COMMAND_PARTITIONS
from launcher import wait_for

STEPS = "ABC"


def test_registration_over_kafka_completes(kafka_system):
    resp = kafka_system.start()
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    assert kafka_system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    item = kafka_system.get(f"/sagas/{sid}").json()
    assert (item["transport"], item["mode"], item["input"]) == ("kafka", "orchestration",
                                                                 SEED_INPUT)
    messages = [r["message"] for r in item["log"] if r["service"] != "SAGA"]
    assert all("via kafka" in m for m in messages), messages


def test_transfer_over_kafka_moves_the_money(kafka_system):
    resp = kafka_system.transfer({"from": "B", "to": "C", "amount": "20.00"})
    assert resp.status_code == 200, resp.text
    assert kafka_system.balances() == {"A": 1000, "B": 480, "C": 270}
    refused = kafka_system.transfer({"from": "C", "to": "A", "amount": "5000"})
    assert refused.status_code == 409 and "insufficient funds" in refused.json()["reason"]
    kafka_system.assert_money_conserved()


@pytest.mark.parametrize("failed", STEPS)
def test_failing_step_over_kafka_is_retried_then_undone(kafka_system, failed):
    kafka_system.set_fault(failed, mode="fail")
    resp = kafka_system.start()
    assert resp.status_code == 502, resp.text
    assert kafka_system.calls(resp.json()["saga"]) == expected_calls(failed, 3, "failed", True)
    assert kafka_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


@pytest.mark.parametrize("failed", STEPS)
def test_refusal_over_kafka_undoes_the_steps_before_it(kafka_system, failed):
    kafka_system.set_fault(failed, mode="reject")
    resp = kafka_system.start()
    assert resp.status_code == 409, resp.text
    assert kafka_system.calls(resp.json()["saga"]) == expected_calls(failed, 1, "rejected", False)


@pytest.mark.parametrize("failed", STEPS)
def test_hung_service_over_kafka_is_a_timeout_and_its_late_commit_leaves_no_row(
        kafka_system, failed):
    kafka_system.set_fault(failed, mode="hang", seconds=8)
    resp = kafka_system.start()
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    messages = kafka_system.query("SELECT message FROM SAGA_LOG WHERE saga_id = %s AND "
                                  "service = %s AND action = 'invoke'", (sid, failed))
    assert all(m.startswith("no reply within 2 s") for (m,) in messages), messages
    kafka_system.wait_idle(failed)
    # The hung commands were consumed one after the other; wait until the last is done.
    wait_for(lambda: kafka_system.in_flight(failed) == 0 and not kafka_system.query(
        "SELECT 1 FROM STEP_LEDGER WHERE saga_id = %s AND service = %s AND state = 'invoked'",
        (sid, failed)), 30, "late commands to be turned away")
    assert kafka_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


@pytest.mark.parametrize("mode", ["crash", "drop", "slow"])
@pytest.mark.parametrize("service", STEPS)
def test_lost_or_slow_answer_over_kafka_is_recovered_with_one_row(kafka_system, service, mode):
    # crash: the service dies after its commit, before replying and before committing the
    # command's offset (kill -9 between consuming and answering); drop: it commits and
    # never replies. Either way the orchestrator's retry is answered from the ledger.
    kafka_system.set_fault(service, mode=mode, next=1, seconds=0.3)
    resp = kafka_system.start()
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    assert kafka_system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    assert [c for c in kafka_system.calls(sid) if c[0] == service][-1][3] == "success"


def test_broker_killed_and_restarted_mid_run_loses_no_saga(make_system, kafka):
    system = make_system(SAGA_TRANSPORT="kafka", KAFKA_BOOTSTRAP=kafka.bootstrap,
                         SAGA_MAX_ATTEMPTS="20", SAGA_BACKOFF_MAX="1")
    system.wait_kafka_ready()
    system.set_fault("B", mode="slow", seconds=1, next=4)
    clients = [in_background(system.start) for _ in range(4)]
    system.wait_serving("B")
    kafka.kill()
    kafka.start()
    for thread, _ in clients:
        join(thread, 90)
    system.wait_quiet(timeout=90)
    assert system.query("SELECT COUNT(*) FROM SAGA WHERE status = 'COMPLETED'")[0][0] == 4
    system.assert_all_or_nothing()


def test_two_instances_of_a_service_share_its_commands_and_survive_one_killed(make_system,
                                                                            kafka):
    system = make_system(SAGA_TRANSPORT="kafka", KAFKA_BOOTSTRAP=kafka.bootstrap,
                         SAGA_MAX_ATTEMPTS="20", SAGA_BACKOFF_MAX="1",
                         second_instances=("B",))
    system.wait_kafka_ready()
    for _ in range(12):
        assert system.start().status_code == 200
    handlers = {m.split("via kafka (")[1].rstrip(")") for (m,) in system.query(
        "SELECT message FROM SAGA_LOG WHERE service = 'B' AND status = 'success'")}
    assert len(handlers) == 2, handlers   # both B processes took commands
    system.set_fault("B", mode="slow", seconds=0.5)
    clients = [in_background(system.start) for _ in range(6)]

    def b_serving():
        # Which instance takes a command depends on its saga's partition: all six may
        # have gone to B2, so more sagas until one is at B (the slow one).
        if system.in_flight("B"):
            return True
        clients.append(in_background(system.start))
        return False
    wait_for(b_serving, 30, "service B to be serving a call", interval=0.2)
    system.system.kill("service_b2")
    for thread, answer in clients:
        join(thread, 90)
        assert answer["resp"].status_code == 200, answer["resp"].text
    system.assert_all_or_nothing()


class Load:
    """Clients sending transfers and registrations in a loop until stopped (seeded, so
    a failing round sends the same requests again); counts the sagas that completed."""

    def __init__(self, system, clients=4, seed=0):
        self.system, self.stopping = system, threading.Event()
        self.completed, self.errors = 0, []
        self.threads = [threading.Thread(target=self.client, daemon=True,
                                         args=(random.Random(seed * 100 + k),))
                        for k in range(clients)]
        for thread in self.threads:
            thread.start()

    def client(self, rng):
        while not self.stopping.is_set():
            try:
                if rng.random() < 0.5:
                    src, dst = rng.sample("ABC", 2)
                    resp = self.system.transfer({"from": src, "to": dst,
                                                 "amount": f"{rng.randint(1, 2000) / 100:.2f}"})
                else:
                    resp = self.system.start()
                self.completed += resp.status_code == 200
            except requests.RequestException as exc:
                self.errors.append(exc)

    def wait_completed(self, more, what):
        target = self.completed + more
        wait_for(lambda: self.completed >= target, 60, what)

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            join(thread, 90)


def test_broker_crash_then_unlucky_service_restarts_heal_with_every_process_running(
        make_system, kafka):
    # Issue 18, item 6: kill -9 the broker under load and start it again (empty: its
    # topics are created anew, with new ids), then in the next seconds kill -9 and restart
    # service processes, racing the topics' re-creation. Every process that lived through
    # it must take its commands again by itself: every saga ends (a transfer's credit is
    # retried without limit, so one partition nobody reads keeps it RUNNING), the money
    # is all there, every saga is all-or-nothing, and every live process holds command
    # partitions. The scenario runs several times in a row, with another delay between
    # the broker's return and the kills, and other victims, each time.
    system = make_system(SAGA_TRANSPORT="kafka", KAFKA_BOOTSTRAP=kafka.bootstrap,
                         SAGA_READ_TIMEOUT="2", SAGA_COMPENSATE_FOR="120",
                         SAGA_BACKOFF_MAX="1", second_instances=("B",))
    system.wait_kafka_ready()
    for round_, (delay, victims) in enumerate([(0.5, ("service_c", "service_b")),
                                               (2.0, ("service_b2", "service_c")),
                                               (4.0, ("service_b", "service_b2"))]):
        load = Load(system, seed=round_)
        load.wait_completed(8, "sagas to complete under load")
        kafka.kill()
        kafka.start()
        # The unlucky order: processes die while the others are still finding the new
        # topics. The delay is the scenario, not a wait for something.
        time.sleep(delay)
        for name in victims:
            system.system.kill(name)
        system.system.start(*victims)
        load.wait_completed(8, "sagas to complete again after the restarts")
        load.stop()
        assert not load.errors, load.errors[:3]
        system.wait_quiet(timeout=60)
        system.wait_kafka_ready(timeout=30)
        assert system.get("/sagas").status_code == 200
        assert system.query("SELECT COUNT(*) FROM SAGA WHERE status = 'FAILED'")[0][0] == 0
        system.assert_money_conserved()
        system.assert_all_or_nothing()


def kafka_health(system, service):
    return system.get_service(service, "/health")["kafka"]


def test_malformed_commands_are_parked_and_never_stop_a_consumer(kafka_system, kafka):
    # Issue 18, item 7: whatever lands on a command topic, the workers log it with its
    # topic, park it on the service's dead-letter topic with the reason, count it, and
    # go on to the next command. Each message goes to every partition, so every worker
    # of every service meets each one.
    marker = f"malformed-{uuid.uuid4().hex}".encode()
    valid = {"id": "m1", "action": "invoke", "fields": {"saga_id": "s-malformed"}}
    unreadable = [
        (b"not json", []),
        (b"\xff\xfe\x00", []),                                     # not UTF-8
        (b"[1, 2]", []),                                            # not an object
        (b'"a string"', []),
        (b"{}", []),                                                # nothing in it
        (json.dumps({"action": "invoke", "fields": {"saga_id": "s"}}).encode(), []),
        (json.dumps({**valid, "id": 7}).encode(), []),               # id not a string
        (json.dumps({"id": "m1", "fields": {"saga_id": "s"}}).encode(), []),
        (json.dumps({**valid, "action": "explode"}).encode(), []),
        (json.dumps({**valid, "action": ["invoke"]}).encode(), []),
        (json.dumps({"id": "m1", "action": "invoke"}).encode(), []),   # no fields
        (json.dumps({**valid, "fields": ["saga_id", "s"]}).encode(), []),
        (json.dumps({**valid, "fields": {}}).encode(), []),          # no saga_id
        (json.dumps({**valid, "fields": {"saga_id": 12}}).encode(), []),
        (json.dumps(valid).encode(), [("x-saga-attempt", b"zero")]),
        (json.dumps(valid).encode(), [("x-saga-attempt", b"-1")]),
    ]
    # Readable, but its handling may raise what nobody foresaw (an op that is a list
    # cannot even be looked up): parked or answered, it must not stop the worker.
    odd = [json.dumps({**valid, "fields": {"saga_id": "s-odd", "op": []}}).encode(),
           json.dumps({**valid, "action": "compensate",
                       "fields": {"saga_id": "s-odd", "op": {"x": 1}}}).encode()]
    before = {s: kafka_health(kafka_system, s)["dead_lettered"] for s in STEPS}
    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for service in STEPS:
        topic = kafka_health(kafka_system, service)["topic"]
        for partition in range(COMMAND_PARTITIONS):
            for value, headers in unreadable:
                producer.produce(topic, value, key=marker, partition=partition,
                                 headers=headers)
            for value in odd:
                producer.produce(topic, value, key=marker, partition=partition)
    assert producer.flush(10) == 0
    expected = len(unreadable) * COMMAND_PARTITIONS
    for service in STEPS:
        wait_for(lambda: kafka_health(kafka_system, service)["dead_lettered"]
                 >= before[service] + expected, 30, f"{service} to park the messages")
    # The workers took commands again: sagas of both kinds go through every service.
    resp = kafka_system.start()
    assert resp.status_code == 200, resp.text
    assert kafka_system.row_counts(resp.json()["saga"]) == {"TABLE_A": 1, "TABLE_B": 1,
                                                            "TABLE_C": 1}
    for src, dst in ("AB", "BC", "CA"):
        resp = kafka_system.transfer({"from": src, "to": dst, "amount": "1.50"})
        assert resp.status_code == 200, resp.text
    kafka_system.assert_money_conserved()
    for service in STEPS:
        health = kafka_health(kafka_system, service)
        assert health["partitions"] == list(range(COMMAND_PARTITIONS)), health
        parked = read_parked(kafka.bootstrap, health["dead_letter_topic"], marker, expected)
        assert all(h["x-saga-topic"] == health["topic"] for h in parked), parked[:3]
        kinds = ("not JSON", "not a JSON object", "id must be", "action must be",
                 "fields must be", "fields.saga_id must be", "x-saga-attempt header")
        reasons = Counter(next((k for k in kinds if h["x-saga-parked"].startswith(k)),
                               h["x-saga-parked"])
                          for h in parked if not h["x-saga-parked"].startswith("handler"))
        per_partition = {"not JSON": 2, "not a JSON object": 2, "id must be": 3,
                         "action must be": 3, "fields must be": 2, "fields.saga_id must be": 2,
                         "x-saga-attempt header": 2}
        assert reasons == {k: n * COMMAND_PARTITIONS for k, n in per_partition.items()}, reasons


def read_parked(bootstrap, topic, marker, expected):
    """The headers of the messages with our key on the dead-letter topic, read from its
    start until `expected` of them came (or a deadline passed)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex,
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    found = []
    try:
        def enough():   # the unreadable ones; those whose handling failed come on top
            message = consumer.poll(0.2)
            if message is not None and message.error() is None and message.key() == marker:
                found.append({k: v.decode() for k, v in message.headers() or []})
            return sum(not h["x-saga-parked"].startswith("handler") for h in found) >= expected
        wait_for(enough, 30, f"{expected} parked messages on {topic}", 0)
    finally:
        consumer.close()
    return found


def test_hang_then_compensation_over_kafka_undoes_the_late_commit(make_system, kafka):
    # Issue 18, item 7: C's first call hangs past every attempt (each attempt is a new
    # command, queued behind the hung one in the saga's partition), so the saga is
    # undone; C's compensation runs after the late commit and must remove its row. If a
    # reply to an earlier command were taken for the compensation's (one command id per
    # saga), the log would say "nothing to undo" and C's row would stay.
    system = make_system(SAGA_TRANSPORT="kafka", KAFKA_BOOTSTRAP=kafka.bootstrap,
                         SAGA_COMPENSATE_FOR="60")
    system.wait_kafka_ready()
    # Three attempts of SAGA_READ_TIMEOUT=1 s with short backoffs end well before 6 s.
    system.set_fault("C", mode="hang", next=1, seconds=6)
    resp = system.start()
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    invokes = system.query("SELECT status, message FROM SAGA_LOG WHERE saga_id = %s AND "
                           "service = 'C' AND action = 'invoke' ORDER BY id", (sid,))
    assert [s for s, _ in invokes] == ["failed"] * 3, invokes
    assert all(m.startswith("no reply within 1 s") for _, m in invokes), invokes
    undos = system.query("SELECT status, message FROM SAGA_LOG WHERE saga_id = %s AND "
                         "service = 'C' AND action = 'compensate' ORDER BY id", (sid,))
    assert undos[-1][0] == "success" and "rows removed: 1" in undos[-1][1], undos
    assert not any("nothing to undo" in m for _, m in undos), undos
    assert system.status(sid) == "COMPENSATED"
    system.wait_idle("C")
    assert system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    system.assert_all_or_nothing()


def test_the_order_saga_runs_over_kafka(kafka_system):
    body = {"saga_type": "order", "customer_id": 1, "product_id": 7, "quantity": 2,
            "total_price": "80.00"}
    resp = kafka_system.post("/sagas/start", json=body)
    assert resp.status_code == 200, resp.text
    assert kafka_system.get(f"/sagas/{resp.json()['saga']}").json()["transport"] == "kafka"
    refused = kafka_system.post("/sagas/start", json={**body, "customer_id": 3})
    assert refused.status_code == 409 and "insufficient" in refused.json()["reason"]
    assert kafka_system.get_service("B", "/customers")["customers"][0] == {
        "id": 1, "balance": "420.00"}
    kafka_system.assert_invariants()
