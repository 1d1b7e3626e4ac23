"""Rule 6: nothing is lost when any process dies. kill -9 the orchestrator at each
phase, freeze processes, run two orchestrators, restart the database: every saga still
ends all-or-nothing."""

import os
import subprocess
import sys
import threading

import pytest
import requests

from conftest import ROOT, in_background, join, system_env
from launcher import PrivateMariaDB, free_port, wait_for


def wait_step(live_system, step, status="RUNNING"):
    rows = wait_for(lambda: live_system.query("SELECT id FROM SAGA WHERE step = %s AND status = %s",
                                       (step, status)), 30, f"a saga at step {step} {status}")
    return rows[0][0]


def test_kill_during_a_call_resumes_and_completes(live_system):
    live_system.set_fault("B", mode="hang", seconds=2, next=1)
    thread, answer = in_background(live_system.start)
    sid = wait_step(live_system, 1)
    live_system.system.kill("orchestrator")
    join(thread, 10)
    assert "error" in answer  # the client lost its answer with the orchestrator
    live_system.system.start("orchestrator")
    assert live_system.wait_status(sid) == "COMPLETED"
    live_system.wait_idle("B")
    assert live_system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    b_calls = [c for c in live_system.calls(sid) if c[0] == "B"]
    assert b_calls[0] == ("B", "invoke", 1, "unknown")
    assert b_calls[-1][3] == "success"


def test_kill_after_service_committed_before_orchestrator_recorded_it(live_system):
    live_system.set_fault("B", mode="slow", seconds=1, next=1)
    thread, answer = in_background(live_system.start)
    sid = wait_step(live_system, 1)
    live_system.wait_serving("B")
    live_system.system.freeze("orchestrator")
    # B commits while the orchestrator cannot hear it; then the orchestrator dies.
    wait_for(lambda: live_system.row_counts(sid)["TABLE_B"] == 1, 30, "B to commit")
    live_system.system.kill("orchestrator")
    live_system.system.start("orchestrator")
    assert live_system.wait_status(sid) == "COMPLETED"
    assert live_system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    # The retry found B's row (idempotent replay) rather than making a second one.
    assert live_system.query("SELECT COUNT(*) FROM TABLE_B")[0][0] == 1


def test_kill_during_compensation_resumes_compensation(live_system):
    live_system.set_fault("C", mode="reject")
    live_system.set_fault("B", mode="hang", seconds=2, next=1, on="compensate")
    thread, answer = in_background(live_system.start)
    sid = wait_step(live_system, 1, "COMPENSATING")
    live_system.system.kill("orchestrator")
    live_system.system.start("orchestrator")
    assert live_system.wait_status(sid) == "COMPENSATED"
    live_system.wait_idle("B")
    assert live_system.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    comp = [(c[0], c[2], c[3]) for c in live_system.calls(sid) if c[1] == "compensate"]
    # C refused (it wrote nothing), so the undo starts at B.
    assert comp[0] == ("B", 1, "unknown") and comp[-1] == ("A", 1, "success")
    b_attempts = [(attempt, status) for service, attempt, status in comp if service == "B"]
    # B's compensation carried on after the restart without its attempts starting over.
    assert [a for a, _ in b_attempts] == list(range(1, len(b_attempts) + 1))
    assert b_attempts[-1][1] == "success" and len(b_attempts) >= 2


def test_kill_between_retries_keeps_the_attempt_count(make_system):
    # A backoff of seconds parks the saga between A's attempts; a restart must not
    # hand it a fresh retry budget: A is called at most SAGA_MAX_ATTEMPTS times.
    system = make_system(SAGA_BACKOFF_BASE="3", SAGA_BACKOFF_MAX="3")
    system.set_fault("A", mode="fail")
    thread, answer = in_background(system.start)
    wait_for(lambda: system.query("SELECT attempt FROM SAGA WHERE attempt = 2"), 15,
             "A's second attempt to be scheduled")
    system.system.kill("orchestrator")
    system.system.start("orchestrator")
    sid = system.query("SELECT id FROM SAGA")[0][0]
    assert system.wait_status(sid) == "COMPENSATED"
    a_invokes = [(c[2], c[3]) for c in system.calls(sid) if c[0] == "A" and c[1] == "invoke"]
    assert [attempt for attempt, _ in a_invokes] == [1, 2, 3]
    assert {status for _, status in a_invokes} <= {"failed", "unknown"}
    assert ("SAGA", None, None, "RESUMED") in system.log(sid) or (2, "unknown") in a_invokes
    assert system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


def test_second_orchestrator_takes_over_a_dead_ones_sagas(make_system):
    system = make_system(orchestrators=2)
    system.set_fault("B", mode="hang", seconds=2, next=4)
    threads = [in_background(system.start)[0] for _ in range(4)]
    wait_for(lambda: system.query("SELECT COUNT(*) FROM SAGA WHERE step = 1")[0][0] == 4, 15,
             "four sagas at step B")
    first_owner = system.get("/health").json()["owner"]
    system.system.kill("orchestrator")
    second = requests.get(system.system.url("orchestrator2") + "/health", timeout=5).json()["owner"]
    wait_for(lambda: system.query("SELECT COUNT(*) FROM SAGA WHERE status = 'COMPLETED'")[0][0] == 4,
             30, "all four sagas to complete")
    owners = {r[0] for r in system.query("SELECT DISTINCT s.message FROM SAGA_LOG s "
                                         "WHERE s.status = 'unknown'")}
    assert owners and all(second in m for m in owners) and not any(first_owner in m for m in owners)
    system.wait_idle("B")
    system.assert_all_or_nothing()
    for t in threads:
        t.join(5)


def test_two_live_orchestrators_never_drive_the_same_saga(make_system):
    system = make_system(orchestrators=2)
    urls = [system.system.url("orchestrator"), system.system.url("orchestrator2")]
    results = []

    def client(url):
        for _ in range(10):
            results.append(requests.post(url + "/start", json={
                "username": "u", "address": "a", "payment": "p"}, timeout=30).status_code)
    threads = [threading.Thread(target=client, args=(urls[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 40
    # A saga driven twice would show a second STARTED or a repeated call in its log.
    assert system.query("SELECT COUNT(*) FROM SAGA_LOG WHERE status = 'unknown'")[0][0] == 0
    assert system.query("SELECT MAX(fence) FROM SAGA")[0][0] == 1
    system.assert_all_or_nothing()


def test_frozen_orchestrator_that_wakes_cannot_overwrite_the_new_owner(make_system):
    system = make_system(orchestrators=2)
    system.set_fault("B", mode="slow", seconds=1.5, next=1)
    thread, answer = in_background(system.start)
    sid = wait_step(system, 1)
    system.system.freeze("orchestrator")
    # orchestrator2 claims the saga when the lease lapses and finishes it.
    assert system.wait_status(sid) == "COMPLETED"
    fence = system.saga_row(sid)[6]
    assert fence == 2
    system.system.thaw("orchestrator")
    join(thread)
    # The woken owner's late write is fenced off: state and rows are unchanged.
    system.wait_quiet()
    assert system.saga_row(sid)[0] == "COMPLETED" and system.saga_row(sid)[6] == 2
    assert system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    assert system.query("SELECT COUNT(*) FROM SAGA_LOG WHERE saga_id = %s AND status = 'COMPLETED'",
                        (sid,))[0][0] == 1


def test_frozen_service_is_treated_as_slow_and_its_late_commit_leaves_no_row(live_system):
    live_system.system.freeze("service_b")
    thread, answer = in_background(live_system.start)
    sid = wait_step(live_system, 1, "COMPENSATING")
    live_system.system.thaw("service_b")
    join(thread)
    assert answer["resp"].status_code == 502
    assert live_system.saga_row(sid)[0] == "COMPENSATED"
    live_system.wait_idle("B")
    assert live_system.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


def test_start_answers_202_when_the_saga_outlives_the_wait(make_system):
    system = make_system(SAGA_START_WAIT="0.3")
    system.set_fault("B", mode="slow", seconds=1, next=1)
    resp = system.start()
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "RUNNING"
    assert system.wait_status(resp.json()["saga"]) == "COMPLETED"


def test_database_restart_mid_saga_is_survived(live_system):
    live_system.set_fault("B", mode="slow", seconds=1, next=1)
    thread, answer = in_background(live_system.start)
    sid = wait_step(live_system, 1)
    live_system.server.stop()
    resp = live_system.get("/health")
    assert resp.status_code == 503 and resp.json()["database"] == "down"
    assert requests.get(live_system.service("A") + "/health", timeout=5).status_code == 503
    live_system.server.start()
    join(thread)
    # B could not commit while the database was down (it answered 503); whether its
    # retries outlasted the outage or the saga was undone, it is all or nothing.
    assert live_system.wait_status(sid, timeout=60) in ("COMPLETED", "COMPENSATED")
    live_system.wait_quiet()
    live_system.assert_all_or_nothing()
    for name in ("orchestrator", "service_a", "service_b", "service_c"):
        assert live_system.system.alive(name)
    assert live_system.start().status_code == 200


def test_dropped_database_connections_are_replaced(live_system):
    live_system.start()
    pooled = live_system.server.root("SELECT id FROM information_schema.PROCESSLIST WHERE user = 'saga'")
    assert pooled, "the processes should hold pooled connections after a saga"
    for (pid,) in pooled:
        live_system.server.root(f"KILL {pid}")
    resp = live_system.start()
    assert resp.status_code == 200 and resp.json()["status"] == "COMPLETED"


def test_start_never_answers_from_a_state_it_could_not_save(make_system):
    # C commits while the orchestrator is frozen; when it wakes, the database is gone,
    # so its final save cannot land. /start must not claim COMPLETED: it answers 202
    # when its wait is over, and the saved outcome follows once the database is back.
    system = make_system(SAGA_START_WAIT="3")
    system.set_fault("C", mode="slow", seconds=1, next=1)
    thread, answer = in_background(system.start)
    sid = wait_step(system, 2)
    system.wait_serving("C")
    system.system.freeze("orchestrator")
    wait_for(lambda: system.row_counts(sid)["TABLE_C"] == 1, 30, "C to commit")
    system.server.stop()
    try:
        system.system.thaw("orchestrator")
        join(thread)
        assert answer["resp"].status_code == 202, answer["resp"].text
        assert answer["resp"].json()["status"] == "RUNNING"
    finally:
        system.server.start()
    assert system.wait_status(sid) == "COMPLETED"
    assert [c for c in system.calls(sid) if c[0] == "C"] == [("C", "invoke", 1, "success")]
    assert system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


def test_database_error_wrapped_by_the_driver_counts_as_unavailable():
    import mysql.connector
    from saga.common import is_unavailable
    lost = mysql.connector.errors.OperationalError("Lost connection to MySQL server")
    try:
        try:
            raise lost
        except mysql.connector.Error as exc:
            raise mysql.connector.errors.ProgrammingError("while processing parameters") from exc
    except mysql.connector.Error as wrapped:
        assert is_unavailable(wrapped)
    assert not is_unavailable(mysql.connector.errors.ProgrammingError("bad SQL"))


# --- time, servers, addresses -----------------------------------------------------------


def test_leases_and_timestamps_are_utc_on_a_server_in_a_dst_zone(live_system):
    # The test server runs in America/New_York. Had the engine used the server's local
    # time, the lease would be 4-5 hours away from UTC and a daylight-saving change would
    # stretch or cut every lease by an hour.
    assert live_system.server.root("SELECT @@system_time_zone")[0][0] in ("EST", "EDT")
    live_system.set_fault("B", mode="slow", seconds=0.8, next=1)
    thread, _ = in_background(live_system.start)
    live_system.wait_serving("B")
    (lease_left, created_ago), = live_system.query(
        "SELECT TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), lease_until) / 1e6, "
        "TIMESTAMPDIFF(MICROSECOND, created_at, UTC_TIMESTAMP(3)) / 1e6 FROM SAGA")
    assert 0 < lease_left <= 1.0, lease_left          # SAGA_LEASE_SECONDS=1
    assert 0 <= created_ago < 60, created_ago
    join(thread)
    item = live_system.get("/sagas").json()["sagas"][0]
    assert item["created_at"].endswith("Z")


@pytest.mark.parametrize("process", ["orchestrator", "service_b"])
def test_process_refuses_to_start_on_a_server_without_skip_locked(tmp_path, process):
    old = PrivateMariaDB(str(tmp_path / "old"), version="10.5.99-MariaDB")
    old.install()
    old.start()
    try:
        dbname = old.create_database("saga_old")
        env = {**os.environ, **system_env(old, dbname), "ORCHESTRATOR_PORT": str(free_port()),
               "SERVICE_B_PORT": str(free_port())}
        done = subprocess.run([sys.executable, os.path.join(ROOT, f"{process}.py")], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        old.stop()
    assert done.returncode == 3, done.stdout + done.stderr
    said = done.stdout + done.stderr
    assert "10.5.99" in said and "MariaDB 10.6" in said and "SKIP LOCKED" in said, said


def test_unresolvable_service_name_is_said_plainly_and_needs_no_undo(make_system):
    system = make_system(SERVICE_C_URL="http://no-such-service.invalid:5003")
    resp = system.start()
    assert resp.status_code == 502, resp.text
    sid = resp.json()["saga"]
    messages = [m for (m,) in system.query("SELECT message FROM SAGA_LOG WHERE saga_id = %s "
                                           "AND service = 'C' AND action = 'invoke'", (sid,))]
    assert len(messages) == 3 and all(m.startswith("name not resolved") for m in messages)
    assert "name not resolved" in resp.json()["reason"]
    # The request never left: C is not compensated, B and A are.
    assert [c[0] for c in system.calls(sid) if c[1] == "compensate"] == ["B", "A"]


def test_sagas_waiting_on_a_dead_service_hold_no_driver_thread(make_system):
    # Two drivers; each start hands its saga to them after 0.2 s, and every retry is
    # due 0.25-0.5 s later, after that hand-over.
    system = make_system(SAGA_DRIVERS="2", SAGA_START_WAIT="0.2", SAGA_BACKOFF_BASE="0.5",
                         SAGA_BACKOFF_MAX="0.5")
    system.system.kill("service_b")
    stuck = [system.transfer({"from": "A", "to": "B", "amount": 1}) for _ in range(3)]
    assert [r.status_code for r in stuck] == [202] * 3
    system.set_fault("C", mode="fail", next=1)
    resp = system.transfer({"from": "A", "to": "C", "amount": 5})
    assert resp.status_code == 202, resp.text
    # The credit to C needs one retry, on a driver thread, while three transfers into
    # dead B keep retrying: it completes all the same.
    assert system.wait_status(resp.json()["saga"], timeout=30) == "COMPLETED"
    waiting = [r.json()["saga"] for r in stuck]
    assert {system.status(sid) for sid in waiting} == {"RUNNING"}
    assert system.get("/health").json()["waiting_sagas"] >= 1
    system.system.start("service_b")
    for sid in waiting:
        assert system.wait_status(sid, timeout=30) == "COMPLETED"
    system.assert_money_conserved()


def test_a_saga_due_while_the_database_is_down_waits_and_carries_on(make_system):
    # Retries 1-2 s apart, a lease longer than the outage: the saga is waiting in the
    # schedule (A keeps failing) when the database goes away, and comes due meanwhile.
    system = make_system(SAGA_START_WAIT="0", SAGA_BACKOFF_BASE="2", SAGA_BACKOFF_MAX="2",
                         SAGA_LEASE_SECONDS="10", SAGA_MAX_ATTEMPTS="5")
    system.set_fault("A", mode="fail", next=1)
    sid = system.start().json()["saga"]
    wait_for(lambda: system.get("/health").json().get("waiting_sagas") == 1, 10,
             "the saga to wait for its retry")
    log_path = os.path.join(system.system.logdir, "orchestrator.log")

    def log_text():
        with open(log_path, encoding="utf-8") as f:
            return f.read()

    system.server.stop()
    wait_for(lambda: f"saga {sid}: due" in log_text() or "unexpected error" in log_text(),
             30, "the saga to come due while the database is down")
    system.server.start()
    assert system.wait_status(sid, timeout=60) == "COMPLETED"
    assert "unexpected error" not in log_text()   # an outage is not a bug
    system.assert_all_or_nothing()
