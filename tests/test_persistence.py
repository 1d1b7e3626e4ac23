"""Rule 1: the orchestrator records what it is about to do before each call, so its
state alone is enough to resume."""

import threading

from launcher import wait_for


def test_intent_is_persisted_before_the_call_is_made(saga):
    saga.set_fault("B", mode="hang", seconds=30, next=1)
    client = threading.Thread(target=saga.start)
    client.start()
    # While B's first call hangs, the SAGA row already says: step B, attempt 1, with
    # A's result saved; and A's call is in SAGA_LOG.
    row = wait_for(lambda: [r for r in saga.query(
        "SELECT status, step, attempt, results FROM SAGA") if r[1] == 1], 10, "step B to begin")
    status, step, attempt, results = row[0]
    assert (status, step, attempt) == ("RUNNING", 1, 1)
    assert '"user_id"' in results and '"A"' in results
    sid = saga.query("SELECT id FROM SAGA")[0][0]
    assert saga.calls(sid) == [("A", "invoke", 1, "success")]
    client.join(30)
    assert saga.saga_row(sid)[0] == "COMPLETED"


def test_retry_attempt_is_persisted_before_it_is_made(saga):
    saga.set_fault("A", mode="fail", next=1)
    saga.set_fault("B", mode="hang", seconds=30, next=1)
    sid = None
    client = threading.Thread(target=saga.start)
    client.start()
    row = wait_for(lambda: saga.query("SELECT id, step, attempt FROM SAGA WHERE step = 1"),
                   10, "step B to begin")
    sid = row[0][0]
    assert saga.calls(sid) == [("A", "invoke", 1, "failed"), ("A", "invoke", 2, "success")]
    client.join(30)


def test_saga_row_records_the_lease_of_the_orchestrator_driving_it(saga):
    saga.set_fault("A", mode="hang", seconds=30, next=1)
    client = threading.Thread(target=saga.start)
    client.start()
    rows = wait_for(lambda: saga.query("SELECT lease_owner, lease_until > NOW(3) FROM SAGA"),
                    10, "the saga row")
    owner, live = rows[0]
    assert owner == saga.get("/health").json()["owner"] and live == 1
    client.join(30)
