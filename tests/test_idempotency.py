"""Rules 2 and 3 at the services: every call is idempotent by saga id, and a
compensation is final, decided by the database's ledger key, not by Python."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import requests


def invoke_a(saga, saga_id, username="bob"):
    return requests.post(saga.service("A") + "/invoke", timeout=10,
                         json={"saga_id": saga_id, "username": username})


def compensate(saga, service, saga_id):
    return requests.post(saga.service(service) + "/compensate", timeout=10,
                         json={"saga_id": saga_id})


def test_invoke_twice_makes_one_row_and_answers_the_same(saga):
    first, second = invoke_a(saga, "s-1"), invoke_a(saga, "s-1")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert saga.row_counts("s-1")["TABLE_A"] == 1


def test_concurrent_invokes_make_one_row_and_answer_the_same(saga):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: invoke_a(saga, "s-2"), range(8)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["user_id"] for a in answers}) == 1
    assert saga.row_counts("s-2")["TABLE_A"] == 1


def test_compensate_undoes_an_invoke_and_is_idempotent(saga):
    invoke_a(saga, "s-3")
    first, second = compensate(saga, "A", "s-3"), compensate(saga, "A", "s-3")
    assert (first.status_code, first.json()["removed"]) == (200, 1)
    assert (second.status_code, second.json()["removed"]) == (200, 0)
    assert saga.row_counts("s-3")["TABLE_A"] == 0


def test_compensate_for_a_step_that_never_ran_succeeds_and_is_recorded(saga):
    resp = compensate(saga, "B", "never-ran")
    assert resp.status_code == 200 and resp.json()["removed"] == 0
    assert saga.query("SELECT service, state FROM STEP_LEDGER WHERE saga_id = 'never-ran'") == [
        ("B", "compensated")]


def test_late_invoke_after_compensation_leaves_no_row(saga):
    compensate(saga, "A", "s-late")
    late = invoke_a(saga, "s-late")
    assert late.status_code == 409
    assert "compensated" in late.json()["error"]
    assert saga.row_counts("s-late")["TABLE_A"] == 0


def test_racing_invoke_and_compensate_always_end_with_no_row(saga):
    ids = [f"race-{uuid.uuid4().hex[:8]}" for _ in range(40)]

    def race(saga_id):
        with ThreadPoolExecutor(2) as pool:
            inv = pool.submit(invoke_a, saga, saga_id)
            comp = pool.submit(compensate, saga, "A", saga_id)
            return inv.result().status_code, comp.result().status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(race, ids))
    # Whichever commits first, the compensation wins: the invoke's row is deleted,
    # or the invoke finds the tombstone and writes nothing.
    assert all(comp == 200 and inv in (200, 409) for inv, comp in results), results
    assert saga.query("SELECT COUNT(*) FROM TABLE_A")[0][0] == 0
    assert saga.query("SELECT COUNT(*) FROM STEP_LEDGER WHERE state = 'compensated'")[0][0] == 40


def test_repeated_saga_id_at_the_orchestrator_cannot_happen_twice(saga):
    # Two /start calls with the same input are two sagas: ids are minted server-side.
    one, two = saga.start(), saga.start()
    assert one.json()["saga"] != two.json()["saga"]
    assert saga.query("SELECT COUNT(*) FROM TABLE_A")[0][0] == 2
