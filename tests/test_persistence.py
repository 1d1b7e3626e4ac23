"""Rule 1: the orchestrator records what it is about to do before each call, so its state
alone is enough to resume; what it learned from a call is saved whatever the database
does meanwhile; its lease stays put while it works; its retries back off."""

import random
import re
import threading


from conftest import in_background, join
from launcher import wait_for


def test_intent_is_persisted_before_the_call_is_made(live_system):
    live_system.set_fault("B", mode="slow", seconds=0.8, next=1)
    thread, answer = in_background(live_system.start)
    live_system.wait_serving("B")
    # While B's first call runs, the SAGA row already says: step B, attempt 1, with A's
    # result saved; and A's call is in SAGA_LOG.
    (sid, status, step, attempt, results), = live_system.query(
        "SELECT id, status, step, attempt, results FROM SAGA")
    assert (status, step, attempt) == ("RUNNING", 1, 1)
    assert '"user_id"' in results and '"A"' in results
    assert live_system.calls(sid) == [("A", "invoke", 1, "success")]
    join(thread)
    assert answer["resp"].json()["status"] == "COMPLETED"


def test_retry_attempt_is_persisted_before_it_is_made(make_system):
    # A fails once; its second attempt is parked for 1.5-3 s of backoff. During that
    # wait the SAGA row already names attempt 2, while A has seen one call only.
    system = make_system(SAGA_BACKOFF_BASE="3", SAGA_BACKOFF_MAX="3")
    system.set_fault("A", mode="fail", next=1)
    thread, answer = in_background(system.start)
    (sid, attempt, due), = wait_for(lambda: system.query(
        "SELECT id, attempt, next_attempt_at > UTC_TIMESTAMP(3) FROM SAGA WHERE attempt = 2"),
        10, "A's second attempt to be scheduled")
    assert due == 1, "the second attempt is scheduled for later, not made"
    assert system.calls(sid) == [("A", "invoke", 1, "failed")]
    assert system.get("/faults").json()["A"]["calls"] == 1
    join(thread)
    assert system.calls(sid)[1] == ("A", "invoke", 2, "success")


def test_saga_row_records_the_lease_of_the_orchestrator_driving_it(live_system):
    live_system.set_fault("A", mode="slow", seconds=0.8, next=1)
    thread, _ = in_background(live_system.start)
    live_system.wait_serving("A")
    (owner, live), = live_system.query(
        "SELECT lease_owner, lease_until > UTC_TIMESTAMP(3) FROM SAGA")
    assert owner == live_system.get("/health").json()["owner"] and live == 1
    join(thread)


def test_lease_is_renewed_through_a_call_longer_than_the_lease(make_system):
    # The lease is 1 s; B takes 3 s. A second orchestrator scans every 0.2 s: had the
    # first stopped renewing, it would have claimed the saga (a new fence, an 'unknown'
    # call and a second B call in the log).
    system = make_system(orchestrators=2, SAGA_READ_TIMEOUT="5")
    system.set_fault("B", mode="slow", seconds=3, next=1)
    resp = system.start()
    assert resp.status_code == 200, resp.text
    sid = resp.json()["saga"]
    assert system.saga_row(sid)[6] == 1, "the fence moved: another orchestrator took over"
    assert [c for c in system.calls(sid) if c[0] == "B"] == [("B", "invoke", 1, "success")]
    assert not system.query("SELECT 1 FROM SAGA_LOG WHERE status IN ('unknown', 'RESUMED')")


def test_retries_back_off_exponentially_with_jitter(make_system):
    system = make_system(SAGA_MAX_ATTEMPTS="5", SAGA_BACKOFF_BASE="0.1", SAGA_BACKOFF_MAX="10")
    system.set_fault("A", mode="fail")
    sid = system.start().json()["saga"]
    rows = system.query("SELECT attempt, message, created_at FROM SAGA_LOG WHERE saga_id = %s "
                        "AND service = 'A' AND action = 'invoke' ORDER BY id", (sid,))
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5]
    delays = [float(re.search(r"next attempt in ([0-9.]+) s", m).group(1)) for _, m, _ in rows[:4]]
    for n, delay in enumerate(delays, start=1):
        ceiling = 0.1 * 2 ** (n - 1)
        assert ceiling / 2 <= delay <= ceiling, (n, delays)
    # ... and each attempt really waited at least its announced delay.
    gaps = [(b[2] - a[2]).total_seconds() for a, b in zip(rows, rows[1:])]
    assert all(gap >= delay - 0.002 for gap, delay in zip(gaps, delays)), (gaps, delays)


def test_backoff_ceiling_doubles_and_is_capped():
    from saga.common import backoff_delay
    random.seed(7)
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        draws = [backoff_delay(0.1, 1.0, attempt) for _ in range(200)]
        assert ceiling / 2 <= min(draws) and max(draws) <= ceiling, attempt
        assert max(draws) - min(draws) > ceiling / 10, "jitter spreads the retries"


def blocked_save(system):
    """The processlist id of the orchestrator's UPDATE SAGA waiting on a row lock."""
    rows = system.server.root(
        "SELECT id FROM information_schema.PROCESSLIST WHERE user = 'saga' "
        "AND info LIKE 'UPDATE SAGA SET status%'")
    return rows and rows[0][0]


def test_a_committed_step_is_not_undone_when_saving_its_outcome_fails(make_system):
    # The scenario of a lost save: B commits, the orchestrator's save of that success is
    # blocked by a lock held elsewhere and its connection is killed. The orchestrator
    # must keep the outcome and save it again, not count the call as unknown and (with
    # one attempt allowed) undo a step that committed.
    system = make_system(SAGA_MAX_ATTEMPTS="1", SAGA_READ_TIMEOUT="5")
    system.set_fault("B", mode="slow", seconds=1.5, next=1)
    thread, answer = in_background(system.start)
    system.wait_serving("B")
    sid = system.query("SELECT id FROM SAGA")[0][0]
    locker = system.connect()
    try:
        cur = locker.cursor()
        cur.execute("SELECT id FROM SAGA WHERE id = %s FOR UPDATE", (sid,))
        cur.fetchall()
        victim = wait_for(lambda: blocked_save(system), 15, "the save to wait on the lock")
        system.server.root(f"KILL {victim}")
        wait_for(lambda: blocked_save(system), 15, "the save to be tried again")
    finally:
        locker.rollback()
        locker.close()
    join(thread)
    assert answer["resp"].status_code == 200, answer["resp"].text
    assert system.status(sid) == "COMPLETED"
    assert [c for c in system.calls(sid) if c[0] == "B"] == [("B", "invoke", 1, "success")]
    assert not [c for c in system.calls(sid) if c[1] == "compensate"]
    assert system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


def test_database_run_retries_a_lock_wait_timeout_in_place(live_system):
    # The participants' transactions go through Database.run: a lock wait timeout (or a
    # deadlock) is tried again on the spot instead of failing the call with a 503.
    from saga.common import Database, Settings
    db = Database(Settings(db_port=live_system.server.port, db_name=live_system.dbname), 2)
    holder = live_system.connect()
    attempts = []

    def debit(cur):
        attempts.append(1)
        cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
        cur.execute("UPDATE ACCOUNT SET balance = balance - 1 WHERE id = 'A'")
        return cur.rowcount

    try:
        hold = holder.cursor()
        hold.execute("SELECT balance FROM ACCOUNT WHERE id = 'A' FOR UPDATE")
        hold.fetchall()
        release = threading.Timer(1.5, holder.rollback)
        release.start()
        assert db.run(debit, attempts=4) == 1
        release.join()
    finally:
        holder.close()
    assert len(attempts) >= 2, "the first attempt should have timed out on the lock"
    assert live_system.balances()["A"] == 999
