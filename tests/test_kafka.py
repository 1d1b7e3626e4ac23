"""Seed 002 over Kafka (SAGA_TRANSPORT=kafka): the orchestrator sends each step's command
to the topic of the service that owns it and reads the answers on a reply topic, under
the same engine and rules as HTTP. The database is the source of truth: a broker that
restarts empty (this one keeps messages in memory only) costs retries, never a saga."""

import pytest

from conftest import SEED_INPUT, expected_calls, in_background, join
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
    system.wait_serving("B")
    system.system.kill("service_b2")
    for thread, answer in clients:
        join(thread, 90)
        assert answer["resp"].status_code == 200, answer["resp"].text
    system.assert_all_or_nothing()
