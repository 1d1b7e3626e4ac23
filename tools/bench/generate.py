"""Fill a saga database (schema.sql applied) with a realistic history, fast: SAGA rows in
every state, SAGA_LOG rows to match, and the business rows and ledger keys of the
completed and compensated ones. Everything is INSERT ... SELECT over MariaDB's SEQUENCE
engine (seq_1_to_N), in chunks, so 100,000 sagas and 1,000,000 log rows take seconds.

    python tools/bench/generate.py --port 3306 --user saga --password saga --database saga_db \
        --sagas 100000 --log-rows 1000000

Mix: 89% COMPLETED, 7% COMPENSATED, 2% FAILED, 1% COMPENSATING, 1% RUNNING. The
unfinished ones hold a live lease (owner 'generator', a day ahead), the way another
orchestrator's sagas in flight would: the recovery scan must step over them through its
index without claiming them.
"""

import argparse
import os
import sys
import time
import uuid

import mysql.connector

# seq % 100 -> status
STATUS_CASE = ("CASE WHEN s.seq % 100 < 89 THEN 'COMPLETED' "
               "WHEN s.seq % 100 < 96 THEN 'COMPENSATED' "
               "WHEN s.seq % 100 < 98 THEN 'FAILED' "
               "WHEN s.seq % 100 < 99 THEN 'COMPENSATING' ELSE 'RUNNING' END")
COMPLETED_WHERE = "s.seq % 100 < 89"
COMPENSATED_WHERE = "s.seq % 100 BETWEEN 89 AND 95"


def connect(args):
    return mysql.connector.connect(host=args.host, port=args.port, user=args.user,
                                   password=args.password, database=args.database,
                                   autocommit=False, charset="utf8mb4",
                                   collation="utf8mb4_unicode_ci")


def fill(conn, sagas=100_000, log_rows=1_000_000, chunk=10_000, out=sys.stdout):
    """Insert `sagas` sagas and about `log_rows` SAGA_LOG rows; returns a dict of what
    was made (the id prefix, a sample username, counts, seconds)."""
    started = time.monotonic()
    per_saga = max(1, log_rows // sagas)
    prefix = uuid.uuid4().hex[:8] + "-0000-4000-8000-"        # + 12 digits = 36 chars
    cur = conn.cursor()
    cur.execute("SELECT COALESCE(MAX(id), 0) FROM TABLE_A")
    (base_a,) = cur.fetchone()
    cur.execute("SELECT COALESCE(MAX(id), 0) FROM TABLE_B")
    (base_b,) = cur.fetchone()
    cur.execute("SELECT COALESCE(MAX(id), 0) FROM TABLE_C")
    (base_c,) = cur.fetchone()
    # Spread creation over the past 30 days, oldest first.
    spread = max(1, (30 * 86400 * 1000) // sagas)              # ms between sagas
    sid = f"CONCAT('{prefix}', LPAD(s.seq, 12, '0'))"
    created = f"(NOW(3) - INTERVAL (({sagas} - s.seq + 1) * {spread}) * 1000 MICROSECOND)"
    counts = {"SAGA": 0, "SAGA_LOG": 0, "TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0,
              "STEP_LEDGER": 0}
    for lo in range(1, sagas + 1, chunk):
        hi = min(sagas, lo + chunk - 1)
        seq = f"seq_{lo}_to_{hi} s"
        statements = [
            ("SAGA", f"""
            INSERT INTO SAGA (id, type, mode, transport, status, step, attempt, input, label,
                results, failed_step, reason, rejected, next_attempt_at, compensate_until,
                lease_owner, lease_until, fence, created_at, updated_at)
            SELECT {sid}, 'registration', 'orchestration', 'http', {STATUS_CASE},
                CASE WHEN s.seq % 100 < 89 THEN 2 ELSE s.seq % 3 END,
                1 + (s.seq % 3 = 0),
                CONCAT('{{"username": "user', s.seq, '", "address": "', s.seq,
                       ' Main St", "payment": "', ELT(1 + s.seq % 3, 'Visa', 'Mastercard', 'Amex'),
                       '"}}'),
                CONCAT('user', s.seq),
                IF(s.seq % 100 < 89, CONCAT('{{"A": {{"user_id": ', {base_a} + s.seq,
                   '}}, "B": {{"address_id": ', {base_b} + s.seq,
                   '}}, "C": {{"payment_id": ', {base_c} + s.seq, '}}}}'), '{{}}'),
                IF(s.seq % 100 < 89, NULL, ELT(1 + s.seq % 3, 'A', 'B', 'C')),
                IF(s.seq % 100 < 89, NULL, 'B failed: HTTP 500: injected failure'),
                0, {created}, IF(s.seq % 100 < 89, NULL, {created} + INTERVAL 60 SECOND),
                IF(s.seq % 100 >= 98, 'generator', NULL),
                IF(s.seq % 100 >= 98, NOW(3) + INTERVAL 1 DAY, {created}),
                1, {created}, {created} + INTERVAL 50000 MICROSECOND
            FROM {seq}"""),
            ("SAGA_LOG", f"""
            INSERT INTO SAGA_LOG (saga_id, service, status, message, created_at, step,
                action, attempt, http_status, elapsed_ms)
            SELECT {sid},
                IF(k.seq = 1 OR k.seq = {per_saga}, 'SAGA',
                   ELT(1 + (k.seq * 3 DIV ({per_saga} + 1)) % 3, 'A', 'B', 'C')),
                IF(k.seq = 1, 'STARTED', IF(k.seq = {per_saga}, {STATUS_CASE}, 'success')),
                IF(k.seq = 1, 'saga started', 'committed (user_id=1)'),
                {created} + INTERVAL (k.seq * 5000) MICROSECOND,
                IF(k.seq = 1 OR k.seq = {per_saga}, NULL, 1 + (k.seq * 3 DIV ({per_saga} + 1)) % 3),
                IF(k.seq = 1 OR k.seq = {per_saga}, NULL, 'invoke'),
                IF(k.seq = 1 OR k.seq = {per_saga}, NULL, 1),
                IF(k.seq = 1 OR k.seq = {per_saga}, NULL, 200),
                IF(k.seq = 1 OR k.seq = {per_saga}, NULL, 3)
            FROM {seq} CROSS JOIN seq_1_to_{per_saga} k"""),
            ("TABLE_A", f"""
            INSERT INTO TABLE_A (id, saga_id, username)
            SELECT {base_a} + s.seq, {sid}, CONCAT('user', s.seq)
            FROM {seq} WHERE {COMPLETED_WHERE}"""),
            ("TABLE_B", f"""
            INSERT INTO TABLE_B (id, saga_id, user_id, address)
            SELECT {base_b} + s.seq, {sid}, {base_a} + s.seq, CONCAT(s.seq, ' Main St')
            FROM {seq} WHERE {COMPLETED_WHERE}"""),
            ("TABLE_C", f"""
            INSERT INTO TABLE_C (id, saga_id, user_id, payment_method)
            SELECT {base_c} + s.seq, {sid}, {base_a} + s.seq, ELT(1 + s.seq % 3, 'Visa', 'Mastercard', 'Amex')
            FROM {seq} WHERE {COMPLETED_WHERE}"""),
            ("STEP_LEDGER", f"""
            INSERT INTO STEP_LEDGER (service, saga_id, op, state)
            SELECT p.svc, {sid}, p.op, IF({COMPLETED_WHERE}, 'invoked', 'compensated')
            FROM {seq} CROSS JOIN (SELECT 'A' AS svc, 'user' AS op UNION ALL
                                   SELECT 'B', 'address' UNION ALL SELECT 'C', 'payment') p
            WHERE {COMPLETED_WHERE} OR {COMPENSATED_WHERE}"""),
        ]
        for table, sql in statements:
            cur.execute(sql)
            counts[table] += cur.rowcount
        conn.commit()
        print(f"  generated sagas {lo}..{hi} ({time.monotonic() - started:.1f} s)",
              file=out, flush=True)
    for table in counts:
        cur.execute(f"ANALYZE TABLE {table}")
        cur.fetchall()
    cur.close()
    return {"prefix": prefix, "sample_username": f"user{sagas // 2}",
            "sample_saga": f"{prefix}{sagas // 2:012d}", "counts": counts,
            "seconds": time.monotonic() - started}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=os.environ.get("SAGA_DB_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("SAGA_DB_PORT", "3306")))
    p.add_argument("--user", default=os.environ.get("SAGA_DB_USER", "saga"))
    p.add_argument("--password", default=os.environ.get("SAGA_DB_PASSWORD", "saga"))
    p.add_argument("--database", default=os.environ.get("SAGA_DB_NAME", "saga_db"))
    p.add_argument("--sagas", type=int, default=100_000)
    p.add_argument("--log-rows", type=int, default=1_000_000)
    p.add_argument("--chunk", type=int, default=10_000)
    args = p.parse_args()
    conn = connect(args)
    try:
        made = fill(conn, args.sagas, args.log_rows, args.chunk)
    finally:
        conn.close()
    print(f"made {made['counts']} in {made['seconds']:.1f} s")


if __name__ == "__main__":
    main()
