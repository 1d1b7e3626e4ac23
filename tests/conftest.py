"""Fixtures: a private MariaDB server, the four real processes, and helpers to look at
what they wrote. Nothing is mocked: every saga test goes over HTTP to real processes
that write to a real database."""

import os
import sys

import mysql.connector
import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launcher import PROCESSES, PrivateMariaDB, System, wait_for  # noqa: E402

# Short timeouts and backoff so failure paths run in well under a second each.
TEST_ENV = {
    "SAGA_FAULTS": "off",
    "SAGA_CONNECT_TIMEOUT": "0.5",
    "SAGA_READ_TIMEOUT": "1",
    "SAGA_MAX_ATTEMPTS": "3",
    "SAGA_COMPENSATE_FOR": "3",
    "SAGA_START_WAIT": "20",
    "SAGA_BACKOFF_BASE": "0.05",
    "SAGA_BACKOFF_MAX": "0.2",
    "SAGA_LEASE_SECONDS": "1",
    "SAGA_RECOVERY_INTERVAL": "0.2",
}
TABLES = ("TABLE_C", "TABLE_B", "TABLE_A", "STEP_LEDGER", "SAGA_LOG", "SAGA")
SEED_INPUT = {"username": "john_doe", "address": "123 Main St", "payment": "Visa"}


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory):
    server = PrivateMariaDB(str(tmp_path_factory.mktemp("mariadb")))
    server.install()
    server.start()
    yield server
    server.stop()


class Saga:
    """One running system (database + four processes) and ways to look into it."""

    def __init__(self, server, system, dbname):
        self.server, self.system, self.dbname = server, system, dbname
        self.url = system.url()

    # -- HTTP
    def start(self, payload=None, **kwargs):
        return requests.post(self.url + "/start", json=payload or SEED_INPUT, timeout=60, **kwargs)

    def get(self, path, **kwargs):
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path, **kwargs):
        return requests.post(self.url + path, timeout=60, **kwargs)

    def service(self, name):
        return self.system.url(f"service_{name.lower()}")

    def in_flight(self, service):
        """How many calls the service is serving right now."""
        return requests.get(self.service(service) + "/health", timeout=5).json()["in_flight"]

    def wait_serving(self, service):
        wait_for(lambda: self.in_flight(service), 30, f"service {service} to be serving a call")

    def wait_idle(self, service):
        """Until the service has finished every call it was serving (a hung one too), so
        a late commit has landed or never will."""
        wait_for(lambda: self.in_flight(service) == 0, 30, f"service {service} to finish its calls")

    def set_fault(self, service, **fault):
        resp = requests.put(self.service(service) + "/faults", json=fault, timeout=10)
        assert resp.status_code == 200, resp.text
        return resp.json()

    # -- database
    def query(self, sql, params=()):
        conn = mysql.connector.connect(host="127.0.0.1", port=self.server.port, user="saga",
                                       password="saga", database=self.dbname, autocommit=True)
        try:
            cur = conn.cursor()
            cur.execute(sql, params)
            return cur.fetchall() if cur.with_rows else cur.rowcount
        finally:
            conn.close()

    def row_counts(self, saga_id=None):
        where, params = ("WHERE saga_id = %s", (saga_id,)) if saga_id else ("", ())
        return {t: self.query(f"SELECT COUNT(*) FROM {t} {where}", params)[0][0]
                for t in ("TABLE_A", "TABLE_B", "TABLE_C")}

    def saga_row(self, saga_id):
        rows = self.query("SELECT status, step, attempt, results, failed_step, lease_owner, "
                          "fence FROM SAGA WHERE id = %s", (saga_id,))
        return rows[0] if rows else None

    def log(self, saga_id):
        """SAGA_LOG rows of one saga as (service, action, attempt, status), in order."""
        return self.query("SELECT service, action, attempt, status FROM SAGA_LOG "
                          "WHERE saga_id = %s ORDER BY id", (saga_id,))

    def calls(self, saga_id):
        """Only the calls: (service, action, attempt, status)."""
        return [r for r in self.log(saga_id) if r[0] != "SAGA"]

    def wait_status(self, saga_id, statuses=("COMPLETED", "COMPENSATED", "FAILED"), timeout=60):
        def done():
            row = self.saga_row(saga_id)
            return row and row[0] in statuses and row[0]
        return wait_for(done, timeout, f"saga {saga_id} to reach {statuses}")

    def wait_quiet(self, timeout=60):
        wait_for(lambda: self.query("SELECT COUNT(*) FROM SAGA WHERE status IN "
                                    "('RUNNING', 'COMPENSATING')")[0][0] == 0,
                 timeout, "no saga to be running or compensating")

    def assert_all_or_nothing(self):
        """DESIGN.md rule 7 over the whole database."""
        for sid, status in self.query("SELECT id, status FROM SAGA"):
            counts = self.row_counts(sid)
            if status == "COMPLETED":
                assert counts == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}, (sid, counts)
            else:
                assert status in ("COMPENSATED", "FAILED"), (sid, status)
                if status == "COMPENSATED":
                    assert counts == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}, (sid, counts)
        for table in ("TABLE_A", "TABLE_B", "TABLE_C"):
            orphans = self.query(f"SELECT COUNT(*) FROM {table} t LEFT JOIN SAGA s "
                                 f"ON s.id = t.saga_id WHERE s.id IS NULL")[0][0]
            assert orphans == 0, f"{table} has {orphans} rows with no saga"

    def reset(self):
        """Back to an empty database, faults off, every process running."""
        for name in PROCESSES:
            if name in self.system.frozen:
                self.system.thaw(name)
            if not self.system.alive(name):
                self.system.start(name)
            self.system.wait_healthy(name)
        for service in "ABC":
            self.set_fault(service, mode="off")
        self.wait_quiet()
        conn = mysql.connector.connect(host="127.0.0.1", port=self.server.port, user="saga",
                                       password="saga", database=self.dbname, autocommit=True)
        try:
            cur = conn.cursor()
            cur.execute("SET FOREIGN_KEY_CHECKS = 0")
            for table in TABLES:
                cur.execute(f"TRUNCATE TABLE {table}")
        finally:
            conn.close()


@pytest.fixture(scope="session")
def _shared(mariadb, tmp_path_factory):
    dbname = mariadb.create_database("saga_test")
    logdir = str(tmp_path_factory.mktemp("logs"))
    system = System(logdir, {**TEST_ENV, "SAGA_DB_PORT": str(mariadb.port),
                             "SAGA_DB_NAME": dbname})
    system.start()
    yield Saga(mariadb, system, dbname)
    system.stop()


@pytest.fixture
def saga(_shared):
    """The shared system, emptied and healthy, with no faults."""
    _shared.reset()
    yield _shared


_counter = iter(range(1, 10_000))


@pytest.fixture
def make_system(mariadb, tmp_path):
    """A separate system on its own database, for tests that need other settings."""
    started = []

    def make(orchestrators=1, **env):
        dbname = mariadb.create_database(f"saga_t{next(_counter)}_{os.getpid()}")
        system = System(str(tmp_path), {**TEST_ENV, "SAGA_DB_PORT": str(mariadb.port),
                                        "SAGA_DB_NAME": dbname, **env}, orchestrators)
        started.append(system)
        system.start()
        return Saga(mariadb, system, dbname)

    yield make
    for system in started:
        system.stop()

