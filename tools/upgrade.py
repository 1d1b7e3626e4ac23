"""Move a saga database made by the first version (one saga type, with username, address
and payment columns on SAGA) to the current layout, keeping every saga: the input becomes
JSON, the log and ledger rows learn their operation, the ledger learns each first call's
request and answer. Then schema.sql adds what is new. Safe to run again: a database
already in the current layout is left alone.

    .venv/bin/python tools/upgrade.py        # uses SAGA_DB_* like the processes
    ./run.sh upgrade                          # the same, after starting the database"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from saga.common import Database, load_settings  # noqa: E402

# The registration's operation at each service, and the columns of its first call.
OPS = {"A": ("user", "TABLE_A", "user_id", ("username",)),
       "B": ("address", "TABLE_B", "address_id", ("user_id", "address")),
       "C": ("payment", "TABLE_C", "payment_id", ("user_id", "payment_method"))}

SAGA_TO_V2 = [
    "ALTER TABLE SAGA ADD COLUMN type VARCHAR(32) NOT NULL DEFAULT 'registration' AFTER id, "
    "ADD COLUMN mode ENUM('orchestration', 'choreography') NOT NULL DEFAULT 'orchestration' "
    "AFTER type, ADD COLUMN transport ENUM('http', 'kafka', 'rabbitmq') NOT NULL DEFAULT "
    "'http' AFTER mode, ADD COLUMN input TEXT NULL AFTER attempt, "
    "ADD COLUMN label VARCHAR(255) NOT NULL DEFAULT '' AFTER input, "
    "ADD COLUMN touched TINYINT(1) NOT NULL DEFAULT 0 AFTER rejected, "
    "ADD COLUMN revision INT UNSIGNED NOT NULL DEFAULT 1 AFTER fence, "
    "MODIFY failed_step VARCHAR(40) NULL",
    "UPDATE SAGA SET input = JSON_OBJECT('username', username, 'address', address, "
    "'payment', payment), label = username",
    # The first version always undid the current step: a saga caught in flight keeps that.
    "UPDATE SAGA SET touched = 1 WHERE status IN ('RUNNING', 'COMPENSATING')",
    "ALTER TABLE SAGA MODIFY input TEXT NOT NULL, DROP INDEX saga_username_created, "
    "DROP COLUMN username, DROP COLUMN address, DROP COLUMN payment, "
    "DROP INDEX saga_recovery, ADD KEY saga_recovery (mode, status, lease_until), "
    "ADD KEY saga_type_created (type, created_at), ADD KEY saga_label_created (label, "
    "created_at), ADD KEY saga_finished (status, updated_at)",
]

LOG_TO_V2 = [
    "ALTER TABLE SAGA_LOG ADD COLUMN op VARCHAR(20) NULL AFTER step, "
    "MODIFY action ENUM('invoke', 'compensate', 'publish') NULL, "
    "ADD COLUMN event VARCHAR(64) NULL AFTER action",
    *[f"UPDATE SAGA_LOG SET op = '{op}' WHERE service = '{svc}'"
      for svc, (op, _, _, _) in OPS.items()],
]



def json_pairs(columns) -> str:
    return ", ".join(f"'{c}', t.{c}" for c in columns)


LEDGER_TO_V2 = [
    "ALTER TABLE STEP_LEDGER ADD COLUMN op VARCHAR(20) NOT NULL DEFAULT '' AFTER saga_id, "
    "MODIFY state ENUM('invoked', 'refused', 'compensated') NOT NULL, "
    "ADD COLUMN request TEXT NULL AFTER state, ADD COLUMN answer TEXT NULL AFTER request, "
    "ADD COLUMN created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) AFTER answer",
    *[f"UPDATE STEP_LEDGER SET op = '{op}' WHERE service = '{svc}'"
      for svc, (op, _, _, _) in OPS.items()],
    "ALTER TABLE STEP_LEDGER DROP PRIMARY KEY, ADD PRIMARY KEY (service, saga_id, op), "
    "ADD KEY step_ledger_updated (updated_at)",
    # A repeated call is answered from the ledger now: give each first call its answer.
    *[f"UPDATE STEP_LEDGER l JOIN {table} t ON t.saga_id = l.saga_id SET "
      f"l.request = JSON_OBJECT({json_pairs(columns)}), "
      f"l.answer = JSON_OBJECT('status', 'success', 'saga_id', l.saga_id, 'op', '{op}', "
      f"'{id_name}', t.id) WHERE l.service = '{svc}' AND l.state = 'invoked'"
      for svc, (op, table, id_name, columns) in OPS.items()],
    "UPDATE STEP_LEDGER SET answer = JSON_OBJECT('status', 'compensated', 'saga_id', "
    "saga_id, 'op', op, 'removed', 0, 'undone', 'nothing to undo') "
    "WHERE state = 'compensated' AND answer IS NULL",
]


# Services are named by configuration (SAGA_SERVICES), not only A, B and C.
NAMED_SERVICES = {
    "STEP_LEDGER": "ALTER TABLE STEP_LEDGER MODIFY service VARCHAR(40) NOT NULL, "
                   "MODIFY op VARCHAR(40) NOT NULL",
    "OUTBOX": "ALTER TABLE OUTBOX MODIFY service VARCHAR(40) NOT NULL",
    "SAGA_LOG": "ALTER TABLE SAGA_LOG MODIFY op VARCHAR(40) NULL",
}


def column_type(cur, table: str, column: str) -> str | None:
    cur.execute("SELECT column_type AS kind FROM information_schema.columns WHERE "
                "table_schema = DATABASE() AND table_name = %s AND column_name = %s",
                (table, column))
    row = cur.fetchone()
    return row and row["kind"].lower()


def columns_of(cur, table: str) -> set[str]:
    cur.execute("SELECT column_name AS name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = %s", (table,))
    return {row["name"].lower() for row in cur.fetchall()}


def upgrade(db: Database) -> list[str]:
    """Apply what the database still needs; returns what was done."""
    done = []
    with db.transaction() as cur:
        saga, log, ledger = (columns_of(cur, t) for t in ("SAGA", "SAGA_LOG", "STEP_LEDGER"))
    steps = ([("SAGA", SAGA_TO_V2)] if "username" in saga else []) \
        + ([("SAGA_LOG", LOG_TO_V2)] if log and "op" not in log else []) \
        + ([("STEP_LEDGER", LEDGER_TO_V2)] if ledger and "op" not in ledger else [])
    run_steps(db, steps, done)
    with db.transaction() as cur:
        narrow = [table for table, column in (("STEP_LEDGER", "service"), ("OUTBOX", "service"),
                                              ("SAGA_LOG", "op"))
                  if column_type(cur, table, column) in ("char(1)", "varchar(20)")]
    run_steps(db, [(table, [NAMED_SERVICES[table]]) for table in narrow], done)
    return done


def run_steps(db: Database, steps, done: list) -> None:
    for table, statements in steps:
        # ALTER TABLE commits by itself, so each table moves in one go, in order.
        with db.transaction() as cur:
            for sql in statements:
                cur.execute(sql)
        done.append(f"{table}: moved to the current layout")


def main() -> int:
    settings = load_settings()
    done = upgrade(Database(settings, 1))
    print("\n".join(done) if done else f"{settings.db_name}: already in the current layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
