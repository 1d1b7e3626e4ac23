"""The systems tools/bench.py measures: ours (the four processes, on a private MariaDB,
with a private Kafka or RabbitMQ when the transport or mode needs one), the seed's naive
design (bench/naive/), or a system already running at some URL."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))      # tools/bench
TOOLS = os.path.dirname(HERE)
ROOT = os.path.dirname(TOOLS)                           # the project
NAIVE_DIR = os.path.join(HERE, "naive")
for path in (TOOLS,):
    if path not in sys.path:
        sys.path.insert(0, path)
sys.path.append(ROOT)   # the project's own constants, not restated here

from saga.common import SERVICES  # noqa: E402
from saga.faults import SEED_FAULTS  # noqa: E402
from saga.kafka_io import COMMAND_PARTITIONS  # noqa: E402
DB_COUNTERS = ("Questions", "Com_admin_commands", "Com_commit", "Com_insert", "Com_update",
               "Com_select", "Connections", "Innodb_data_fsyncs")
OPENING_TOTAL = "1750.00"   # A 1000 + B 500 + C 250, as schema.sql opens them


# --- small helpers ---------------------------------------------------------------------------

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


def wait_until(condition, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_port(port, proc, timeout=30, what="process"):
    def accepts():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    wait_until(accepts, timeout, f"{what} to open port {port}", 0.05)


def root_query(server, dbname, sql):
    import mysql.connector
    conn = mysql.connector.connect(unix_socket=server.socket, user="root", database=dbname,
                                   autocommit=True)
    try:
        cur = conn.cursor()
        cur.execute(sql)
        return cur.fetchall() if cur.with_rows else cur.rowcount
    finally:
        conn.close()


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


def start_mariadb(basedir):
    from launcher import PrivateMariaDB
    server = PrivateMariaDB(basedir)
    server.install()
    server.start()
    return server


def broker_pids(broker):
    """The broker and every descendant (RabbitMQ's helpers leave its session)."""
    from brokers import list_descendants
    return [broker.proc.pid, *list_descendants(broker.proc.pid)]


# --- a running system ------------------------------------------------------------------------

class Running:
    """A system that is already running at --url: faults set through its API."""

    saga = "registration"

    def __init__(self, url, saga="registration", label="system"):
        self.base, self.label, self.saga = url.rstrip("/"), label, saga
        self.url = self.base + ("/transfer" if saga == "transfer" else "/start")
        self.server = None

    def cpu_groups(self):
        return {}

    def set_faults(self, mode):
        ok = True
        for service in SERVICES:
            fault = SEED_FAULTS.get(service, {"mode": "off"}) if mode == "seed" else {"mode": "off"}
            code, body = http_json("PUT", f"{self.base}/faults/{service}", fault)
            if code != 200:
                print(f"  ! PUT /faults/{service} -> {code} {body}", file=sys.stderr)
                ok = False
        return ok

    def settle(self, timeout=60):
        """Wait until no saga is being driven (after a faulty run, retries go on)."""
        def idle():
            code, body = http_json("GET", self.base + "/health", timeout=5)
            return code == 200 and isinstance(body, dict) and not body.get("active_sagas")
        try:
            wait_until(idle, timeout, "the orchestrator to be idle")
            return True
        except TimeoutError:
            return False

    def stop(self):
        pass


# --- ours --------------------------------------------------------------------------------------

class Ours(Running):
    """Our four processes (launcher.System) on their own database of the private server.
    mode: orchestration (POST /start or /transfer on the orchestrator) or choreography
    (POST /register on service A); transport: http or kafka (orchestration only)."""

    def __init__(self, label, server, dbname, logdir, code_dir=ROOT, env=None,
                 saga="registration", mode="orchestration", transport="http",
                 kafka=None, rabbitmq=None):
        import launcher
        self.label, self.server, self.dbname = label, server, dbname
        self.saga, self.mode, self.transport = saga, mode, transport
        self.kafka, self.rabbitmq = kafka, rabbitmq
        self.logdir = os.path.join(logdir, label)
        os.makedirs(self.logdir, exist_ok=True)
        server.create_database(dbname, schema=os.path.join(code_dir, "schema.sql"))
        base = {"SAGA_DB_HOST": "127.0.0.1", "SAGA_DB_PORT": str(server.port),
                "SAGA_DB_USER": "saga", "SAGA_DB_PASSWORD": "saga", "SAGA_DB_NAME": dbname,
                "SAGA_FAULTS": "off",
                "RABBITMQ_URL": rabbitmq.url if mode == "choreography" else "off"}
        if transport == "kafka":
            base.update(SAGA_TRANSPORT="kafka", KAFKA_BOOTSTRAP=kafka.bootstrap)
        self.system = launcher.System(self.logdir, {**base, **(env or {})})
        launcher.ROOT = code_dir              # launcher runs <code_dir>/<name>.py
        try:
            self.system.start()
        finally:
            launcher.ROOT = ROOT
        self.base = self.system.url()
        if mode == "choreography":
            self.url = self.system.url("service_a") + "/register"
        else:
            self.url = self.base + ("/transfer" if saga == "transfer" else "/start")

    def ready(self, timeout=90):
        """Every consumer in place (Kafka: each command partition has one), and one saga
        through the whole path, so the first measured second is not spent connecting."""
        if self.transport == "kafka":
            def covered():
                for name in ("service_a", "service_b", "service_c"):
                    _, health = http_json("GET", self.system.url(name) + "/health", timeout=5)
                    partitions = set(health.get("kafka", {}).get("partitions", []))
                    if partitions != set(range(COMMAND_PARTITIONS)):
                        return False
                return True
            wait_until(covered, timeout, "every Kafka command partition to have a consumer")
        from load import bodies
        body = json.loads(bodies(self.saga)[0])
        wait_until(lambda: http_json("POST", self.url, body, timeout=60)[0] == 200, timeout,
                   f"a first {self.saga} to complete at {self.url}", 0.5)
        return self

    def cpu_groups(self):
        groups = {name: [p.pid] for name, p in self.system.procs.items()}
        groups["mariadb"] = [self.server.proc.pid]
        if self.transport == "kafka":
            groups["kafka"] = broker_pids(self.kafka)
        if self.mode == "choreography":
            groups["rabbitmq"] = broker_pids(self.rabbitmq)
        return groups

    def root_pids(self):
        return {name: p.pid for name, p in self.system.procs.items()}

    def settle(self, timeout=60):
        """Until no saga of this database is RUNNING or COMPENSATING (whoever drives it:
        the orchestrator, or the services in a choreography)."""
        def quiet():
            return root_query(self.server, self.dbname, "SELECT COUNT(*) FROM SAGA WHERE "
                              "status IN ('RUNNING', 'COMPENSATING')")[0][0] == 0
        try:
            wait_until(quiet, timeout, "no saga to be running")
            return True
        except TimeoutError:
            return False

    def consistency(self):
        """All or nothing (registration) or money kept (transfer), once quiet."""
        self.settle()
        q = lambda sql: root_query(self.server, self.dbname, sql)
        by_status = {f"{t}/{s}": n for t, s, n in
                     q("SELECT type, status, COUNT(*) FROM SAGA GROUP BY type, status")}
        orphans = {t: q(f"SELECT COUNT(*) FROM {t} x LEFT JOIN SAGA s ON s.id = x.saga_id "
                        f"WHERE s.status IS NULL OR s.status <> 'COMPLETED'")[0][0]
                   for t in ("TABLE_A", "TABLE_B", "TABLE_C")}
        incomplete = q("SELECT COUNT(*) FROM SAGA s WHERE s.type = 'registration' AND "
                       "s.status = 'COMPLETED' AND ("
                       + " OR ".join(f"NOT EXISTS (SELECT 1 FROM {t} x WHERE x.saga_id = s.id)"
                                     for t in ("TABLE_A", "TABLE_B", "TABLE_C")) + ")")[0][0]
        total, negative = q("SELECT SUM(balance), SUM(balance < 0) FROM ACCOUNT")[0]
        return (f"sagas {by_status}; business rows of sagas that did not complete: {orphans}; "
                f"completed registrations missing a row: {incomplete}; accounts total "
                f"{total} (opened with {OPENING_TOTAL}), negative balances: {negative}")

    def stop(self):
        self.system.stop()


# --- the seed's naive design -----------------------------------------------------------------

class Naive:
    """The seed's design (bench/naive/): four Flask development servers, run as the seed
    runs them (`python service_a.py`, ...), configured through NAIVE_* variables.

    driver "pure" is what `python service_a.py` gets here: mysql-connector's C extension
    cannot load once Flask has loaded Debian's OpenSSL, so the connector falls back to
    pure Python. "cext" loads the C extension first (what the seed's own setup, pip on a
    Mac, gets), without touching the seed's code: python -c 'import _mysql_connector;
    runpy.run_path("service_a.py", run_name="__main__")'."""

    NAMES = ("orchestrator", "service_a", "service_b", "service_c")
    saga = "registration"
    mode, transport = "orchestration", "http"

    def __init__(self, server, dbname, logdir, label="naive", driver="cext"):
        self.label, self.server, self.dbname, self.driver = label, server, dbname, driver
        self.logdir = os.path.join(logdir, label)
        os.makedirs(self.logdir, exist_ok=True)
        create_naive_database(server, dbname)
        from launcher import free_port
        self.ports = {name: free_port() for name in self.NAMES}
        self.base = f"http://127.0.0.1:{self.ports['orchestrator']}"
        self.url = self.base + "/start"
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

    def command(self, name):
        script = f"{name}.py"
        if self.driver == "cext":
            return [sys.executable, "-c", "import _mysql_connector, runpy; "
                    f"runpy.run_path({script!r}, run_name='__main__')"]
        return [sys.executable, script]

    def start(self):
        env = self.env()
        for name in self.NAMES:
            log = open(os.path.join(self.logdir, f"{name}.log"), "ab")
            self.procs[name] = subprocess.Popen(
                self.command(name), cwd=NAIVE_DIR, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
        for name in self.NAMES:
            wait_port(self.ports[name], self.procs[name], what=f"naive {name}")
        return self

    def ready(self, timeout=30):
        from load import REGISTRATION_BODY
        wait_until(lambda: http_json("POST", self.url, REGISTRATION_BODY)[0] in (200, 500),
                   timeout, "the naive orchestrator to answer")
        return self

    def stop(self):
        for proc in self.procs.values():
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

    def settle(self, timeout=10):
        """The seed keeps no saga state: wait until its tables stop growing (a request
        whose client went away still runs to its end)."""
        def rows():
            return root_query(self.server, self.dbname, "SELECT (SELECT COUNT(*) FROM TABLE_A)"
                              " + (SELECT COUNT(*) FROM SAGA_LOG)")[0][0]
        deadline, last = time.monotonic() + timeout, rows()
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = rows()
            if now == last:
                return True
            last = now
        return False

    def consistency(self):
        """Count registrations left half done (a user
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
    """The seed's CREATE DATABASE (the server's default character set) and its tables,
    with a user that has rights on that database only."""
    server.root(f"DROP DATABASE IF EXISTS `{dbname}`",
                f"CREATE DATABASE `{dbname}`",
                "CREATE USER IF NOT EXISTS 'naive'@'127.0.0.1' IDENTIFIED BY 'naive'",
                f"GRANT ALL PRIVILEGES ON `{dbname}`.* TO 'naive'@'127.0.0.1'")
    server.apply(dbname, os.path.join(NAIVE_DIR, "schema.sql"), "naive", "naive")
