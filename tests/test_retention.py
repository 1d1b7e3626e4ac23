"""SAGA_RETENTION_DAYS: finished sagas older than the retention are purged (their SAGA
row, SAGA_LOG rows, start keys and the services' ledger entries), in small batches;
never a saga that is running, compensating or FAILED."""

import uuid

from conftest import in_background, join
from launcher import wait_for

TWO_SECONDS = str(2 / 86400)


def test_finished_sagas_are_purged_after_the_retention_and_active_ones_are_kept(make_system):
    system = make_system(SAGA_RETENTION_DAYS=TWO_SECONDS, SAGA_COMPENSATE_FOR="0.3",
                         SAGA_READ_TIMEOUT="10")
    # A choreographed saga held at B longer than the retention: no lease renewal keeps
    # its row young, and it must not be purged while it runs.
    system.set_fault("B", mode="slow", seconds=8, next=1)
    held_thread, held_answer = in_background(system.register)
    system.wait_serving("B")
    held = system.query("SELECT id FROM SAGA WHERE mode = 'choreography'")[0][0]
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    done = system.start(headers=key).json()["saga"]
    register_key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    registered = system.register(headers=register_key).json()["saga"]
    system.set_fault("C", mode="reject", next=1)
    undone = system.start().json()["saga"]
    system.set_fault("C", mode="reject", next=1)
    system.set_fault("A", mode="fail", on="compensate")
    failed = system.start().json()["saga"]
    assert system.status(failed) == "FAILED"
    system.set_fault("A", mode="off")
    system.set_fault("B", mode="slow", seconds=5, next=1)
    thread, answer = in_background(system.start)
    running = wait_for(lambda: system.query("SELECT id FROM SAGA WHERE status = 'RUNNING'"),
                       10, "a running saga")[0][0]

    def purged(sid):
        return not system.query("SELECT 1 FROM SAGA WHERE id = %s UNION ALL SELECT 1 FROM "
                                "SAGA_LOG WHERE saga_id = %s UNION ALL SELECT 1 FROM "
                                "STEP_LEDGER WHERE saga_id = %s", (sid,) * 3)

    wait_for(lambda: purged(done) and purged(undone) and purged(registered), 30,
             "the finished sagas to be purged")
    # The running saga is older than the retention too: it is kept, and so are the
    # ledger entries it may still need (A's row would be orphaned by a later undo).
    assert system.status(running) == "RUNNING"
    assert system.status(held) == "RUNNING"
    # Published events go after the retention too.
    assert system.query("SELECT COUNT(*) FROM OUTBOX WHERE saga_id = %s",
                        (registered,)) == [(0,)]
    assert system.query("SELECT state FROM STEP_LEDGER WHERE saga_id = %s AND service = 'A'",
                        (running,)) == [("invoked",)]
    assert system.status(failed) == "FAILED"
    # A start key outlives its saga for at least a day: a client retrying with it is
    # told the saga is gone, it does not register again.
    assert sorted(system.query("SELECT saga_id FROM START_KEY")) == sorted([(done,), (registered,)])
    again = system.start(headers=key)
    assert again.status_code == 422 and "purged" in again.json()["error"]
    again = system.register(headers=register_key)
    assert again.status_code == 422 and "purged" in again.json()["error"]
    # Business rows stay: retention forgets the saga's story, not the registration.
    assert system.row_counts(done) == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
    join(thread)
    assert answer["resp"].status_code == 200
    join(held_thread)
    assert held_answer["resp"].status_code == 200
    wait_for(lambda: purged(running) and purged(held), 30,
             "the sagas to be purged once they finished")
    assert system.status(failed) == "FAILED"



def test_a_ledger_entry_is_kept_while_its_saga_row_is(make_system):
    system = make_system(SAGA_RETENTION_DAYS=TWO_SECONDS)
    system.system.kill("orchestrator")   # nobody purges SAGA rows now
    sid = system.register().json()["saga"]   # choreographed: needs no orchestrator
    # Each service purges its ledger, then its published events: once a service's
    # events of the saga are gone, its ledger entry was old enough to go too.
    wait_for(lambda: system.query("SELECT COUNT(*) FROM OUTBOX WHERE saga_id = %s",
                                  (sid,)) == [(0,)], 30, "the published events to be purged")
    assert system.query("SELECT service FROM STEP_LEDGER WHERE saga_id = %s ORDER BY service",
                        (sid,)) == [("A",), ("B",), ("C",)]
    system.system.start("orchestrator")
    wait_for(lambda: not system.query("SELECT 1 FROM STEP_LEDGER WHERE saga_id = %s", (sid,)),
             30, "the ledger entries to go once the saga's row is purged")
