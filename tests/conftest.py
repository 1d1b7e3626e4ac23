"""Fixtures: a private MariaDB server, the four real processes, and helpers to look at
what they wrote. Nothing is mocked: every saga test goes over HTTP (or a real broker) to
real processes that write to a real database.

The private MariaDB runs in a time zone with daylight saving time (America/New_York), so
any time the engine kept in the server's local time instead of UTC would show."""

import json
import os
import sys
import threading
from decimal import Decimal

import mysql.connector
import pika
import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import common  # noqa: E402,F401  (the demo's wiring: the driver first, the demo's saga types)
from saga.common import SERVICES, Settings  # noqa: E402
from saga.kafka_io import COMMAND_PARTITIONS  # noqa: E402
from saga.definitions import SAGA_TYPES  # noqa: E402
from saga.participant.events import dead_letter_queue, retry_delays, retry_queue, service_queue  # noqa: E402
from brokers import PrivateKafka, PrivateRabbitMQ  # noqa: E402
from launcher import PrivateMariaDB, System, query_once, wait_for  # noqa: E402

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
    "SAGA_CONSUMERS": "2",
}
BUSINESS_TABLES = ("TABLE_A", "TABLE_B", "TABLE_C")
# The engine's tables; each saga type's own are emptied or reset as the type says.
ENGINE_TABLES = ("STEP_LEDGER", "SAGA_LOG", "SAGA", "START_KEY", "OUTBOX")
SEED_INPUT = {"username": "john_doe", "address": "123 Main St", "payment": "Visa"}
DST_ZONE = "America/New_York"


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    """A private RabbitMQ node for the choreography. Every system of the session uses
    it; their queues are named after their database, so they never share events."""
    broker = PrivateRabbitMQ(str(tmp_path_factory.mktemp("rabbitmq")))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """A private Kafka-protocol broker (Tansu, memory only) for the Kafka transport."""
    broker = PrivateKafka(str(tmp_path_factory.mktemp("kafka")))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory):
    server = PrivateMariaDB(str(tmp_path_factory.mktemp("mariadb")), tz=DST_ZONE)
    server.install()
    server.start()
    yield server
    server.stop()


def expected_calls(failed, attempts, status, undo_failed, steps="ABC"):
    """The calls SAGA_LOG must show for a registration whose step `failed` failed
    `attempts` times: the steps before it succeed, then its attempts, then the undo in
    reverse of every step that may have written (the failed one too if undo_failed)."""
    done = steps[:steps.index(failed)]
    undone = done + failed if undo_failed else done
    return ([(s, "invoke", 1, "success") for s in done]
            + [(failed, "invoke", n, status) for n in range(1, attempts + 1)]
            + [(s, "compensate", 1, "success") for s in reversed(undone)])


def in_background(fn, *args, **kwargs):
    """Run fn in a thread; returns (thread, answer) where answer gets 'resp' or 'error'."""
    answer = {}

    def run():
        try:
            answer["resp"] = fn(*args, **kwargs)
        except requests.RequestException as exc:
            answer["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answer


def join(thread, timeout=60):
    """Join a client thread and fail plainly if it is stuck, instead of failing later on
    the answer it never wrote."""
    thread.join(timeout)
    assert not thread.is_alive(), f"client thread still running after {timeout} s"


class LiveSystem:
    """One running system (database + four processes) and ways to look into it."""

    def __init__(self, server, system, dbname, rabbitmq=None):
        self.server, self.system, self.dbname = server, system, dbname
        self.rabbitmq = rabbitmq
        self.url = system.url()

    # -- HTTP
    def start(self, payload=None, **kwargs):
        return requests.post(self.url + "/start", json=payload or SEED_INPUT, timeout=60,
                             **kwargs)

    def register(self, payload=None, **kwargs):
        """A choreographed registration, started at service A."""
        return requests.post(self.service("A") + "/register", json=payload or SEED_INPUT,
                             timeout=60, **kwargs)

    def transfer(self, payload, **kwargs):
        return requests.post(self.url + "/transfer", json=payload, timeout=60, **kwargs)

    def get(self, path, **kwargs):
        return requests.get(self.url + path, timeout=30, **kwargs)

    def post(self, path, **kwargs):
        return requests.post(self.url + path, timeout=60, **kwargs)

    def post_service(self, name, path, body, **kwargs):
        return requests.post(self.service(name) + path, json=body, timeout=30, **kwargs)

    def get_service(self, name, path):
        return requests.get(self.service(name) + path, timeout=30).json()

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
        wait_for(lambda: self.in_flight(service) == 0, 30,
                 f"service {service} to finish its calls")

    def set_fault(self, service, **fault):
        resp = requests.put(self.service(service) + "/faults", json=fault, timeout=10)
        assert resp.status_code == 200, resp.text
        return resp.json()

    # -- database
    def connect(self, **options):
        """A session of our own on the system's database, in UTC like the processes'."""
        return mysql.connector.connect(host="127.0.0.1", port=self.server.port, user="saga",
                                       password="saga", database=self.dbname,
                                       time_zone="+00:00", **options)

    def query(self, sql, params=()):
        return query_once(self.connect(autocommit=True), sql, params)

    def row_counts(self, saga_id=None):
        where, params = ("WHERE saga_id = %s", (saga_id,)) if saga_id else ("", ())
        return {t: self.query(f"SELECT COUNT(*) FROM {t} {where}", params)[0][0]
                for t in BUSINESS_TABLES}

    def saga_row(self, saga_id):
        rows = self.query("SELECT status, step, attempt, results, failed_step, lease_owner, "
                          "fence FROM SAGA WHERE id = %s", (saga_id,))
        return rows[0] if rows else None

    def status(self, saga_id):
        row = self.saga_row(saga_id)
        return row and row[0]

    def events(self, saga_id):
        """SAGA_LOG rows of one choreographed saga as (service, action, event, status)."""
        return self.query("SELECT service, action, event, status FROM SAGA_LOG "
                          "WHERE saga_id = %s AND service <> 'SAGA' ORDER BY id", (saga_id,))

    def log(self, saga_id):
        """SAGA_LOG rows of one saga as (service, action, attempt, status), in order."""
        return self.query("SELECT service, action, attempt, status FROM SAGA_LOG "
                          "WHERE saga_id = %s ORDER BY id", (saga_id,))

    def calls(self, saga_id):
        """Only the calls: (service, action, attempt, status)."""
        return [r for r in self.log(saga_id) if r[0] != "SAGA"]

    def balances(self):
        return dict(self.query("SELECT id, balance FROM ACCOUNT ORDER BY id"))

    def wait_status(self, saga_id, statuses=("COMPLETED", "COMPENSATED", "FAILED"), timeout=60):
        def done():
            status = self.status(saga_id)
            return status in statuses and status
        return wait_for(done, timeout, f"saga {saga_id} to reach {statuses}")

    def wait_quiet(self, timeout=60):
        wait_for(lambda: self.query("SELECT COUNT(*) FROM SAGA WHERE status IN "
                                    "('RUNNING', 'COMPENSATING')")[0][0] == 0,
                 timeout, "no saga to be running or compensating")

    def wait_kafka_ready(self, timeout=60):
        """Until every command partition of every service has a consumer and every
        service process has a partition of its own (a group join, and the rebalance
        when a second member joins, take a couple of seconds), so a test's first
        command is not left waiting."""
        def ready():
            covered = {s: set() for s in SERVICES}
            for name in self.system.names:
                if name.startswith("service_") and self.system.alive(name):
                    health = requests.get(self.system.url(name) + "/health", timeout=5).json()
                    mine = set(health.get("kafka", {}).get("partitions", []))
                    if not mine:
                        return False
                    covered[health["service"]] |= mine
            return all(parts == set(range(COMMAND_PARTITIONS)) for parts in covered.values())
        wait_for(ready, timeout, "every Kafka command partition to have a consumer", 0.2)

    def wait_all_idle(self):
        """Every running service has finished its calls, so no late write can land in
        the next test's database."""
        for service in SERVICES:
            name = f"service_{service.lower()}"
            if self.system.alive(name) and name not in self.system.frozen:
                self.wait_idle(service)

    def assert_all_or_nothing(self):
        """DESIGN.md rule 7 over the whole database, for registrations."""
        for sid, status in self.query("SELECT id, status FROM SAGA "
                                      "WHERE type = 'registration'"):
            counts = self.row_counts(sid)
            if status == "COMPLETED":
                assert counts == {"TABLE_A": 1, "TABLE_B": 1, "TABLE_C": 1}, (sid, counts)
            else:
                assert status in ("COMPENSATED", "FAILED"), (sid, status)
                if status == "COMPENSATED":
                    assert counts == {"TABLE_A": 0, "TABLE_B": 0, "TABLE_C": 0}, (sid, counts)
        for table in BUSINESS_TABLES:
            orphans = self.query(f"SELECT COUNT(*) FROM {table} t LEFT JOIN SAGA s "
                                 f"ON s.id = t.saga_id WHERE s.id IS NULL")[0][0]
            assert orphans == 0, f"{table} has {orphans} rows with no saga"

    def assert_invariants(self):
        """Every registered saga type's own invariant, at quiet."""
        conn = self.connect()
        try:
            cur = conn.cursor(dictionary=True)
            wrong = {t.name: t.invariant(cur) for t in SAGA_TYPES.values()}
        finally:
            conn.close()
        assert not any(wrong.values()), wrong

    def assert_money_conserved(self):
        """The bank invariant: each balance = opening + completed transfers in - out."""
        expected = {k: v for k, v in self.query("SELECT id, opening FROM ACCOUNT")}
        for data, in self.query("SELECT input FROM SAGA WHERE type = 'transfer' "
                                "AND status = 'COMPLETED'"):
            t = json.loads(data)
            expected[t["from"]] -= Decimal(t["amount"])
            expected[t["to"]] += Decimal(t["amount"])
        assert self.balances() == expected
        assert all(b >= 0 for b in self.balances().values())

    def purge_queues(self):
        """Drop events left in this system's queues: a broker that was killed may hand
        out again messages that were acknowledged before, and the next test's empty
        ledger could not tell them for repeats."""
        if self.rabbitmq is None or not self.rabbitmq.alive():
            return
        env = self.system.env
        settings = Settings(db_name=self.dbname, max_attempts=int(env["SAGA_MAX_ATTEMPTS"]),
                            backoff_base=float(env["SAGA_BACKOFF_BASE"]),
                            backoff_max=float(env["SAGA_BACKOFF_MAX"]))
        conn = pika.BlockingConnection(pika.URLParameters(self.rabbitmq.url))
        try:
            for service in SERVICES:
                for queue in [service_queue(settings, service),
                              dead_letter_queue(settings, service)] + [
                        retry_queue(settings, service, d) for d in retry_delays(settings)]:
                    channel = conn.channel()
                    try:
                        channel.queue_purge(queue)
                        channel.close()
                    except pika.exceptions.ChannelClosedByBroker:
                        pass  # not declared yet
        finally:
            conn.close()

    def reset(self):
        """Back to an empty database, faults off, every process running and idle."""
        for name in self.system.names:
            if name in self.system.frozen:
                self.system.thaw(name)
            if not self.system.alive(name):
                self.system.start(name)
            self.system.wait_healthy(name)
        for service in SERVICES:
            self.set_fault(service, mode="off")
        self.wait_quiet()
        self.wait_all_idle()
        self.purge_queues()
        conn = self.connect(autocommit=True)
        try:
            cur = conn.cursor()
            cur.execute("SET FOREIGN_KEY_CHECKS = 0")
            for saga_type in SAGA_TYPES.values():
                for statement in saga_type.reset or [f"TRUNCATE TABLE {t}"
                                                     for t in saga_type.tables]:
                    cur.execute(statement)
            for table in ENGINE_TABLES:
                cur.execute(f"TRUNCATE TABLE {table}")
        finally:
            conn.close()


def system_env(mariadb, dbname, rabbitmq=None, **env):
    return {**TEST_ENV, "SAGA_DB_PORT": str(mariadb.port), "SAGA_DB_NAME": dbname,
            "RABBITMQ_URL": rabbitmq.url if rabbitmq else "off", **env}


@pytest.fixture(scope="session")
def _shared_system(mariadb, rabbitmq, tmp_path_factory):
    dbname = mariadb.create_database("saga_test")
    system = System(str(tmp_path_factory.mktemp("logs")), system_env(mariadb, dbname, rabbitmq))
    system.start()
    yield LiveSystem(mariadb, system, dbname, rabbitmq)
    system.stop()


@pytest.fixture
def live_system(_shared_system):
    """The shared system, emptied, idle and healthy, with no faults; left idle after."""
    _shared_system.reset()
    yield _shared_system
    _shared_system.wait_all_idle()


@pytest.fixture(scope="module")
def _kafka_system(mariadb, rabbitmq, kafka, tmp_path_factory):
    dbname = mariadb.create_database("saga_kafka")
    # A read timeout of 2 s: a Kafka command waits for its reply that long, and a slow
    # call over Kafka (a broker round trip each way) must not look like a lost one.
    system = System(str(tmp_path_factory.mktemp("kafka-logs")), system_env(
        mariadb, dbname, rabbitmq, SAGA_TRANSPORT="kafka", KAFKA_BOOTSTRAP=kafka.bootstrap,
        SAGA_READ_TIMEOUT="2"))
    system.start()
    yield LiveSystem(mariadb, system, dbname, rabbitmq)
    system.stop()


@pytest.fixture
def kafka_system(_kafka_system):
    """A system whose orchestrator calls the services over Kafka: emptied, idle, with
    every command partition consumed."""
    _kafka_system.reset()
    _kafka_system.wait_kafka_ready()
    yield _kafka_system
    _kafka_system.wait_all_idle()


_counter = iter(range(1, 10_000))


@pytest.fixture
def make_system(mariadb, rabbitmq, tmp_path):
    """A separate system on its own database, for tests that need other settings."""
    started = []

    def make(orchestrators=1, second_instances=(), **env):
        dbname = mariadb.create_database(f"saga_t{next(_counter)}_{os.getpid()}")
        system = System(str(tmp_path), system_env(mariadb, dbname, rabbitmq, **env),
                        orchestrators, second_instances)
        started.append(system)
        system.start()
        return LiveSystem(mariadb, system, dbname, rabbitmq)

    yield make
    for system in started:
        system.stop()
