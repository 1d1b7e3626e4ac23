"""The scale check of tools/bench.py: ours at 8 connections and the read API's latency on
an empty database, then again after generate.py filled it with 100,000 sagas and
1,000,000 SAGA_LOG rows, plus EXPLAIN/ANALYZE of the statements the code really runs
(the recovery scan, the list and log queries), captured from the code itself."""

import collections
import contextlib
import http.client
import json
import logging
import sys
import time
import urllib.parse

from systems import ROOT, Ours

READ_PATHS = ["/sagas", "/sagas?status=RUNNING", "/sagas?status=COMPENSATING",
              "/sagas?status=FAILED", "/sagas?status=COMPLETED", "/sagas?status=COMPENSATED",
              "/sagas?username={username}", "/sagas?offset=5000",
              "/sagas?status=COMPLETED&offset=5000", "/sagas/{saga}", "/sagas/{saga}/status",
              "/log", "/log?after={log_id}", "/health"]


def read_latencies(base, fill, n):
    """Sequential GETs over one kept-alive connection: p50/p95/max ms per path."""
    parts = urllib.parse.urlsplit(base)
    out = {}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    for template in READ_PATHS:
        path = template.format(**fill)
        times, codes = [], collections.Counter()
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            times.append((time.perf_counter() - t0) * 1000)
            codes[resp.status] += 1
        times.sort()
        out[template] = (times[len(times) // 2], times[int(len(times) * 0.95) - 1 if n >= 20 else -1],
                         times[-1], dict(codes))
    conn.close()
    return out


class _RecordingCursor:
    def __init__(self, log):
        self.log, self.rowcount, self.lastrowid = log, 0, None

    def execute(self, sql, params=()):
        self.log.append((sql, tuple(params)))

    def executemany(self, sql, rows):
        pass

    def fetchall(self):
        return []

    def fetchone(self):
        return None

    def close(self):
        pass


class _RecordingDatabase:
    """Stands in for common.Database to capture the SQL the code runs, so EXPLAIN sees
    the real statements, whatever saga/store.py looks like today."""

    def __init__(self, *args, **kwargs):
        self.log = []

    @contextlib.contextmanager
    def transaction(self, read_committed=False):
        yield _RecordingCursor(self.log)

    def run(self, work, **_options):
        with self.transaction() as cur:
            return work(cur)

    def ping(self):
        return True


def captured_sql(code_dir, fill):
    """(label, sql, params) of the recovery scan and the list queries, from the code."""
    out = []
    sys.path.insert(0, code_dir)
    try:
        from saga import common
        from saga.store import SagaStore
        settings = common.load_settings()
        db = _RecordingDatabase()
        SagaStore(db, "bench", 2.0, 60.0).claim_expired(50)
        if db.log:
            out.append(("recovery scan (SagaStore.claim_expired)",) + db.log[0])
        try:
            import orchestrator
            real = orchestrator.Database
            rec = _RecordingDatabase()
            orchestrator.Database = lambda *a, **k: rec
            try:
                app = orchestrator.create_app(settings, start_background=False)
                client = app.test_client()
                # A handler fed no rows may fail after its query ran: only the SQL matters.
                logging.disable(logging.CRITICAL)
                for path in ("/sagas?status=RUNNING", "/sagas", "/sagas?username={username}",
                             "/sagas?offset=5000", "/sagas?status=COMPLETED&offset=5000",
                             "/log?after={log_id}"):
                    before = len(rec.log)
                    client.get(path.format(**fill))
                    if len(rec.log) > before:
                        out.append((f"GET {path}",) + rec.log[before])
            finally:
                logging.disable(logging.NOTSET)
                orchestrator.Database = real
        except Exception as exc:  # the EXPLAIN of the scan is what matters most
            print(f"  (could not capture the list queries: {exc!r})")
    finally:
        sys.path.remove(code_dir)
    return out


def explain(server, dbname, statements):
    import mysql.connector
    conn = mysql.connector.connect(host="127.0.0.1", port=server.port, user="saga",
                                   password="saga", database=dbname)
    try:
        cur = conn.cursor()
        for label, sql, params in statements:
            print(f"\n  EXPLAIN {label}:\n    {sql}\n    params={params}")
            cur.execute("EXPLAIN " + sql, params)
            cols = [d[0] for d in cur.description]
            for row in cur.fetchall():
                print("    " + "  ".join(f"{c}={v}" for c, v in zip(cols, row)
                                         if c in ("table", "type", "key", "key_len", "rows", "Extra")))
            timings = []
            for _ in range(20):
                t0 = time.perf_counter()
                cur.execute(sql, params)
                cur.fetchall()
                conn.rollback()
                timings.append((time.perf_counter() - t0) * 1000)
            timings.sort()
            cur.execute("ANALYZE FORMAT=JSON " + sql, params)
            plan = json.loads(cur.fetchall()[0][0])
            conn.rollback()
            examined = [(t.get("table_name"), t.get("r_rows"), t.get("access_type"))
                        for t in _tables(plan)]
            print(f"    ANALYZE: rows actually read {examined}; "
                  f"run time p50 {timings[10]:.2f} ms, max {timings[-1]:.2f} ms (20 runs)")
    finally:
        conn.close()


def _tables(node):
    if isinstance(node, dict):
        if "table" in node and isinstance(node["table"], dict):
            yield node["table"]
        for v in node.values():
            yield from _tables(v)
    elif isinstance(node, list):
        for v in node:
            yield from _tables(v)


def scale_check(server, logdir, args, variant, measured, print_result):
    import mysql.connector
    import generate
    label, code_dir, env = variant
    print(f"\n##### scale check ({label}) #####", flush=True)
    ours = Ours("scale", server, "scale_db", logdir, code_dir or ROOT, env).ready()
    try:
        print("\n-- empty database", flush=True)
        r_empty = measured(ours, 8, args, "scale-empty")
        print_result(r_empty)
        reads_empty = read_latencies(ours.base, {"username": "john_doe", "saga": "x",
                                                 "log_id": 0}, args.reads)
        conn = mysql.connector.connect(host="127.0.0.1", port=server.port, user="saga",
                                       password="saga", database="scale_db")
        print(f"\n-- generating {args.scale_sagas} sagas, {args.scale_log_rows} SAGA_LOG rows",
              flush=True)
        made = generate.fill(conn, args.scale_sagas, args.scale_log_rows)
        cur = conn.cursor()
        for t in ("SAGA", "SAGA_LOG", "TABLE_A", "TABLE_B", "TABLE_C", "STEP_LEDGER"):
            cur.execute(f"SELECT COUNT(*) FROM {t}")
            print(f"  {t}: {cur.fetchone()[0]} rows")
        cur.execute("SELECT status, COUNT(*) FROM SAGA GROUP BY status")
        print(f"  SAGA by status: {dict(cur.fetchall())}")
        cur.execute("SELECT MAX(id) - 500 FROM SAGA_LOG")
        log_id = cur.fetchone()[0]
        conn.close()
        print(f"  generated in {made['seconds']:.1f} s", flush=True)
        fill = {"username": made["sample_username"], "saga": made["sample_saga"],
                "log_id": log_id}
        print("\n-- full database", flush=True)
        r_full = measured(ours, 8, args, "scale-full")
        print_result(r_full)
        reads_full = read_latencies(ours.base, fill, args.reads)
        print(f"\n  throughput at c=8: empty {r_empty.rate:.1f} sagas/s (p99 {r_empty.pct[99]:.1f} ms)"
              f" -> full {r_full.rate:.1f} sagas/s (p99 {r_full.pct[99]:.1f} ms), "
              f"ratio {r_full.rate / max(r_empty.rate, 1e-9):.2f}")
        print(f"\n  GET latency, {args.reads} sequential requests each (ms):")
        print(f"  {'path':<40} {'empty p50':>9} {'p95':>7} {'max':>7} | {'full p50':>9} {'p95':>7} {'max':>7}  codes(full)")
        for path in READ_PATHS:
            e, f = reads_empty[path], reads_full[path]
            print(f"  {path:<40} {e[0]:9.1f} {e[1]:7.1f} {e[2]:7.1f} | {f[0]:9.1f} {f[1]:7.1f} {f[2]:7.1f}  {f[3]}")
        explain(server, "scale_db", captured_sql(code_dir or ROOT, fill))
    finally:
        ours.stop()
