"""Rules 2 and 3 at the services: every call is idempotent by (saga, operation) and a
compensation is final, decided by the database's ledger key, not by Python. And
idempotent starts: a client that retries with its Idempotency-Key never starts twice."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import SEED_INPUT


def invoke_a(live_system, saga_id, username="bob"):
    return live_system.post_service("A", "/invoke", {"saga_id": saga_id, "username": username})


def compensate(live_system, service, saga_id):
    return live_system.post_service(service, "/compensate", {"saga_id": saga_id})


def test_invoke_twice_makes_one_row_and_answers_the_same(live_system):
    first, second = invoke_a(live_system, "s-1"), invoke_a(live_system, "s-1")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert live_system.row_counts("s-1")["TABLE_A"] == 1


def test_repeated_invoke_with_other_fields_is_a_conflict_naming_them(live_system):
    invoke_a(live_system, "s-x", "bob")
    other = invoke_a(live_system, "s-x", "alice")
    assert other.status_code == 409, other.text
    assert other.json()["field"] == "username" and "differ" in other.json()["error"]
    assert live_system.query("SELECT username FROM TABLE_A WHERE saga_id = 's-x'") == [("bob",)]


def test_concurrent_invokes_make_one_row_and_answer_the_same(live_system):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: invoke_a(live_system, "s-2"), range(8)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["user_id"] for a in answers}) == 1
    assert live_system.row_counts("s-2")["TABLE_A"] == 1


def test_compensate_undoes_an_invoke_and_answers_a_repeat_the_same(live_system):
    invoke_a(live_system, "s-3")
    first, second = compensate(live_system, "A", "s-3"), compensate(live_system, "A", "s-3")
    assert (first.status_code, first.json()["removed"]) == (200, 1)
    assert second.status_code == 200 and second.json() == first.json()
    assert live_system.row_counts("s-3")["TABLE_A"] == 0


def test_compensate_for_a_step_that_never_ran_succeeds_and_is_recorded(live_system):
    resp = compensate(live_system, "B", "never-ran")
    assert resp.status_code == 200 and resp.json()["removed"] == 0
    assert live_system.query("SELECT service, op, state FROM STEP_LEDGER "
                             "WHERE saga_id = 'never-ran'") == [("B", "address", "compensated")]


def test_late_invoke_after_compensation_leaves_no_row(live_system):
    compensate(live_system, "A", "s-late")
    late = invoke_a(live_system, "s-late")
    assert late.status_code == 409
    assert "compensated" in late.json()["error"]
    assert live_system.row_counts("s-late")["TABLE_A"] == 0


def test_racing_invoke_and_compensate_always_end_with_no_row(live_system):
    ids = [f"race-{uuid.uuid4().hex[:8]}" for _ in range(40)]

    def race(saga_id):
        with ThreadPoolExecutor(2) as pool:
            inv = pool.submit(invoke_a, live_system, saga_id)
            comp = pool.submit(compensate, live_system, "A", saga_id)
            return inv.result().status_code, comp.result().status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(race, ids))
    # Whichever commits first, the compensation wins: the invoke's row is deleted,
    # or the invoke finds the tombstone and writes nothing.
    assert all(comp == 200 and inv in (200, 409) for inv, comp in results), results
    assert live_system.query("SELECT COUNT(*) FROM TABLE_A")[0][0] == 0
    assert live_system.query("SELECT COUNT(*) FROM STEP_LEDGER "
                             "WHERE state = 'compensated'")[0][0] == 40


def test_two_starts_without_a_key_are_two_sagas(live_system):
    one, two = live_system.start(), live_system.start()
    assert one.json()["saga"] != two.json()["saga"]
    assert live_system.query("SELECT COUNT(*) FROM TABLE_A")[0][0] == 2


# --- idempotent starts ---------------------------------------------------------------


def key_header(key=None):
    return {"Idempotency-Key": key or f"k-{uuid.uuid4()}"}


@pytest.mark.parametrize("path", ["/start", "/sagas/start"])
def test_repeat_with_the_same_key_answers_about_the_first_saga_and_creates_nothing(
        live_system, path):
    headers = key_header()
    first = live_system.post(path, json=SEED_INPUT, headers=headers)
    again = live_system.post(path, json=SEED_INPUT, headers=headers)
    assert first.status_code == again.status_code == 200, again.text
    assert again.json()["saga"] == first.json()["saga"] and again.json()["repeated"] is True
    assert again.json()["status"] == "COMPLETED"
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 1
    assert live_system.row_counts() == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


def test_repeat_of_a_start_an_operator_compensated_answers_409(live_system):
    headers = key_header()
    first = live_system.post("/start", json=SEED_INPUT, headers=headers)
    undone = live_system.post(f"/sagas/{first.json()['saga']}/compensate")
    assert undone.status_code == 200 and undone.json()["status"] == "COMPENSATED"
    again = live_system.post("/start", json=SEED_INPUT, headers=headers)
    assert again.status_code == 409, again.text
    assert again.json()["status"] == "COMPENSATED" and again.json()["repeated"] is True


def test_same_key_with_another_body_is_422_and_creates_nothing(live_system):
    headers = key_header()
    first = live_system.start(headers=headers)
    other = live_system.start({**SEED_INPUT, "username": "someone_else"}, headers=headers)
    assert other.status_code == 422, other.text
    assert other.json()["field"] == "Idempotency-Key"
    assert first.json()["saga"] in other.json()["error"]
    transfer = live_system.transfer({"amount": 1}, headers=headers)
    assert transfer.status_code == 422
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 1


def test_client_that_got_no_answer_retries_with_its_key_and_registers_once(live_system):
    live_system.set_fault("B", mode="slow", seconds=1.5, next=1)
    headers = key_header()
    with pytest.raises(requests.Timeout):
        requests.post(live_system.url + "/start", json=SEED_INPUT, headers=headers, timeout=0.5)
    retried = live_system.start(headers=headers)
    assert retried.status_code == 200, retried.text
    assert retried.json()["repeated"] is True and retried.json()["status"] == "COMPLETED"
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 1
    assert live_system.row_counts() == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


def test_client_that_got_a_503_retries_with_its_key_and_registers_once(live_system):
    headers = key_header()
    live_system.server.stop()
    try:
        down = live_system.start(headers=headers)
        assert down.status_code == 503, down.text
    finally:
        live_system.server.start()
    retried = live_system.start(headers=headers)
    assert retried.status_code == 200, retried.text
    again = live_system.start(headers=headers)
    assert again.json()["saga"] == retried.json()["saga"]
    assert live_system.row_counts() == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


def test_concurrent_requests_with_one_key_make_one_saga(live_system):
    headers = key_header()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: live_system.start(headers=headers), range(8)))
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers]
    assert len({a.json()["saga"] for a in answers}) == 1
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 1


@pytest.mark.parametrize("key", ["has space", "x" * 256, "caf\u00e9", ""])
def test_malformed_idempotency_key_is_400_and_writes_nothing(live_system, key):
    resp = requests.post(live_system.url + "/start", json=SEED_INPUT, timeout=10,
                         headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1")})
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == "Idempotency-Key"
    assert live_system.query("SELECT COUNT(*) FROM SAGA")[0][0] == 0
