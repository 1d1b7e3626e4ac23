"""Failure at A, at B, at C: retry what may succeed, never retry a refusal, then undo in
reverse order every step that may have written something (the failed one too when its
outcome is unknown), leaving no row behind."""

import os

import pytest

from conftest import ROOT, expected_calls, in_background, join
from launcher import wait_for

STEPS = "ABC"


@pytest.mark.parametrize("failed", STEPS)
def test_5xx_is_retried_to_the_limit_then_undone_in_reverse_including_the_failed_step(
        live_system, failed):
    live_system.set_fault(failed, mode="fail")
    resp = live_system.start()
    assert resp.status_code == 502, resp.text
    body = resp.json()
    assert body["status"] == "COMPENSATED" and body["failed_step"] == failed
    # A 500 may come after a commit, so the failed step is compensated too.
    assert live_system.calls(body["saga"]) == expected_calls(failed, 3, "failed", True)
    assert live_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


@pytest.mark.parametrize("failed", STEPS)
def test_refusal_is_not_retried_and_only_the_steps_before_it_are_undone(live_system, failed):
    live_system.set_fault(failed, mode="reject")
    resp = live_system.start()
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["status"] == "COMPENSATED" and body["failed_step"] == failed
    assert "rejected" in body["reason"]
    # A refusal is recorded by the service and wrote nothing: as in seed 001, failure at
    # B undoes A only, and failure at A needs no compensation at all.
    assert live_system.calls(body["saga"]) == expected_calls(failed, 1, "rejected", False)
    assert live_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


def test_refusal_is_recorded_so_a_repeat_is_refused_again(live_system):
    live_system.set_fault("B", mode="reject", next=1)
    sid = live_system.start().json()["saga"]
    assert live_system.query("SELECT state FROM STEP_LEDGER WHERE saga_id = %s AND service = 'B'",
                             (sid,)) == [("refused",)]
    again = live_system.post_service("B", "/invoke", {"saga_id": sid, "user_id": 1,
                                                      "address": "123 Main St"})
    assert again.status_code == 422 and "rejected" in again.json()["error"]
    assert live_system.row_counts(sid)["TABLE_B"] == 0


@pytest.mark.parametrize("failed", STEPS)
def test_timeout_is_retried_then_undone_and_late_commits_leave_no_row(live_system, failed):
    # Each hung call sleeps past the read timeout and commits only after the saga was
    # compensated (three 1 s timeouts, then the undo): the ledger's tombstone must turn
    # every one of those late commits away.
    live_system.set_fault(failed, mode="hang", seconds=4)
    resp = live_system.start()
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    assert live_system.calls(sid) == expected_calls(failed, 3, "failed", True)
    messages = live_system.query("SELECT message FROM SAGA_LOG WHERE saga_id = %s AND "
                                 "service = %s AND action = 'invoke'", (sid, failed))
    assert all(m.startswith("read timeout after 1 s") for (m,) in messages), messages
    live_system.wait_idle(failed)
    assert live_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    assert live_system.status(sid) == "COMPENSATED"


def test_timed_out_call_that_committed_late_is_found_by_a_retry(live_system):
    # B's first attempt commits after its caller gave up; the next attempt is answered
    # from B's ledger before the injected stall, so the saga completes with one row.
    live_system.set_fault("B", mode="hang", seconds=1.5)
    resp = live_system.start()
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    b_calls = [(c[2], c[3]) for c in live_system.calls(sid) if c[0] == "B"]
    assert b_calls[0] == (1, "failed") and b_calls[-1][1] == "success"
    live_system.wait_idle("B")
    assert live_system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


@pytest.mark.parametrize("failed", STEPS)
def test_service_down_is_retried_then_undone_without_waiting_for_it(live_system, failed):
    # Every attempt was refused at the TCP level: the request never reached the dead
    # service, so it wrote nothing and needs no compensation. The saga undoes the steps
    # before it and ends at once, without waiting for the service to come back.
    live_system.system.kill(f"service_{failed.lower()}")
    resp = live_system.start()
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    assert resp.json()["status"] == "COMPENSATED", live_system.query(
        "SELECT service, action, attempt, status, message FROM SAGA_LOG WHERE saga_id = %s "
        "ORDER BY id", (sid,))
    assert live_system.calls(sid) == expected_calls(failed, 3, "failed", False)
    messages = live_system.query("SELECT message FROM SAGA_LOG WHERE saga_id = %s AND "
                                 "service = %s AND action = 'invoke'", (sid, failed))
    assert all(m.startswith("connection refused") for (m,) in messages), messages
    assert live_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


def test_a_step_that_may_have_been_reached_once_is_undone_even_if_later_attempts_were_refused(
        live_system):
    # B's first attempt times out (it may commit late); then B goes down and the last
    # attempt is refused. The saga must still compensate B once it is back: the first
    # attempt may have written.
    live_system.set_fault("B", mode="hang", seconds=5)
    thread, answer = in_background(live_system.start)
    wait_for(lambda: live_system.query("SELECT 1 FROM SAGA_LOG WHERE service = 'B' AND "
                                       "status = 'failed'"), 10, "B's first attempt to time out")
    live_system.system.kill("service_b")
    sid = live_system.query("SELECT id FROM SAGA")[0][0]
    wait_for(lambda: live_system.status(sid) == "COMPENSATING", 20, "the saga to compensate")
    live_system.system.start("service_b")
    join(thread)
    assert answer["resp"].json()["status"] == "COMPENSATED"
    comps = [c[0] for c in live_system.calls(sid) if c[1] == "compensate" and c[3] == "success"]
    assert comps == ["B", "A"]
    assert live_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


@pytest.mark.parametrize("mode", ["crash", "drop"])
def test_lost_answer_after_commit_is_recovered_by_retry_with_one_row(live_system, mode):
    live_system.set_fault("B", mode=mode, next=1)
    resp = live_system.start()
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    b_calls = [c for c in live_system.calls(sid) if c[0] == "B"]
    assert b_calls == [("B", "invoke", 1, "failed"), ("B", "invoke", 2, "success")]
    assert live_system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


@pytest.mark.parametrize("mode", ["crash", "drop"])
def test_commit_whose_answer_was_lost_is_undone_when_retries_run_out(make_system, mode):
    system = make_system(SAGA_MAX_ATTEMPTS="1")
    system.set_fault("B", mode=mode)
    resp = system.start()
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    assert system.calls(sid) == expected_calls("B", 1, "failed", True)
    assert system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    assert system.query("SELECT message FROM SAGA_LOG WHERE saga_id = %s AND service = 'B' "
                        "AND action = 'compensate'", (sid,)) == [("compensated (rows removed: 1)",)]


def test_failing_compensation_is_retried_then_saga_is_failed(make_system):
    system = make_system(SAGA_COMPENSATE_FOR="1")
    system.set_fault("C", mode="reject")
    system.set_fault("A", mode="fail", on="compensate")
    resp = system.start()
    assert resp.status_code == 502, resp.text
    body = resp.json()
    assert body["status"] == "FAILED"
    sid = body["saga"]
    a_comp = [c for c in system.calls(sid) if c[0] == "A" and c[1] == "compensate"]
    assert len(a_comp) >= 2 and all(c[3] == "failed" for c in a_comp)
    assert [a for _, _, a, _ in a_comp] == list(range(1, len(a_comp) + 1))
    assert system.log(sid)[-1] == ("SAGA", None, None, "FAILED")
    assert system.status(sid) == "FAILED"
    # Never silently dropped: B is undone, A's row waits for an operator.
    assert system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 0, "TABLE_C": 0}


def test_failed_saga_can_be_retried_by_an_operator(make_system):
    system = make_system(SAGA_COMPENSATE_FOR="0.5")
    system.set_fault("B", mode="reject")
    system.set_fault("A", mode="fail", on="compensate")
    sid = system.start().json()["saga"]
    assert system.status(sid) == "FAILED"
    system.set_fault("A", mode="off")
    resp = system.post(f"/sagas/{sid}/retry")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "COMPENSATED"
    assert system.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


def test_a_step_carries_its_own_attempts_and_timeout(make_system):
    system = make_system(
        SAGA_TYPE_MODULES="sagas.registration,sagas.transfer,sagas.order,policy_sagas",
        PYTHONPATH=os.path.join(ROOT, "tests", "fixtures"), SAGA_READ_TIMEOUT="10")
    step, = [t for t in system.get("/saga-types").json()["saga_types"]
             if t["name"] == "policy"][0]["steps"]
    assert (step["attempts"], step["timeout"]) == (2, 0.5)
    system.set_fault("B", mode="hang", seconds=3)
    resp = system.post("/sagas/start", json={"saga_type": "policy", "text": "hello"})
    assert resp.status_code == 502, resp.text
    calls = system.query("SELECT action, attempt, message FROM SAGA_LOG WHERE saga_id = %s "
                         "AND service = 'B' ORDER BY id", (resp.json()["saga"],))
    assert [(a, n) for a, n, _ in calls] == [("invoke", 1), ("invoke", 2), ("compensate", 1)]
    assert all("read timeout after 0.5 s" in m for a, _, m in calls if a == "invoke")
    system.wait_idle("B")
