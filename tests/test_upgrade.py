"""A database made by the first version (one saga type, username/address/payment columns)
is moved to the current layout by tools/upgrade.py plus schema.sql, keeping its sagas:
finished ones read as before, a saga caught in flight is resumed and finishes."""

import os
import subprocess
import sys

import requests

from conftest import ROOT, LiveSystem, system_env
from launcher import System

V1_SCHEMA = os.path.join(ROOT, "tests", "fixtures", "schema-v1.sql")

V1_ROWS = [
    # A registration that completed.
    "INSERT INTO SAGA (id, status, step, attempt, username, address, payment, results) "
    "VALUES ('done-1', 'COMPLETED', 2, 1, 'ada', '1 Old Rd', 'Visa', "
    "'{\"A\": {\"user_id\": 1}, \"B\": {\"address_id\": 1}, \"C\": {\"payment_id\": 1}}')",
    "INSERT INTO TABLE_A (id, saga_id, username) VALUES (1, 'done-1', 'ada')",
    "INSERT INTO TABLE_B (id, saga_id, user_id, address) VALUES (1, 'done-1', 1, '1 Old Rd')",
    "INSERT INTO TABLE_C (id, saga_id, user_id, payment_method) VALUES (1, 'done-1', 1, 'Visa')",
    "INSERT INTO STEP_LEDGER (service, saga_id, state) VALUES ('A', 'done-1', 'invoked'), "
    "('B', 'done-1', 'invoked'), ('C', 'done-1', 'invoked')",
    "INSERT INTO SAGA_LOG (saga_id, service, status, message, step, action, attempt) VALUES "
    "('done-1', 'SAGA', 'STARTED', 'saga started', NULL, NULL, NULL), "
    "('done-1', 'A', 'success', 'committed (user_id=1)', 1, 'invoke', 1), "
    "('done-1', 'SAGA', 'COMPLETED', 'all steps committed', NULL, NULL, NULL)",
    # A registration whose orchestrator died while it was calling B: lease long expired.
    "INSERT INTO SAGA (id, status, step, attempt, username, address, payment, results, "
    "lease_owner, lease_until) VALUES ('flight-1', 'RUNNING', 1, 1, 'bo', '2 Old Rd', "
    "'Amex', '{\"A\": {\"user_id\": 2}}', 'dead:1:x', '2020-01-01')",
    "INSERT INTO TABLE_A (id, saga_id, username) VALUES (2, 'flight-1', 'bo')",
    "INSERT INTO STEP_LEDGER (service, saga_id, state) VALUES ('A', 'flight-1', 'invoked')",
]


def test_first_version_database_is_upgraded_and_its_sagas_carry_on(mariadb, tmp_path):
    dbname = mariadb.create_database("saga_v1", schema=V1_SCHEMA)
    mariadb.root(f"USE {dbname}", *V1_ROWS)
    env = {**os.environ, **system_env(mariadb, dbname)}
    upgrade = [sys.executable, os.path.join(ROOT, "tools", "upgrade.py")]
    first = subprocess.run(upgrade, env=env, capture_output=True, text=True, check=True)
    assert "SAGA: moved" in first.stdout
    mariadb.apply(dbname, os.path.join(ROOT, "schema.sql"))
    again = subprocess.run(upgrade, env=env, capture_output=True, text=True, check=True)
    assert "already in the current layout" in again.stdout

    system = System(str(tmp_path), system_env(mariadb, dbname))
    # The services first: the orchestrator resumes the saga in flight as it starts, and
    # its retries must not run out while a service is still starting.
    system.start("service_a", "service_b", "service_c")
    system.start("orchestrator")
    try:
        live = LiveSystem(mariadb, system, dbname)
        # Services are named by configuration now, not by one letter.
        assert live.query("SELECT column_type FROM information_schema.columns WHERE "
                          "table_schema = DATABASE() AND column_name = 'service' AND "
                          "table_name IN ('STEP_LEDGER', 'OUTBOX')") == [("varchar(40)",)] * 2
        # A saga keeps its trace context (tracing): the upgrade added the column.
        assert live.query("SELECT column_type FROM information_schema.columns WHERE "
                          "table_schema = DATABASE() AND column_name = 'trace' AND "
                          "table_name IN ('SAGA', 'OUTBOX')") == [("varchar(55)",)] * 2
        done = live.get("/sagas/done-1").json()
        assert done["status"] == "COMPLETED" and done["type"] == "registration"
        assert done["input"] == {"username": "ada", "address": "1 Old Rd", "payment": "Visa"}
        assert [s["invoke"]["status"] for s in done["steps"][:1]] == ["success"]
        # The ledger answers the old saga's repeated call as it did then.
        repeat = requests.post(live.service("A") + "/invoke", timeout=10,
                               json={"saga_id": "done-1", "username": "ada"})
        assert repeat.status_code == 200 and repeat.json()["user_id"] == 1
        # The saga caught in flight is resumed by recovery and finishes.
        assert live.wait_status("flight-1") == "COMPLETED"
        assert live.row_counts("flight-1") == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}
        assert live.start().status_code == 200
        live.assert_all_or_nothing()
    finally:
        system.stop()
