"""The chaos harness's runner: the system it owns (a private MariaDB, a private broker,
the orchestrators and services started with short timeouts and leases), the harness's
own view of the database, and what is read from them at the end: deadlocks, queued
events, errors in the logs."""

import os
import re
import subprocess
import sys
import time
from collections import Counter

import mysql.connector
import requests

from brokers import PrivateKafka, PrivateRabbitMQ
from launcher import ROOT, PrivateMariaDB, System, free_port, query_once, wait_for
from saga import common

# Short timeouts and leases so failures and takeovers happen fast; a long compensation
# budget so a compensation survives a process being down for a while without going FAILED.
CHAOS_ENV = {
    "SAGA_FAULTS": "off",
    "SAGA_CONNECT_TIMEOUT": "0.5",
    "SAGA_READ_TIMEOUT": "1",
    "SAGA_MAX_ATTEMPTS": "3",
    "SAGA_COMPENSATE_FOR": "30",
    "SAGA_START_WAIT": "10",
    "SAGA_BACKOFF_BASE": "0.05",
    "SAGA_BACKOFF_MAX": "0.5",
    "SAGA_LEASE_SECONDS": "1",
    "SAGA_RECOVERY_INTERVAL": "0.2",
    # Orchestrated runs need no RabbitMQ; without a broker, the services' event relay and
    # consumers would only log their failed connections. A choreography run sets it.
    "RABBITMQ_URL": "off",
}
# Over Kafka a frozen service process holds its command partitions until its database
# session times out (4 s; a killed one's go at once): three attempts of 2 s outlast most
# of that. Each of its processes takes its commands one at a time, and a broker restart
# stalls them all for seconds, so a compensation gets a longer budget than over HTTP.
KAFKA_ENV = {"SAGA_TRANSPORT": "kafka", "SAGA_READ_TIMEOUT": "2", "SAGA_COMPENSATE_FOR": "120"}
SERVICES = {letter: f"service_{letter.lower()}" for letter in common.SERVICES}


def say(*parts):
    print(*parts, flush=True)


class ChaosSystem(System):
    """launcher.System plus extra orchestrators ("orchestrator2", ...) on their own ports,
    sharing the database and the services, a second process of a service ("service_b2")
    when asked, no orchestrator at all for a choreography, and a start that does not wait
    (the chaos thread must not block on a process booting while the database is down)."""

    def __init__(self, logdir, env, orchestrators=1, second_instances=(), with_orchestrator=True):
        super().__init__(logdir, env, orchestrators, second_instances)
        self.orchestrators = ["orchestrator"] + [f"orchestrator{n}"
                                                 for n in range(2, orchestrators + 1)]
        if not with_orchestrator:
            self.orchestrators = []
        for name in self.orchestrators:
            self.ports.setdefault(name, free_port())
        self.names = self.orchestrators + list(SERVICES.values()) + [
            f"service_{s.lower()}2" for s in second_instances]

    def instances(self, svc):
        """The processes of service `svc` ("A", "B", "C")."""
        return [n for n in self.names if n.rstrip("0123456789") == SERVICES[svc]]

    def spawn(self, name):
        script = name.rstrip("0123456789")
        port_of = "ORCHESTRATOR_PORT" if name.startswith("orchestrator") \
            else f"SERVICE_{script[-1].upper()}_PORT"
        env = {**self.env, port_of: str(self.ports[name])}
        with open(os.path.join(self.logdir, f"{name}.log"), "ab") as log:
            log.write(f"\n===== chaos: starting {name} at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.procs[name] = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, f"{script}.py")], cwd=ROOT, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self, *names):
        names = names or self.names
        for name in names:
            self.spawn(name)
        for name in names:
            self.wait_healthy(name, timeout=60)

    def wait_kafka_ready(self, timeout=60):
        """Until every command partition of every service has a consumer (a group join
        takes a couple of seconds), so the first commands are not left waiting."""
        from saga.kafka_io import COMMAND_PARTITIONS

        def ready():
            covered = {svc: set() for svc in SERVICES}
            for name in self.names:
                if name.startswith("service_") and self.alive(name):
                    try:
                        health = requests.get(self.url(name) + "/health", timeout=2).json()
                    except (requests.RequestException, ValueError):
                        return False
                    covered[health["service"]] |= set(health.get("kafka", {}).get(
                        "partitions", []))
            return all(parts >= set(range(COMMAND_PARTITIONS)) for parts in covered.values())
        wait_for(ready, timeout, "every Kafka command partition to have a consumer", 0.2)


class Database:
    """The harness's own view of the database: a fresh connection per query, so a
    restarted server costs nothing here."""

    def __init__(self, host, port, user, password, name):
        # UTC, like the processes' own sessions, so times compare with what they wrote.
        self.params = dict(host=host, port=port, user=user, password=password, database=name,
                           autocommit=True, connection_timeout=5, charset="utf8mb4",
                           collation="utf8mb4_unicode_ci", time_zone="+00:00")
        self._columns = {}

    def connect(self):
        return mysql.connector.connect(**self.params)

    def query(self, sql, params=()):
        return query_once(self.connect(), sql, params)

    def columns(self, table):
        """The columns of one of the database's tables (empty if it has no such table)."""
        if table not in self._columns:
            self._columns[table] = {name for (name,) in self.query(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = "
                "DATABASE() AND table_name = %s", (table,))}
        return self._columns[table]


def close_quietly(conn):
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass
    return None


def uses_broker(args):
    return args.mode == "choreography" or args.transport == "kafka"


def run_as(args):
    """(mode, transport) as the SAGA table records them for this run's sagas."""
    if args.mode == "choreography":
        return ("choreography", "rabbitmq")
    return ("orchestration", args.transport)


def describe_run(args):
    mode, transport = run_as(args)
    parts = [f"{mode} over {transport}"]
    if args.mode == "choreography":
        parts.append(f"{args.orchestrators} orchestrator(s) running beside it"
                     if args.with_orchestrator else "no orchestrator")
    else:
        parts.append(f"{args.orchestrators} orchestrator(s)")
    if args.second_b:
        parts.append("two processes of B")
    return ", ".join(parts)


def start_owned(args, rundir):
    """The private database, broker and processes of a run; returns (server, broker,
    system, db, env)."""
    say(f"starting a private MariaDB, {describe_run(args)}, in {rundir}")
    server = PrivateMariaDB(os.path.join(rundir, "mariadb"))
    server.install()
    server.start()
    log_deadlocks(server)
    dbname = server.create_database("saga_chaos")
    env = dict(CHAOS_ENV)
    broker = None
    if args.mode == "choreography":
        broker = PrivateRabbitMQ(os.path.join(rundir, "broker"))
        broker.start()
        env["RABBITMQ_URL"] = broker.url
    elif args.transport == "kafka":
        broker = PrivateKafka(os.path.join(rundir, "broker"))
        broker.start()
        env.update(KAFKA_ENV, KAFKA_BOOTSTRAP=broker.bootstrap)
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    env.update({"SAGA_DB_HOST": "127.0.0.1", "SAGA_DB_PORT": str(server.port),
                "SAGA_DB_USER": "saga", "SAGA_DB_PASSWORD": "saga", "SAGA_DB_NAME": dbname})
    logdir = os.path.join(rundir, "logs")
    os.makedirs(logdir)
    system = ChaosSystem(logdir, env, args.orchestrators, ("B",) if args.second_b else (),
                         with_orchestrator=args.mode != "choreography" or args.with_orchestrator)
    system.start()
    if args.transport == "kafka":
        system.wait_kafka_ready()
    db = Database("127.0.0.1", server.port, "saga", "saga", dbname)
    return server, broker, system, db, env


def recover_everything(system, chaos):
    """After the chaos: thaw, restart the dead, wait until every process answers."""
    for name in list(system.frozen):
        if system.alive(name):
            system.thaw(name)
        system.frozen.discard(name)
    for name in system.names:
        if chaos and name in chaos.dead and system.alive(name):
            # Stopped with SIGTERM and still shutting down: let it finish, then start it.
            try:
                system.procs[name].wait(10)
            except subprocess.TimeoutExpired:
                system.kill(name)
        if not system.alive(name):
            if chaos and name not in chaos.dead:
                chaos.unexpected_exits.append((name, system.procs[name].returncode))
            system.spawn(name)
        if chaos:
            chaos.dead.discard(name)
    for name in system.names:
        system.wait_healthy(name, timeout=60)


def log_deadlocks(server):
    """Have MariaDB write every deadlock to its error log, for the summary."""
    server.root("SET GLOBAL innodb_print_all_deadlocks = ON")


def deadlocks(server):
    """The statements of each deadlock MariaDB logged, shortened."""
    found = []
    try:
        with open(server.log_path, errors="replace") as f:
            text = f.read()
    except OSError:
        return found
    for block in text.split("*** (1) TRANSACTION:")[1:]:
        queries = re.findall(r"^(?:INSERT|UPDATE|SELECT|DELETE)[^\n]*", block, re.M)
        found.append(" / ".join(re.sub(r"'[^']*'", "?", q)[:110] for q in queries[:2]))
    return found


def queued_events(broker, env):
    """{queue: messages ready} for the run's RabbitMQ queues (each service's, and its
    retry queues) that are not empty; names as the services make them."""
    import pika
    from saga.common import Settings
    from saga.participant.events import retry_delays, retry_queue, service_queue
    settings = Settings(db_name=env["SAGA_DB_NAME"], max_attempts=int(env["SAGA_MAX_ATTEMPTS"]),
                        backoff_base=float(env["SAGA_BACKOFF_BASE"]),
                        backoff_max=float(env["SAGA_BACKOFF_MAX"]))
    waiting = {}
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        for svc in SERVICES:
            for queue in [service_queue(settings, svc)] + [
                    retry_queue(settings, svc, d) for d in retry_delays(settings)]:
                channel = conn.channel()
                try:
                    ready = channel.queue_declare(queue, passive=True).method.message_count
                    channel.close()
                except pika.exceptions.ChannelClosedByBroker:
                    continue   # never declared
                if ready:
                    waiting[queue] = ready
    finally:
        conn.close()
    return waiting


def wait_events_drained(broker, env, timeout):
    """Until no event waits in the run's queues (a broker killed before it stored an
    acknowledgement hands the message out again: it must be taken as a repeat)."""
    deadline = time.monotonic() + timeout
    waiting = None
    while time.monotonic() < deadline:
        try:
            waiting = queued_events(broker, env)
            if not waiting:
                return {}
        except Exception as exc:   # the broker is still coming back
            waiting = {"(broker not reachable)": str(exc)[:100]}
        time.sleep(0.5)
    return waiting


APP_ERROR = re.compile(r"^\S+ \S+ (orchestrator|service_[a-z]) (ERROR|CRITICAL) ")
SERVER_ERROR = re.compile(r"^\[[^]]+\] \[\d+\] \[(ERROR|CRITICAL)\] (.*)")


def scan_logs(logdir):
    """Errors the processes logged: an app ERROR (an unexpected exception, a 500) is a
    bug; gunicorn's own (a worker that crashed on an injected fault) are only counted."""
    app, server = [], Counter()
    for fname in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, fname), errors="replace") as f:
            for line in f:
                if APP_ERROR.match(line):
                    app.append(f"{fname}: {line.strip()[:300]}")
                elif m := SERVER_ERROR.match(line):
                    server[re.sub(r"\d+", "N", m.group(2))[:120]] += 1
    return app, server
