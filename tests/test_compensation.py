"""Failure at A, at B, at C: retry what may succeed, never retry a rejection, then undo
in reverse order including the failed step, leaving no row behind."""

import threading

import pytest

from launcher import wait_for

STEPS = "ABC"


def expected_calls(failed, attempts, status):
    """The calls SAGA_LOG must show when step `failed` fails `attempts` times."""
    done = STEPS[:STEPS.index(failed)]
    return ([(s, "invoke", 1, "success") for s in done]
            + [(failed, "invoke", n, status) for n in range(1, attempts + 1)]
            + [(s, "compensate", 1, "success") for s in reversed(done + failed)])


@pytest.mark.parametrize("failed", STEPS)
def test_5xx_is_retried_to_the_limit_then_undone_in_reverse(saga, failed):
    saga.set_fault(failed, mode="fail")
    resp = saga.start()
    assert resp.status_code == 502, resp.text
    body = resp.json()
    assert body["status"] == "COMPENSATED" and body["failed_step"] == failed
    assert saga.calls(body["saga"]) == expected_calls(failed, 3, "failed")
    assert saga.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


@pytest.mark.parametrize("failed", STEPS)
def test_business_rejection_is_not_retried_and_is_undone(saga, failed):
    saga.set_fault(failed, mode="reject")
    resp = saga.start()
    assert resp.status_code == 409, resp.text
    body = resp.json()
    assert body["status"] == "COMPENSATED" and body["failed_step"] == failed
    assert "rejected" in body["reason"]
    assert saga.calls(body["saga"]) == expected_calls(failed, 1, "rejected")
    assert saga.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


@pytest.mark.parametrize("failed", STEPS)
def test_timeout_is_retried_then_undone_and_late_commits_leave_no_row(saga, failed):
    # Each hung call sleeps past the read timeout and then commits, after the saga
    # was compensated: the ledger must turn every one of those late commits away.
    saga.set_fault(failed, mode="hang", seconds=1.5)
    resp = saga.start()
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    assert saga.calls(sid) == expected_calls(failed, 3, "failed")
    assert all("timeout" in m for (m,) in saga.query(
        "SELECT message FROM SAGA_LOG WHERE saga_id = %s AND service = %s AND action = 'invoke'",
        (sid, failed)))
    saga.wait_idle(failed)
    assert saga.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    assert saga.saga_row(sid)[0] == "COMPENSATED"


@pytest.mark.parametrize("failed", STEPS)
def test_service_down_is_retried_then_undone_once_it_is_back(saga, failed):
    name = f"service_{failed.lower()}"
    saga.system.kill(name)
    answer = {}
    client = threading.Thread(target=lambda: answer.update(resp=saga.start()))
    client.start()
    # The saga compensates the steps before the dead one, and keeps retrying the dead
    # one's compensation (its outcome is unknown) until the service is back.
    wait_for(lambda: saga.query("SELECT COUNT(*) FROM SAGA WHERE status = 'COMPENSATING'")[0][0],
             20, "the saga to start compensating")
    saga.system.start(name)
    client.join(30)
    resp = answer["resp"]
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    assert resp.json()["status"] == "COMPENSATED"
    invokes = [c for c in saga.calls(sid) if c[0] == failed and c[1] == "invoke"]
    assert [(a, s) for _, _, a, s in invokes] == [(1, "failed"), (2, "failed"), (3, "failed")]
    compensations = [c[0] for c in saga.calls(sid) if c[1] == "compensate" and c[3] == "success"]
    assert compensations == list(reversed(STEPS[:STEPS.index(failed) + 1]))
    assert saga.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


@pytest.mark.parametrize("mode", ["crash", "drop"])
def test_lost_answer_after_commit_is_recovered_by_retry_with_one_row(saga, mode):
    saga.set_fault("B", mode=mode, next=1)
    resp = saga.start()
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    b_calls = [c for c in saga.calls(sid) if c[0] == "B"]
    assert b_calls == [("B", "invoke", 1, "failed"), ("B", "invoke", 2, "success")]
    assert saga.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


@pytest.mark.parametrize("mode", ["crash", "drop"])
def test_commit_whose_answer_was_lost_is_undone_when_retries_run_out(make_system, mode):
    system = make_system(SAGA_MAX_ATTEMPTS="1")
    system.set_fault("B", mode=mode)
    resp = system.start()
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    assert system.calls(sid) == expected_calls("B", 1, "failed")
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
    assert system.saga_row(sid)[0] == "FAILED"
    # Never silently dropped: B and C are undone, A's row waits for an operator.
    assert system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 0, "TABLE_C": 0}


def test_failed_saga_can_be_retried_by_an_operator(make_system):
    system = make_system(SAGA_COMPENSATE_FOR="0.5")
    system.set_fault("B", mode="reject")
    system.set_fault("A", mode="fail", on="compensate")
    sid = system.start().json()["saga"]
    assert system.saga_row(sid)[0] == "FAILED"
    system.set_fault("A", mode="off")
    resp = system.post(f"/sagas/{sid}/retry")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "COMPENSATED"
    assert system.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
