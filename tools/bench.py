"""Benchmark the saga orchestrator: POST /start at several concurrency levels, with
faults off and with the seed's failure pattern, optionally against the seed's naive
design (bench/naive/) in the same run on the same machine, and a scale check against
100,000 sagas / 1,000,000 log rows.

    # against a system that is already running (faults are set through its API)
    .venv/bin/python tools/bench.py --url http://127.0.0.1:5000 --concurrency 1,8,32 --duration 15

    # naive vs ours, one private MariaDB, both systems started here, side by side
    .venv/bin/python tools/bench.py --with-naive --duration 15 --repeat 2

    # the same, plus variants of ours (other settings, or a copy of the code elsewhere)
    .venv/bin/python tools/bench.py --with-naive --variant 'w2;SAGA_WEB_WORKERS=2' \
        --variant 'exp;dir=/tmp/exp'

    # fill the database with 100k sagas / 1M log rows and compare with the empty one
    .venv/bin/python tools/bench.py --scale-check

    # profile ours at concurrency 8 with py-spy (pip install py-spy into .venv)
    .venv/bin/python tools/bench.py --with-naive --faults off --concurrency 8 --profile /tmp/prof

Every load run is bounded by --duration seconds (or --count requests) per level, and all
traffic goes to 127.0.0.1.
"""

import argparse
import collections
import http.client
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NAIVE_DIR = os.path.join(HERE, "bench", "naive")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "bench"))

SEED_FAULTS = {"A": {"mode": "fail", "every": 2}, "B": {"mode": "crash", "every": 2}}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- load ----------------------------------------------------------------------------------

class Result:
    def __init__(self, label, concurrency):
        self.label, self.concurrency = label, concurrency
        self.latencies = []          # seconds, every request
        self.ok_latencies = []       # seconds, 200 only
        self.codes = collections.Counter()
        self.elapsed = 0.0
        self.cpu = {}                # component -> CPU seconds during the run
        self.busy_cores = 0.0        # machine-wide, average cores busy
        self.other_cores = 0.0       # of which not this benchmark's processes
        self.db = {}                 # database server counters during the run
        self.note = ""

    @property
    def ok(self):
        return self.codes.get(200, 0)

    @property
    def requests(self):
        return sum(self.codes.values())

    @property
    def rate(self):
        return self.ok / self.elapsed if self.elapsed else 0.0

    def errors(self):
        return {code: n for code, n in self.codes.items() if code != 200}

    def pct(self, q, only_ok=False):
        data = sorted(self.ok_latencies if only_ok else self.latencies)
        if not data:
            return float("nan")
        k = min(len(data) - 1, max(0, int(round(q / 100 * len(data) + 0.5)) - 1))
        return data[k] * 1000


def drive(url, concurrency, duration=None, count=None, tag="", timeout=120, result=None):
    """POST /start from `concurrency` threads, each with its own kept-alive HTTP
    connection, until `duration` seconds pass or `count` requests were sent."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    path = (parts.path.rstrip("/") or "") + "/start"
    result = result or Result(tag, concurrency)
    numbers = itertools.count()
    started = time.monotonic()
    stop_at = started + duration if duration else None
    lock = threading.Lock()
    ends = []

    def worker():
        conn = None
        mine, mine_ok, codes = [], [], collections.Counter()
        while True:
            n = next(numbers)
            if count is not None and n >= count:
                break
            if stop_at is not None and time.monotonic() >= stop_at:
                break
            body = json.dumps({"username": f"bench-{tag}-{n}", "address": f"{n} Main St",
                               "payment": "Visa"})
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                conn.request("POST", path, body=body,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                code = resp.status
                if resp.will_close:
                    conn.close()
                    conn = None
            except Exception as exc:  # a dropped or refused connection is a result too
                code = type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
            dt = time.perf_counter() - t0
            mine.append(dt)
            codes[code] += 1
            if code == 200:
                mine_ok.append(dt)
        if conn is not None:
            conn.close()
        with lock:
            result.latencies.extend(mine)
            result.ok_latencies.extend(mine_ok)
            result.codes.update(codes)
            ends.append(time.monotonic())

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.elapsed = (max(ends) if ends else time.monotonic()) - started
    return result


# --- CPU accounting --------------------------------------------------------------------------

def _proc_stats():
    """pid -> (session id, CPU ticks of the process and its reaped children)."""
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        session = int(rest[3])
        ticks = sum(int(x) for x in rest[11:15])   # utime stime cutime cstime
        stats[int(name)] = (session, ticks)
    return stats


def _machine_ticks():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle


class CpuMeter:
    """CPU seconds used by groups of processes: each group is a set of session leaders
    (every process in their sessions counts, crashed workers included) or plain pids."""

    def __init__(self, groups):
        self.groups = groups          # name -> list of pids

    def sample(self):
        stats = _proc_stats()
        out = {}
        for name, pids in self.groups.items():
            pids = set(pids)
            out[name] = sum(t for pid, (sess, t) in stats.items() if pid in pids or sess in pids)
        out["_machine"] = _machine_ticks()
        out["_client"] = sum(os.times()[:2]) * CLK_TCK
        return out

    @staticmethod
    def diff(before, after, elapsed):
        cpu = {k: (after[k] - before[k]) / CLK_TCK for k in after if not k.startswith("_")}
        cpu["client"] = (after["_client"] - before["_client"]) / CLK_TCK
        busy = (after["_machine"] - before["_machine"]) / CLK_TCK / max(elapsed, 1e-9)
        return cpu, busy


DB_COUNTERS = ("Questions", "Com_admin_commands", "Com_commit", "Com_insert", "Com_update",
               "Com_select", "Connections", "Innodb_data_fsyncs")


def db_status(server):
    """The server's global counters (pings are counted in Com_admin_commands)."""
    if server is None:
        return None
    import mysql.connector
    conn = mysql.connector.connect(unix_socket=server.socket, user="root")
    try:
        cur = conn.cursor()
        cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN (%s)"
                    % ", ".join(f"'{k}'" for k in DB_COUNTERS))
        return {k: int(v) for k, v in cur.fetchall()}
    finally:
        conn.close()


def measured(target, concurrency, args, tag):
    meter = CpuMeter(target.cpu_groups())
    server = getattr(target, "server", None)
    if args.warmup:
        drive(target.url, concurrency, duration=args.warmup, tag=tag + "w")
    before, db_before = meter.sample(), db_status(server)
    r = Result(target.label, concurrency)
    drive(target.url, concurrency, duration=None if args.count else args.duration,
          count=args.count, tag=tag, result=r)
    after, db_after = meter.sample(), db_status(server)
    if db_before:
        # The status query itself is one connection and one statement: leave it out.
        r.db = {k: db_after[k] - db_before[k] - (1 if k in ("Questions", "Connections") else 0)
                for k in DB_COUNTERS}
    r.cpu, r.busy_cores = CpuMeter.diff(before, after, r.elapsed)
    r.other_cores = max(0.0, r.busy_cores - sum(r.cpu.values()) / max(r.elapsed, 1e-9))
    return r


# --- processes -------------------------------------------------------------------------------

def free_port():
    from launcher import free_port as fp
    return fp()


def wait_port(port, proc, timeout=30, what="process"):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not open port {port} in {timeout}s")


def http_json(method, url, body=None, timeout=30):
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else {}
        target = parts.path + ("?" + parts.query if parts.query else "")
        conn.request(method, target or "/", body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


class Running:
    """A system that is already running at --url: faults set through its API."""

    def __init__(self, url, label="system"):
        self.url, self.label = url.rstrip("/"), label

    def cpu_groups(self):
        return {}

    def set_faults(self, mode):
        ok = True
        for service in ("A", "B", "C"):
            fault = SEED_FAULTS.get(service, {"mode": "off"}) if mode == "seed" else {"mode": "off"}
            code, body = http_json("PUT", f"{self.url}/faults/{service}", fault)
            if code != 200:
                print(f"  ! PUT /faults/{service} -> {code} {body}", file=sys.stderr)
                ok = False
        return ok

    def settle(self, timeout=60):
        """Wait until no saga is being driven (after a faulty run, retries go on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                code, body = http_json("GET", self.url + "/health", timeout=5)
                if code == 200 and isinstance(body, dict) and not body.get("active_sagas"):
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        return False


class Ours(Running):
    """Our four processes (launcher.System) on their own database."""

    def __init__(self, label, server, dbname, logdir, code_dir=ROOT, env=None):
        import launcher
        self.label, self.server, self.dbname = label, server, dbname
        self.code_dir = code_dir
        launcher.ROOT = code_dir              # launcher runs <code_dir>/<name>.py
        self.logdir = os.path.join(logdir, label)
        os.makedirs(self.logdir, exist_ok=True)
        server.create_database(dbname)
        base = {"SAGA_DB_HOST": "127.0.0.1", "SAGA_DB_PORT": str(server.port),
                "SAGA_DB_USER": "saga", "SAGA_DB_PASSWORD": "saga", "SAGA_DB_NAME": dbname,
                "SAGA_FAULTS": "off"}
        self.system = launcher.System(self.logdir, {**base, **(env or {})})
        self.system.start()
        launcher.ROOT = ROOT
        self.url = self.system.url()

    def cpu_groups(self):
        groups = {name: [p.pid] for name, p in self.system.procs.items()}
        groups["mariadb"] = [self.server.proc.pid]
        return groups

    def root_pids(self):
        return {name: p.pid for name, p in self.system.procs.items()}

    def consistency(self):
        """All or nothing? Sagas by status, and business rows whose saga did not
        complete (there must be none once the system is quiet)."""
        self.settle()
        q = lambda sql: root_query(self.server, self.dbname, sql)
        by_status = dict(q("SELECT status, COUNT(*) FROM SAGA GROUP BY status"))
        orphans = {t: q(f"SELECT COUNT(*) FROM {t} x LEFT JOIN SAGA s ON s.id = x.saga_id "
                        f"WHERE s.status IS NULL OR s.status <> 'COMPLETED'")[0][0]
                   for t in ("TABLE_A", "TABLE_B", "TABLE_C")}
        incomplete = q("SELECT COUNT(*) FROM SAGA s WHERE s.status = 'COMPLETED' AND ("
                       + " OR ".join(f"NOT EXISTS (SELECT 1 FROM {t} x WHERE x.saga_id = s.id)"
                                     for t in ("TABLE_A", "TABLE_B", "TABLE_C")) + ")")[0][0]
        return (f"sagas {by_status}; business rows of sagas that did not complete: {orphans}; "
                f"completed sagas missing a row: {incomplete}")

    def stop(self):
        self.system.stop()


class Naive:
    """The seed's design (bench/naive/): four Flask development servers."""

    NAMES = ("orchestrator", "service_a", "service_b", "service_c")

    def __init__(self, server, dbname, logdir, label="naive"):
        self.label, self.server, self.dbname = label, server, dbname
        self.logdir = os.path.join(logdir, label)
        os.makedirs(self.logdir, exist_ok=True)
        create_naive_database(server, dbname)
        self.ports = {name: free_port() for name in self.NAMES}
        self.url = f"http://127.0.0.1:{self.ports['orchestrator']}"
        self.procs = {}
        self.faults = "off"

    def env(self):
        p = self.ports
        return {**os.environ, "PYTHONUNBUFFERED": "1",
                "NAIVE_DB_HOST": "127.0.0.1", "NAIVE_DB_PORT": str(self.server.port),
                "NAIVE_DB_USER": "naive", "NAIVE_DB_PASSWORD": "naive",
                "NAIVE_DB_NAME": self.dbname, "NAIVE_FAULTS": self.faults,
                "NAIVE_ORCHESTRATOR_PORT": str(p["orchestrator"]),
                "NAIVE_SERVICE_A_PORT": str(p["service_a"]),
                "NAIVE_SERVICE_B_PORT": str(p["service_b"]),
                "NAIVE_SERVICE_C_PORT": str(p["service_c"]),
                # The seed's URLs name localhost; /etc/hosts maps it to 127.0.0.1 here.
                "NAIVE_SERVICE_A_URL": f"http://localhost:{p['service_a']}",
                "NAIVE_SERVICE_B_URL": f"http://localhost:{p['service_b']}",
                "NAIVE_SERVICE_C_URL": f"http://localhost:{p['service_c']}"}

    def start(self):
        env = self.env()
        for name in self.NAMES:
            log = open(os.path.join(self.logdir, f"{name}.log"), "ab")
            self.procs[name] = subprocess.Popen(
                [sys.executable, os.path.join(NAIVE_DIR, f"{name}.py")], cwd=NAIVE_DIR,
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
        for name in self.NAMES:
            wait_port(self.ports[name], self.procs[name], what=f"naive {name}")
        return self

    def stop(self):
        for name, proc in self.procs.items():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.procs = {}

    def set_faults(self, mode):
        """The seed's counters are fixed at start: restart with NAIVE_FAULTS."""
        if mode != self.faults or not self.procs:
            self.stop()
            self.faults = mode
            self.start()
        return True

    def settle(self, timeout=0):
        return True

    def consistency(self):
        """The seed keeps no saga state: count registrations left half done (a user
        without an address or a payment method) from the business tables."""
        q = lambda sql: root_query(self.server, self.dbname, sql)
        a, b, c = (q(f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("TABLE_A", "TABLE_B", "TABLE_C"))
        partial = q("SELECT COUNT(*) FROM TABLE_A a WHERE NOT EXISTS (SELECT 1 FROM TABLE_C c "
                    "WHERE c.user_id = a.id)")[0][0]
        failed = q("SELECT COUNT(*) FROM SAGA_LOG WHERE status = 'failed'")[0][0]
        return (f"rows A={a} B={b} C={c}; users left without a payment method (half-done "
                f"registrations, never undone): {partial}; SAGA_LOG 'failed' rows: {failed}")

    def cpu_groups(self):
        groups = {name: [p.pid] for name, p in self.procs.items()}
        groups["mariadb"] = [self.server.proc.pid]
        return groups


def create_naive_database(server, dbname):
    server.root(f"DROP DATABASE IF EXISTS `{dbname}`",
                f"CREATE DATABASE `{dbname}`",
                "CREATE USER IF NOT EXISTS 'naive'@'127.0.0.1' IDENTIFIED BY 'naive'",
                f"GRANT ALL PRIVILEGES ON `{dbname}`.* TO 'naive'@'127.0.0.1'")
    from launcher import find_binary
    with open(os.path.join(NAIVE_DIR, "schema.sql"), "rb") as schema:
        subprocess.run([find_binary("mariadb", "mysql"), "--no-defaults", "-h127.0.0.1",
                        f"-P{server.port}", "-unaive", "-pnaive", dbname],
                       stdin=schema, check=True)


def root_query(server, dbname, sql):
    import mysql.connector
    conn = mysql.connector.connect(unix_socket=server.socket, user="root", database=dbname)
    try:
        cur = conn.cursor()
        cur.execute(sql)
        return cur.fetchall()
    finally:
        conn.close()


def start_mariadb(basedir):
    from launcher import PrivateMariaDB
    server = PrivateMariaDB(basedir)
    server.install()
    server.start()
    return server


# --- reporting -------------------------------------------------------------------------------

def fmt_codes(codes):
    return ", ".join(f"{k}:{v}" for k, v in sorted(codes.items(), key=lambda kv: str(kv[0]))) or "0"


def print_result(r, file=sys.stdout):
    per = max(r.ok, 1)
    cpu = " ".join(f"{k.replace('service_', '')}={v / per * 1000:.1f}"
                   for k, v in r.cpu.items()) if r.cpu else ""
    print(f"  {r.label:>10} c={r.concurrency:<3} {r.rate:8.1f} sagas/s  "
          f"p50 {r.pct(50):7.1f}  p95 {r.pct(95):7.1f}  p99 {r.pct(99):7.1f} ms  "
          f"ok {r.ok:6d}  errors {fmt_codes(r.errors())}"
          + (f"  | cpu ms/saga {cpu} | machine busy {r.busy_cores:.2f} cores"
             + (f", {r.other_cores:.2f} not ours" if len(r.cpu) > 1 else "") if cpu else ""),
          file=file, flush=True)


def merge(results):
    """Pool rounds of one (system, level): median rate, pooled latencies and codes."""
    m = Result(results[0].label, results[0].concurrency)
    for r in results:
        m.latencies += r.latencies
        m.ok_latencies += r.ok_latencies
        m.codes.update(r.codes)
    m.rates = [r.rate for r in results]
    m.median_rate = statistics.median(m.rates)
    cpu_keys = set().union(*(r.cpu for r in results))
    total_ok = sum(r.ok for r in results) or 1
    m.cpu_per_saga = {k: sum(r.cpu.get(k, 0) for r in results) / total_ok * 1000 for k in cpu_keys}
    m.busy = statistics.mean(r.busy_cores for r in results)
    m.db_per_saga = {k: sum(r.db.get(k, 0) for r in results) / total_ok
                     for k in DB_COUNTERS} if any(r.db for r in results) else {}
    m.other = statistics.mean(r.other_cores for r in results)
    return m


def print_table(table, labels, levels, faults_modes):
    base = labels[0]
    for faults in faults_modes:
        print(f"\n=== faults {faults} ({'seed pattern: A fails every 2nd, B crashes after every 2nd commit' if faults == 'seed' else 'no injected faults'}) ===")
        head = f"{'c':>3} {'system':>10} {'sagas/s':>9} {'ratio':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  {'rounds sagas/s':<22} errors"
        print(head)
        print("-" * len(head))
        for c in levels:
            ref = table.get((faults, base, c))
            for label in labels:
                m = table.get((faults, label, c))
                if m is None:
                    continue
                ratio = m.median_rate / ref.median_rate if ref and ref.median_rate else float("nan")
                rounds = "/".join(f"{x:.0f}" for x in m.rates)
                print(f"{c:>3} {label:>10} {m.median_rate:9.1f} {ratio:6.2f} {m.pct(50):8.1f} "
                      f"{m.pct(95):8.1f} {m.pct(99):8.1f}  {rounds:<22} {fmt_codes(m.errors())}")
        print("\n  CPU ms per completed saga (all rounds; lower is better, and unlike sagas/s it\n"
              "  does not depend on what else the machine runs), machine busy cores:")
        for c in levels:
            for label in labels:
                m = table.get((faults, label, c))
                if m is None:
                    continue
                parts = " ".join(f"{k.replace('service_', '').replace('orchestrator', 'orch')}={v:.1f}"
                                 for k, v in sorted(m.cpu_per_saga.items()))
                total = sum(v for k, v in m.cpu_per_saga.items() if k != "client")
                print(f"  c={c:<3} {label:>10}: {parts}  servers+db={total:.1f}  "
                      f"busy={m.busy:.2f} cores (other processes {m.other:.2f})")
        print("\n  Database work per completed saga (statements, pings, commits, new connections, "
              "log fsyncs):")
        for c in levels:
            for label in labels:
                m = table.get((faults, label, c))
                if m is None or not m.db_per_saga:
                    continue
                d = m.db_per_saga
                print(f"  c={c:<3} {label:>10}: statements={d['Questions']:.1f} "
                      f"pings={d['Com_admin_commands']:.1f} commits={d['Com_commit']:.1f} "
                      f"insert={d['Com_insert']:.1f} update={d['Com_update']:.1f} "
                      f"select={d['Com_select']:.1f} connections={d['Connections']:.2f} "
                      f"fsyncs={d['Innodb_data_fsyncs']:.2f}")


# --- scale check -----------------------------------------------------------------------------

READ_PATHS = ["/sagas", "/sagas?status=RUNNING", "/sagas?status=COMPENSATING",
              "/sagas?status=FAILED", "/sagas?status=COMPLETED", "/sagas?status=COMPENSATED",
              "/sagas?username={username}", "/sagas?offset=5000", "/sagas?status=COMPLETED&offset=5000",
              "/sagas/{saga}", "/sagas/{saga}/status", "/log", "/log?after={log_id}", "/health"]


def read_latencies(url, fill, n):
    """Sequential GETs over one kept-alive connection: p50/p95/max ms per path."""
    parts = urllib.parse.urlsplit(url)
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
    the real statements (whatever saga.py / orchestrator.py look like today)."""

    def __init__(self, *args, **kwargs):
        self.log = []

    def transaction(self, **_options):
        import contextlib

        @contextlib.contextmanager
        def tx():
            yield _RecordingCursor(self.log)
        return tx()

    connection = transaction

    def ping(self):
        return True


def captured_sql(code_dir, fill):
    """(label, sql, params) of the recovery scan and the list queries, from the code."""
    out = []
    sys.path.insert(0, code_dir)
    try:
        import common
        import saga as saga_mod
        settings = common.load_settings()
        db = _RecordingDatabase()
        saga_mod.SagaStore(db, settings, "bench").claim_expired(50)
        if db.log:
            out.append(("recovery scan (SagaStore.claim_expired)",) + db.log[0])
        try:
            import orchestrator
            real = orchestrator.Database
            rec = _RecordingDatabase()
            orchestrator.Database = lambda settings: rec
            try:
                app = orchestrator.create_app(settings, start_background=False)
                client = app.test_client()
                for path in ("/sagas?status=RUNNING", "/sagas", "/sagas?username={username}",
                             "/sagas?offset=5000", "/sagas?status=COMPLETED&offset=5000",
                             "/log?after={log_id}"):
                    before = len(rec.log)
                    client.get(path.format(**fill))
                    if len(rec.log) > before:
                        out.append((f"GET {path}",) + rec.log[before])
            finally:
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


def scale_check(server, logdir, args, variant):
    import mysql.connector
    import generate
    label, code_dir, env = variant
    print(f"\n##### scale check ({label}) #####", flush=True)
    ours = Ours("scale", server, "scale_db", logdir, code_dir, env)
    try:
        fill = {"username": "user50000", "saga": "none", "log_id": 0}
        print("\n-- empty database", flush=True)
        r_empty = measured(ours, 8, args, "scale-empty")
        print_result(r_empty)
        reads_empty = read_latencies(ours.url, {"username": "bench-scale-empty-1",
                                                "saga": "x", "log_id": 0}, args.reads)
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
        reads_full = read_latencies(ours.url, fill, args.reads)
        print(f"\n  throughput at c=8: empty {r_empty.rate:.1f} sagas/s (p99 {r_empty.pct(99):.1f} ms)"
              f" -> full {r_full.rate:.1f} sagas/s (p99 {r_full.pct(99):.1f} ms), "
              f"ratio {r_full.rate / max(r_empty.rate, 1e-9):.2f}")
        print(f"\n  GET latency, {args.reads} sequential requests each (ms):")
        print(f"  {'path':<40} {'empty p50':>9} {'p95':>7} {'max':>7} | {'full p50':>9} {'p95':>7} {'max':>7}  codes(full)")
        for path in READ_PATHS:
            e, f = reads_empty[path], reads_full[path]
            print(f"  {path:<40} {e[0]:9.1f} {e[1]:7.1f} {e[2]:7.1f} | {f[0]:9.1f} {f[1]:7.1f} {f[2]:7.1f}  {f[3]}")
        explain(server, "scale_db", captured_sql(code_dir, fill))
    finally:
        ours.stop()


# --- profiling -------------------------------------------------------------------------------

def profile_run(ours, args, outdir):
    """Two runs at --profile-level: py-spy samples of the thread holding the GIL (where
    the Python CPU goes), then wall-clock samples of every thread (--idle: where they
    wait)."""
    pyspy = shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep
                         + os.environ.get("PATH", ""))
    if not pyspy:
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return
    os.makedirs(outdir, exist_ok=True)
    for kind, extra in (("gil", ["--gil"]), ("wall", ["--idle"])):
        spies = []
        for name, pid in ours.root_pids().items():
            out = os.path.join(outdir, f"{name}.{kind}.txt")
            spies.append(subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
                 "--rate", str(args.profile_rate), "--format", "raw", "--duration", str(int(args.duration) + 1),
                 "-o", out, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        r = measured(ours, args.profile_level, args, f"prof-{kind}")
        r.label = f"prof-{kind}"
        print_result(r)
        for s in spies:
            try:
                s.wait(30)
            except subprocess.TimeoutExpired:
                s.terminate()
                s.wait(10)
    import profile_report
    for kind in ("gil", "wall"):
        for name in ours.root_pids():
            path = os.path.join(outdir, f"{name}.{kind}.txt")
            if os.path.exists(path):
                profile_report.report(path, top=args.profile_top)


# --- main ------------------------------------------------------------------------------------

def parse_variant(spec):
    """'label;dir=/path;KEY=VALUE;...' -> (label, code_dir, env)."""
    parts = [p for p in spec.split(";") if p]
    label, code_dir, env = parts[0], HERE, {}
    for p in parts[1:]:
        key, _, value = p.partition("=")
        if key == "dir":
            code_dir = os.path.abspath(value)
        else:
            env[key] = value
    return label, code_dir, env


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--url", default="http://127.0.0.1:5000",
                   help="a running orchestrator (ignored with --with-naive/--scale-check)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    p.add_argument("--count", type=int, help="requests per level instead of --duration")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load first")
    p.add_argument("--faults", default="off,seed", help="off, seed or off,seed")
    p.add_argument("--repeat", type=int, default=1, help="rounds (median sagas/s reported)")
    p.add_argument("--with-naive", action="store_true",
                   help="start a private MariaDB, the naive design and ours; compare")
    p.add_argument("--no-naive", action="store_true",
                   help="with --with-naive's setup, run only the variants of ours")
    p.add_argument("--variant", action="append", default=[],
                   help="'label;dir=PATH;ENV=VALUE;...' a variant of ours (repeatable)")
    p.add_argument("--scale-check", action="store_true")
    p.add_argument("--scale-sagas", type=int, default=100_000)
    p.add_argument("--scale-log-rows", type=int, default=1_000_000)
    p.add_argument("--reads", type=int, default=50, help="GETs per path in the scale check")
    p.add_argument("--profile", metavar="DIR", help="py-spy profile of ours into DIR")
    p.add_argument("--profile-level", type=int, default=8)
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    args = p.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x]
    faults_modes = [x for x in args.faults.split(",") if x]
    if args.duration > 120 or (args.count or 0) > 100_000:
        p.error("keep runs bounded: --duration at most 120 s, --count at most 100000")

    if not (args.with_naive or args.scale_check or args.profile or args.no_naive):
        target = Running(args.url)
        for faults in faults_modes:
            print(f"\n=== {args.url} faults {faults} ===", flush=True)
            if not target.set_faults(faults):
                print("  (could not set faults; skipping)")
                continue
            for c in levels:
                for i in range(args.repeat):
                    print_result(measured(target, c, args, f"{faults}{c}r{i}"))
                target.settle()
        target.set_faults("off")
        return

    variants = [parse_variant(v) for v in args.variant] or [("ours", HERE, {})]
    tmp = tempfile.mkdtemp(prefix="saga-bench-")
    logdir = os.path.join(tmp, "logs")
    os.makedirs(logdir)
    print(f"temp dir {tmp} (logs in {logdir})", flush=True)
    server = systems = None
    try:
        server = start_mariadb(os.path.join(tmp, "mariadb"))
        print(f"private MariaDB on 127.0.0.1:{server.port}", flush=True)
        if args.with_naive or args.no_naive or args.profile:
            systems = []
            if args.with_naive and not args.no_naive:
                systems.append(Naive(server, "naive_db", logdir).start())
            for i, (label, code_dir, env) in enumerate(variants):
                systems.append(Ours(label, server, f"ours_db_{i}", logdir, code_dir, env))
            labels = [s.label for s in systems]
            print("systems: " + ", ".join(f"{s.label} at {s.url}" for s in systems), flush=True)
            table = {}
            for faults in faults_modes:
                print(f"\n--- faults {faults} ---", flush=True)
                rounds = collections.defaultdict(list)
                for i in range(args.repeat):
                    for c in levels:
                        # Interleave systems per level so background load hits both alike.
                        order = systems if i % 2 == 0 else list(reversed(systems))
                        for s in order:
                            s.set_faults(faults)
                            s.settle()
                            r = measured(s, c, args, f"{s.label}-{faults}-{c}-{i}")
                            print_result(r)
                            rounds[(faults, s.label, c)].append(r)
                            s.settle()
                for s in systems:
                    s.set_faults("off")
                for key, rs in rounds.items():
                    table[key] = merge(rs)
            print_table(table, labels, levels, faults_modes)
            print("\n  Outcome in each database after all runs (all or nothing?):")
            for s in systems:
                try:
                    print(f"  {s.label:>10}: {s.consistency()}")
                except Exception as exc:
                    print(f"  {s.label:>10}: could not check: {exc!r}")
            if args.profile:
                ours = next(s for s in systems if isinstance(s, Ours))
                print(f"\n##### profile of {ours.label} at c={args.profile_level} #####")
                for s in systems:
                    if s is not ours and isinstance(s, Naive):
                        s.stop()
                profile_run(ours, args, args.profile)
            for s in systems:
                s.stop()
            systems = None
        if args.scale_check:
            scale_check(server, logdir, args, variants[0])
    finally:
        for s in systems or []:
            try:
                s.stop()
            except Exception as exc:
                print(f"stopping {s.label}: {exc!r}", file=sys.stderr)
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
