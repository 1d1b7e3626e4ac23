"""Rule 6: nothing is lost when any process dies. kill -9 the orchestrator at each
phase, freeze processes, run two orchestrators, restart the database: every saga still
ends all-or-nothing."""

import threading

import requests

from launcher import wait_for


def in_background(fn, *args):
    answer = {}

    def run():
        try:
            answer["resp"] = fn(*args)
        except requests.RequestException as exc:
            answer["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answer


def wait_step(saga, step, status="RUNNING"):
    rows = wait_for(lambda: saga.query("SELECT id FROM SAGA WHERE step = %s AND status = %s",
                                       (step, status)), 30, f"a saga at step {step} {status}")
    return rows[0][0]


def test_kill_during_a_call_resumes_and_completes(saga):
    saga.set_fault("B", mode="hang", seconds=2, next=1)
    thread, answer = in_background(saga.start)
    sid = wait_step(saga, 1)
    saga.system.kill("orchestrator")
    thread.join(10)
    assert "error" in answer  # the client lost its answer with the orchestrator
    saga.system.start("orchestrator")
    assert saga.wait_status(sid) == "COMPLETED"
    saga.wait_idle("B")
    assert saga.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    b_calls = [c for c in saga.calls(sid) if c[0] == "B"]
    assert b_calls[0] == ("B", "invoke", 1, "unknown")
    assert b_calls[-1][3] == "success"


def test_kill_after_service_committed_before_orchestrator_recorded_it(saga):
    saga.set_fault("B", mode="slow", seconds=1, next=1)
    thread, answer = in_background(saga.start)
    sid = wait_step(saga, 1)
    saga.wait_serving("B")
    saga.system.freeze("orchestrator")
    # B commits while the orchestrator cannot hear it; then the orchestrator dies.
    wait_for(lambda: saga.row_counts(sid)["TABLE_B"] == 1, 30, "B to commit")
    saga.system.kill("orchestrator")
    saga.system.start("orchestrator")
    assert saga.wait_status(sid) == "COMPLETED"
    assert saga.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    # The retry found B's row (idempotent replay) rather than making a second one.
    assert saga.query("SELECT COUNT(*) FROM TABLE_B")[0][0] == 1


def test_kill_during_compensation_resumes_compensation(saga):
    saga.set_fault("C", mode="reject")
    saga.set_fault("B", mode="hang", seconds=2, next=1, on="compensate")
    thread, answer = in_background(saga.start)
    sid = wait_step(saga, 1, "COMPENSATING")
    saga.system.kill("orchestrator")
    saga.system.start("orchestrator")
    assert saga.wait_status(sid) == "COMPENSATED"
    saga.wait_idle("B")
    assert saga.row_counts(sid) == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}
    comp = [(c[0], c[2], c[3]) for c in saga.calls(sid) if c[1] == "compensate"]
    assert comp[0] == ("C", 1, "success") and comp[-1] == ("A", 1, "success")
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
    thread.join(30)
    # The woken owner's late write is fenced off: state and rows are unchanged.
    system.wait_quiet()
    assert system.saga_row(sid)[0] == "COMPLETED" and system.saga_row(sid)[6] == 2
    assert system.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    assert system.query("SELECT COUNT(*) FROM SAGA_LOG WHERE saga_id = %s AND status = 'COMPLETED'",
                        (sid,))[0][0] == 1


def test_frozen_service_is_treated_as_slow_and_its_late_commit_leaves_no_row(saga):
    saga.system.freeze("service_b")
    thread, answer = in_background(saga.start)
    sid = wait_step(saga, 1, "COMPENSATING")
    saga.system.thaw("service_b")
    thread.join(30)
    assert answer["resp"].status_code == 502
    assert saga.saga_row(sid)[0] == "COMPENSATED"
    saga.wait_idle("B")
    assert saga.row_counts() == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}


def test_start_answers_202_when_the_saga_outlives_the_wait(make_system):
    system = make_system(SAGA_START_WAIT="0.3")
    system.set_fault("B", mode="slow", seconds=1, next=1)
    resp = system.start()
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "RUNNING"
    assert system.wait_status(resp.json()["saga"]) == "COMPLETED"


def test_database_restart_mid_saga_is_survived(saga):
    saga.set_fault("B", mode="slow", seconds=1, next=1)
    thread, answer = in_background(saga.start)
    sid = wait_step(saga, 1)
    saga.server.stop()
    resp = saga.get("/health")
    assert resp.status_code == 503 and resp.json()["database"] == "down"
    assert requests.get(saga.service("A") + "/health", timeout=5).status_code == 503
    saga.server.start()
    thread.join(30)
    assert saga.wait_status(sid, timeout=60) in ("COMPLETED", "COMPENSATED")
    saga.wait_quiet()
    saga.assert_all_or_nothing()
    for name in ("orchestrator", "service_a", "service_b", "service_c"):
        assert saga.system.alive(name)
    assert saga.start().status_code == 200


def test_dropped_database_connections_are_replaced(saga):
    saga.start()
    pooled = saga.server.root("SELECT id FROM information_schema.PROCESSLIST WHERE user = 'saga'")
    assert pooled, "the processes should hold pooled connections after a saga"
    for (pid,) in pooled:
        saga.server.root(f"KILL {pid}")
    resp = saga.start()
    assert resp.status_code == 200 and resp.json()["status"] == "COMPLETED"


def test_start_never_answers_from_a_state_it_could_not_save(saga):
    # C commits while the orchestrator is frozen; when it wakes, the database is gone,
    # so its final save fails. /start must not claim COMPLETED: it answers 202.
    saga.set_fault("C", mode="slow", seconds=1, next=1)
    thread, answer = in_background(saga.start)
    sid = wait_step(saga, 2)
    saga.wait_serving("C")
    saga.system.freeze("orchestrator")
    wait_for(lambda: saga.row_counts(sid)["TABLE_C"] == 1, 30, "C to commit")
    saga.server.stop()
    saga.system.thaw("orchestrator")
    thread.join(30)
    assert answer["resp"].status_code == 202, answer["resp"].text
    assert answer["resp"].json()["status"] == "RUNNING"
    saga.server.start()
    assert saga.wait_status(sid) == "COMPLETED"
    assert saga.row_counts(sid) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}


def test_database_error_wrapped_by_the_driver_counts_as_unavailable():
    import mysql.connector
    from common import is_unavailable
    lost = mysql.connector.errors.OperationalError("Lost connection to MySQL server")
    try:
        try:
            raise lost
        except mysql.connector.Error as exc:
            raise mysql.connector.errors.ProgrammingError("while processing parameters") from exc
    except mysql.connector.Error as wrapped:
        assert is_unavailable(wrapped)
    assert not is_unavailable(mysql.connector.errors.ProgrammingError("bad SQL"))
