#!/usr/bin/env python3
"""Chaos harness: run many sagas while processes die, freeze and come back, faults come
and go and the database restarts, then check DESIGN.md rule 7 (all or nothing), the bank
invariant of the money transfer and what every client was told, straight from the
database.

    python chaos.py                                    # 200 sagas, 8 clients, random seed
    python chaos.py --seed 42 --sagas 1000 --orchestrators 2 --db-restarts 1
    python chaos.py --sagas 10000 --clients 16 --db-restarts 3      # the long run
    python chaos.py --saga transfer --sagas 3000 --clients 16 --orchestrators 2 --db-restarts 2
    python chaos.py --saga mixed --sagas 2000 --clients 16         # both saga types at once
    python chaos.py --mode choreography --sagas 3000 --second-b --db-restarts 2 \
        --broker-share 0.1
    python chaos.py --transport kafka --saga transfer --sagas 3000 --clients 16 \
        --orchestrators 2 --second-b --db-restarts 2

--saga picks what the clients run: registrations (the default), money transfers (a
Jepsen-style bank test) or a mix of the two.

--mode choreography runs registrations the services choreograph by RabbitMQ events: the
clients POST /register to service A, each with an Idempotency-Key (a request that got no
answer is sent again with it), and no orchestrator runs (--with-orchestrator starts
it too, and the chaos hits it like the rest). --transport kafka has the orchestrator(s)
send every step as a Kafka command (any --saga). Either way the harness starts a private
broker for the run (tools/brokers.py: RabbitMQ, or Tansu speaking Kafka), points every
process at it, and the chaos kills it -9, stops it gracefully or freezes it
(--broker-share of the actions, and at least one kill and one freeze): RabbitMQ comes
back with its durable queues after its 5-8 s boot, Tansu at once but empty (it keeps
everything in memory). --second-b adds a second process of B (service_b2) sharing B's
work, its Kafka command partitions or its RabbitMQ queue; the chaos kills and freezes it
too, and a fault set on B is set on both.

By default it starts everything itself, in a temporary directory: a private MariaDB
server (launcher.PrivateMariaDB), a fresh database with schema.sql, the orchestrator(s)
and services A, B, C (launcher.System) with SAGA_FAULTS=off and short timeouts and
leases. A chaos thread then, at random (seeded) moments:

  - kills a process with SIGKILL (its whole process group) and restarts it 0.1-2 s later;
  - freezes one with SIGSTOP for 0.5-3 s, then SIGCONTs it;
  - stops one gracefully (SIGTERM to its main process, like `kill <pid>`) and starts it
    again;
  - sets a fault on a service (fail, reject, drop, crash, hang; every N-th, at a rate or
    for the next K calls; on invoke, compensate or both) for 1-6 s;
  - and, with --db-restarts K, stops (or kills -9) the database and starts it again K
    times, spread over the run;
  - with a broker (above), kills it -9 or stops it, starting it again on its port
    0.5-3 s later, or freezes it for 0.5-3 s; with --unlucky P (default 0.5 over Kafka),
    a broker restart is, with probability P, followed 0.2-4 s after the broker is back by
    kill -9 of one or two service processes (restarted 0.1-2 s later), while the others
    are still finding the topics a memory-only broker created anew.

Every process (each orchestrator, A, B, C, service_b2, the broker) is killed and frozen,
and every service gets a fault, at least once if the run lasts long enough (most of the
first actions cover them, in a shuffled order; one that cannot be done now, its target
being down, is tried again after the others).

Clients (--clients, spread over the orchestrators) each POST /start and record every
answer: HTTP code, saga id, status. "Connection refused" (nothing was sent) and 503
(the database was down, nothing was made) are retried for the same saga; a connection
that dies mid-request is recorded as "no answer": that saga may exist, and must end
all-or-nothing like every other.

Transfers (--saga transfer, or half of --saga mixed) POST /transfer with a random
`from` != `to` and a random amount from 0.01 to 300.00 (drawn from the seed and the
request's number, as a decimal string or now and then a JSON number), so some are
refused for insufficient funds. Each carries an Idempotency-Key made of the run's tag and
its number: a transfer that got no answer (or a 503) is sent again with the same key,
which must answer about the one saga the key made, never move the money twice. The
chaos also slows services down (a stall shorter than the read timeout) in these runs.

A sampler thread reads every balance straight from the database every 50 ms, in one
statement (one consistent read), from before the first request to the final check: a
negative balance at any moment is a violation, and so is a total above the opening
total (money made from nothing); a total below it is money in flight (debited, not yet
credited or refunded) and only reported. Every second it also checks, in one consistent
snapshot, that each balance is its opening minus the debits STEP_LEDGER holds as
'invoked' plus the credits it holds as 'invoked': a service writes its ledger entry and
moves the money in one transaction, so this holds at every instant, not only at rest.

Then chaos stops: frozen processes (and the broker) are thawed, dead ones restarted,
faults turned off, and the harness waits (bounded, polling the database) until no saga is
RUNNING or COMPENSATING (in a choreography: and no OUTBOX event is unpublished), waits a
grace period for late requests to land (in a choreography: and until no event waits in
the services' queues, a broker restart handing some out again), and checks in the
database that:

  - every saga is COMPLETED with exactly one row in each of TABLE_A/B/C (B's and C's
    user_id pointing at A's row) or COMPENSATED with none; FAILED is a violation unless
    --allow-failed; RUNNING/COMPENSATING after the settle timeout is a stuck saga;
  - no business row lacks a saga, no saga has two rows in a table;
  - STEP_LEDGER agrees (COMPLETED: 3 'invoked'; COMPENSATED: none 'invoked') and the last
    SAGA event in SAGA_LOG is the saga's status;
  - (transfers) every transfer is COMPLETED, with its debit 'invoked' at `from` and its
    credit 'invoked' at `to` for the saga's amount and nothing else 'invoked', or
    COMPENSATED with nothing 'invoked'; FAILED is always a violation (a refund is
    retried until it lands, whatever --allow-failed says); no balance is negative, the
    total is the opening total, and each balance is its opening plus the COMPLETED
    transfers into it minus those out of it, and agrees with STEP_LEDGER; every transfer
    saga was made through a key of this run, one per key;
  - every 200 answer said COMPLETED, and its saga is COMPLETED with the row ids (or the
    amounts debited and credited) the answer gave; every 409 answer's saga is COMPENSATED
    (rejected), every 502 answer's COMPENSATED or FAILED; every 202 answer's saga exists;
    each answer names a saga made from what that client sent, and the answers to one
    key all name one saga; /start, /transfer and /register never answered another code
    but 503 (the database unavailable, or A could not run the first step: nothing was
    made; retried, and noted if the database was up);
  - every saga ran as the run asked (SAGA.mode and .transport: choreography over
    rabbitmq, or orchestration over http or kafka);
  - (choreography) every registration was made by one Idempotency-Key of this run and no
    username was registered twice; no OUTBOX event is left unpublished, none was written
    twice; no saga's SAGA_LOG shows a step done twice, undone twice, an event published
    twice or the saga settled twice; and no event is left in the services' queues;
  - no process (nor the broker) exited on its own (only the harness kills them), and
    none logged an ERROR (an unexpected exception: a 500). MariaDB's deadlocks are
    noted, not failed.

It prints a summary (seed and replay command, the mode and transport, answers by code,
outcomes, chaos actions per process and on the broker, settle time, violations with the
SAGA row, SAGA_LOG and OUTBOX of the first few sagas involved) and exits 1 on any
violation, 2 if the harness itself could not run.
The run directory (process logs, the chaos action log, the database) is removed after a
clean run and kept, with its path printed, after a violation (or with --keep).

Against a running system (--url, repeatable, plus --db-* options or the SAGA_DB_*
variables): the harness cannot kill, freeze or restart processes it did not start, nor
restart the database, so its chaos is limited to fault injection through the
orchestrator's API (PUT /faults/<service>, with --token / SAGA_API_TOKEN if set), and its
checks are limited to the sagas this run created plus the global orphan and duplicate
checks. Registrations are found by their username prefix; transfers by the saga each
of this run's Idempotency-Keys made (START_KEY), which finds even a saga whose answer
was lost, where a transfer's label ("A→B 12.50") says nothing about who sent it. The
run does not own the accounts there: the balances are checked against a reading taken
before the first request plus this run's COMPLETED transfers only if no other transfer
was running then or was started since; otherwise that check is skipped, with a note
(as are the total above the opening and the ledger agreement, which need the whole
database's history). It turns every fault off at the end.

Replaying a seed repeats the same sequence of chaos actions and client inputs; thread
timing is not replayed exactly, so a replay is likely, not certain, to hit a race again.
"""

import argparse
import heapq
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

import mysql.connector
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.append(ROOT)   # the project's own modules: the names of its queues and partitions

from brokers import PrivateKafka, PrivateRabbitMQ, list_descendants  # noqa: E402
from launcher import PrivateMariaDB, System, free_port, wait_for  # noqa: E402
import common as demo  # noqa: E402,F401  (the demo's wiring: its saga types)
from saga import common  # noqa: E402
from saga import faults  # noqa: E402
from saga.model import ACTIVE as ACTIVE_STATES, MODES, TRANSPORTS as ALL_TRANSPORTS  # noqa: E402

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
# How the sagas run: orchestrated (over HTTP or Kafka), or choreographed by the services
# over RabbitMQ (registrations only, started at A's POST /register).
TRANSPORTS = tuple(t for t in ALL_TRANSPORTS if t != "rabbitmq")   # the orchestrator's
# The share of chaos actions aimed at the broker: Kafka (Tansu) is back in a fraction of a
# second, RabbitMQ takes 5-8 s to boot, during which no event moves.
BROKER_SHARE = {False: 0.06, True: 0.03}     # by "is it RabbitMQ"
# The unlucky order (issue 18): after a restart of the Kafka broker, which comes back
# empty, kill -9 one or two service processes while the others are still finding the
# topics created anew. The share of broker restarts followed by such kills, by default.
UNLUCKY = {"kafka": 0.5}
SERVICES = {letter: f"service_{letter.lower()}" for letter in common.SERVICES}
ACTIVE = tuple(str(s) for s in ACTIVE_STATES)
TABLES = ("TABLE_A", "TABLE_B", "TABLE_C")
ROW_IDS = {"A": ("TABLE_A", "user_id"), "B": ("TABLE_B", "address_id"),
           "C": ("TABLE_C", "payment_id")}   # what /start's results name each row
# Every fault that changes an outcome (slow only delays one).
FAULT_MODES = tuple(m for m in faults.FAULT_MODES if m not in ("off", "slow"))
PAYMENTS = ("Visa", "Mastercard", "Amex", "IBAN DE89 3704", "💳 card")
# What the clients run: one saga type, or both at once.
SAGA_CHOICES = ("registration", "transfer", "mixed")
ACCOUNTS = tuple(SERVICES)            # one account per service, named by its letter
MAX_TRANSFER_CENTS = 30000            # transfers of 0.01 to 300.00: some find funds short
CENT = Decimal("0.01")


def say(*parts):
    print(*parts, flush=True)


# --- the processes ----------------------------------------------------------------------

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

    def connect(self):
        return mysql.connector.connect(**self.params)

    def query(self, sql, params=()):
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(sql, params)
            return cur.fetchall() if cur.with_rows else cur.rowcount
        finally:
            conn.close()


def money(value) -> Decimal:
    return Decimal(str(value)).quantize(CENT)


def read_accounts(cur):
    """{account: (opening, balance)} in one statement, so one consistent read."""
    cur.execute("SELECT id, opening, balance FROM ACCOUNT ORDER BY id")
    return {a: (money(o), money(b)) for a, o, b in cur.fetchall()}


def read_ledger_moves(cur):
    """{account: money it should hold by STEP_LEDGER, less its opening}: minus every debit
    still 'invoked' (a refunded one is 'compensated'), plus every credit 'invoked'."""
    cur.execute("SELECT service, op, SUM(CAST(JSON_VALUE(request, '$.amount') AS "
                "DECIMAL(14,2))) FROM STEP_LEDGER WHERE state = 'invoked' AND op IN "
                "('debit', 'credit') GROUP BY service, op")
    moves = defaultdict(Decimal)
    for account, op, total in cur.fetchall():
        moves[account] += money(total) if op == "credit" else -money(total)
    return moves


def ledger_disagreements(accounts, moves):
    return [f"account {a} holds {balance} but STEP_LEDGER says {opening + moves[a]} "
            f"(opening {opening}, moved {moves[a]:+})"
            for a, (opening, balance) in accounts.items() if balance != opening + moves[a]]


def consistent_audit(conn):
    """Balances and ledger sums from one snapshot (a service commits both together)."""
    cur = conn.cursor()
    cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
    try:
        accounts = read_accounts(cur)
        moves = read_ledger_moves(cur)
    finally:
        cur.execute("COMMIT")
    return accounts, moves


# --- the clients --------------------------------------------------------------------------

@dataclass
class Answer:
    index: int
    url: str
    code: int | None          # None: no answer (the connection died or timed out)
    saga: str | None
    status: str | None
    results: dict | None
    error: str | None
    seconds: float
    at: float = 0.0           # time.monotonic() when the answer (or its absence) came
    kind: str = "registration"
    sent: dict = field(default_factory=dict)   # the request's body
    repeated: bool = False    # answered about the saga an earlier request with its key made
    key: str | None = None    # the Idempotency-Key the request carried


@dataclass
class Request:
    kind: str                 # the saga type
    path: str
    payload: dict
    key: str | None = None    # Idempotency-Key


def not_sent(exc):
    """True when the request cannot have reached the server (so retrying makes no
    second saga): the connection was refused or never opened."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if not isinstance(exc, requests.ConnectionError):
        return False
    seen, cause = set(), exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if (isinstance(cause, ConnectionRefusedError)
                or type(cause).__name__ == "NewConnectionError"):
            return True
        cause = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__ or (
            cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None)
    return False


class Clients:
    """--clients threads taking saga numbers 0..N-1 from a shared counter; each number is
    one saga request, retried only while nothing can have been made, or (a transfer)
    under its Idempotency-Key, which makes at most one saga whatever was made before."""

    def __init__(self, urls, sagas, clients, seed, tag, timeout, deadline, retry_for,
                 saga="registration", mode="orchestration"):
        self.urls, self.sagas, self.clients, self.saga = urls, sagas, clients, saga
        self.mode = mode
        self.seed, self.tag, self.timeout = seed, tag, timeout
        self.deadline, self.retry_for = deadline, retry_for
        self.lock = threading.Lock()
        self.next_index = 0
        self.answers = []
        self.retried = Counter()       # why a saga request was sent again
        self.gave_up = 0
        self.finished = 0              # saga requests done with (answered or not)
        self.stopped_early = False
        self.threads = []
        # Past N sagas, keep sending while this says the chaos has not covered
        # everything yet (so a short run still kills and freezes every process).
        self.more = lambda: False

    def username(self, index):
        return f"{self.tag}-{index}"

    def key(self, index, kind="transfer"):
        return f"{self.tag}-{kind[0]}{index}"

    def key_prefix(self):
        """What every Idempotency-Key of this run starts with."""
        return f"{self.tag}-"

    def request(self, index, rng):
        """Saga request number `index`. A transfer is drawn from the seed and its number
        alone, so a replay sends the same transfers whichever client takes them."""
        pick = random.Random(f"{self.seed}-saga-{index}")
        kind = self.saga
        if kind == "mixed":
            kind = pick.choice(("registration", "transfer"))
        if kind == "registration":
            payload = {"username": self.username(index),
                       "address": f"{index} Chaos Street, Zoë-Stadt",
                       "payment": rng.choice(PAYMENTS)}
            if self.mode == "choreography":
                # Started at A, with a key: a request that got no answer is sent again.
                return Request(kind, "/register", payload, self.key(index, kind))
            return Request(kind, "/start", payload)
        source, target = pick.sample(ACCOUNTS, 2)
        cents = pick.randint(1, MAX_TRANSFER_CENTS)
        amount = f"{cents // 100}.{cents % 100:02d}"
        # Now and then a JSON number, the seed's spelling: the API takes both.
        payload = {"from": source, "to": target,
                   "amount": cents / 100 if pick.random() < 0.25 else amount}
        return Request(kind, "/transfer", payload, self.key(index))

    def start(self):
        for k in range(self.clients):
            t = threading.Thread(target=self._client, args=(k,), name=f"client{k}", daemon=True)
            t.start()
            self.threads.append(t)

    def running(self):
        return any(t.is_alive() for t in self.threads)

    def sent(self):
        with self.lock:
            return self.next_index

    def _take(self):
        with self.lock:
            if self.next_index >= self.sagas and not self.more():
                return None
            if time.monotonic() > self.deadline:
                self.stopped_early = True
                return None
            self.next_index += 1
            return self.next_index - 1

    def _client(self, k):
        rng = random.Random(f"{self.seed}-client-{k}")
        while (index := self._take()) is not None:
            self._one(k, index, self.request(index, rng), rng)
            with self.lock:
                self.finished += 1

    def _retry(self, why, give_up):
        with self.lock:
            if time.monotonic() > give_up:
                self.gave_up += 1
                return False
            self.retried[why] += 1
            return True

    def _record(self, answer):
        answer.at = time.monotonic()
        with self.lock:
            self.answers.append(answer)

    def _one(self, k, index, req, rng):
        give_up = min(time.monotonic() + self.retry_for, self.deadline + self.retry_for)
        headers = {"Idempotency-Key": req.key} if req.key else {}
        turn = k
        while True:
            url = self.urls[turn % len(self.urls)]
            turn += 1
            started = time.monotonic()
            try:
                resp = requests.post(url + req.path, json=req.payload, headers=headers,
                                     timeout=(1, self.timeout))
            except requests.RequestException as exc:
                if not_sent(exc):
                    if not self._retry("connection refused", give_up):
                        return
                    time.sleep(rng.uniform(0.05, 0.3))
                    continue
                self._record(Answer(index, url, None, None, None, None,
                                    f"{type(exc).__name__}: {str(exc)[:200]}",
                                    time.monotonic() - started, kind=req.kind,
                                    sent=req.payload, key=req.key))
                # With a key, asking again is safe: it answers about the saga the first
                # request made, if it made one, and makes it if not.
                if req.key and self._retry("no answer (same key)", give_up):
                    time.sleep(rng.uniform(0.05, 0.3))
                    continue
                return
            try:
                body = resp.json()
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            error = body.get("error")
            if body.get("detail"):
                error = f"{error} ({body['detail']})"
            answer = Answer(index, url, resp.status_code, body.get("saga"), body.get("status"),
                            body.get("results"), error, time.monotonic() - started,
                            kind=req.kind, sent=req.payload,
                            repeated=body.get("repeated") is True, key=req.key)
            self._record(answer)
            if resp.status_code == 503 and answer.saga is None:
                # The database was unreachable and /start made nothing (or, if its commit
                # landed unacknowledged, a saga that must still end all-or-nothing).
                if not self._retry("503", give_up):
                    return
                time.sleep(rng.uniform(0.1, 0.5))
                continue
            return


# --- the chaos ----------------------------------------------------------------------------

class Chaos(threading.Thread):
    """Seeded chaos: one action every --interval seconds on average, plus the timed
    events that undo them (restart, thaw, fault off). Each tick draws the same random
    numbers whatever the outcome, so a seed replays the same sequence of actions."""

    def __init__(self, args, rng, system, server, clients, actions_log, broker=None):
        super().__init__(name="chaos", daemon=True)
        self.args, self.rng, self.system, self.server = args, rng, system, server
        # The run's message broker (RabbitMQ for a choreography, Kafka for that
        # transport), killed, stopped and frozen like a process, under its kind's name.
        self.broker = broker
        self.broker_name = broker.kind if broker else None
        self.broker_thread = None
        self.broker_freezes = 0
        self.broker_frozen = False
        self.broker_restarts = []            # (how, downtime, seconds to serve again)
        self.broker_windows = []             # (down, up) in time.monotonic()
        self.clients, self.actions_log = clients, actions_log
        self.stop_event = threading.Event()
        self.events = []                     # heap of (due, seq, kind, name, generation)
        self.seq = 0
        self.dead = set()                    # killed or stopped by us, restart pending
        self.fault_generation = Counter()
        self.freezes = Counter()             # which freeze a thaw event belongs to
        self.counts = defaultdict(Counter)   # counts[target][action]
        self.unexpected_exits = []
        self.db_restarts = []                # (mode, downtime, seconds to accept again)
        self.db_windows = []                 # (down, up) in time.monotonic()
        self.db_thread = None
        self.db_rng = random.Random(f"{args.seed}-db")
        # The unlucky kills after a broker restart draw from their own generator, so the
        # seeds of runs without them replay as before. Planned in the broker's thread,
        # scheduled by the chaos thread (the event heap is the chaos thread's own).
        self.unlucky_rng = random.Random(f"{args.seed}-unlucky")
        self.unlucky_planned = queue.SimpleQueue()
        self.unlucky_rounds = 0
        # Transfers also meet slow services (a stall within the read timeout); the
        # registration runs keep their own list, so their seeds replay as before.
        self.fault_modes = FAULT_MODES if args.saga == "registration" else FAULT_MODES + ("slow",)
        self.db_thresholds = [(j + 1) * args.sagas / (args.db_restarts + 1)
                              for j in range(args.db_restarts)]
        self.errors = []
        self.started = time.monotonic()
        self.covered_at = None               # seconds into the run when coverage was done
        names = system.names if system else []
        self.coverage = [(a, n) for n in names for a in ("kill", "freeze")]
        if system:
            self.coverage += [("fault", svc) for svc in SERVICES]
        if broker:
            self.coverage += [("kill", self.broker_name), ("freeze", self.broker_name)]
        self.rng.shuffle(self.coverage)

    # -- bookkeeping

    def note(self, text):
        now = time.time()
        clock = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        line = f"{clock} {time.monotonic() - self.started:8.2f}s {text}"
        self.actions_log.write(line + "\n")
        self.actions_log.flush()
        if self.args.verbose:
            say("  chaos:", text)

    def schedule(self, delay, kind, name, generation=0):
        self.seq += 1
        heapq.heappush(self.events, (time.monotonic() + delay, self.seq, kind, name, generation))

    # -- the loop

    def run(self):
        next_action = time.monotonic() + self.rng.uniform(0.2, 1.0) * self.args.interval
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                while not self.unlucky_planned.empty():
                    delay, name, restart_in = self.unlucky_planned.get()
                    # The event's last field, a generation elsewhere, is its restart delay.
                    self.schedule(delay, "unlucky_kill", name, restart_in)
                self.run_due_events(now)
                self.maybe_restart_database()
                if now >= next_action:
                    self.act(self.draw())
                    next_action = now + self.rng.uniform(0.3, 1.7) * self.args.interval
                self.stop_event.wait(0.05)
        except Exception:
            self.errors.append(traceback.format_exc())
            say("chaos thread crashed:\n" + traceback.format_exc())

    def draw(self):
        """One action, drawn with a fixed number of random numbers."""
        r = self.rng.random()
        names = self.system.names if self.system else []
        target = self.rng.choice(names) if names else None
        svc = self.rng.choice("ABC")
        mode = self.rng.choice(self.fault_modes)
        trigger = self.rng.choice(("every", "rate", "next"))
        every = self.rng.randint(2, 5)
        rate = round(self.rng.uniform(0.1, 0.5), 2)
        nxt = self.rng.randint(1, 5)
        on = self.rng.choices(("invoke", "compensate", "both"), (0.6, 0.2, 0.2))[0]
        seconds = round(self.rng.uniform(1.5, 3.0), 2)
        delay = self.rng.uniform(0.1, 2.0)
        freeze_for = self.rng.uniform(0.5, 3.0)
        fault_for = self.rng.uniform(1.0, 6.0)
        take_coverage = self.rng.random() < 0.7
        # Drawn only when there is a broker, so the seeds of runs without one replay
        # as before.
        broker_roll = self.rng.random() if self.broker else 1.0
        broker_how = self.rng.choices(("kill", "stop"), (0.8, 0.2))[0] if self.broker else None
        broker_down = self.rng.uniform(0.5, 3.0) if self.broker else 0.0
        covering = False
        if self.system is None:
            kind = "fault"
        elif take_coverage and self.coverage:
            kind, target = self.coverage.pop()
            covering = True
            if kind == "fault":
                svc = target
        elif broker_roll < self.args.broker_share:
            # Mostly a kill or a graceful stop, now and then a freeze.
            kind = "freeze" if broker_roll < self.args.broker_share / 4 else broker_how
            target = self.broker_name
        elif r < 0.30:
            kind = "kill"
        elif r < 0.55:
            kind = "freeze"
        elif r < 0.65:
            kind = "term"
        else:
            kind = "fault"
        fault = {"mode": mode, "on": on,
                 trigger: {"every": every, "rate": rate, "next": nxt}[trigger]}
        if mode == "hang":
            fault["seconds"] = seconds
        elif mode == "slow":
            fault["seconds"] = round(seconds / 4, 2)    # under the 1 s read timeout
        return {"kind": kind, "target": target, "svc": svc, "fault": fault, "delay": delay,
                "freeze_for": freeze_for, "fault_for": fault_for, "covering": covering,
                "broker_down": broker_down}

    def act(self, a):
        if not self._act(a) and a["covering"]:
            # A covering action that cannot be done now (its target is down or frozen)
            # goes back on the list, behind the others, to be tried again later.
            self.coverage.insert(0, (a["kind"], a["target"]))
        elif a["covering"] and not self.coverage and self.covered_at is None:
            self.covered_at = time.monotonic() - self.started
            self.note("every process killed and frozen, every service given a fault")

    def _act(self, a):
        kind, name = a["kind"], a["target"]
        s = self.system
        if kind == "fault":
            return self.set_fault(a["svc"], a["fault"], a["fault_for"])
        if name == self.broker_name:
            return self.act_on_broker(kind, a["broker_down"], a["freeze_for"])
        if name in self.dead or not s.alive(name):
            return self.note(f"skip {kind} {name}: it is down")
        if name in s.frozen and kind != "kill":
            return self.note(f"skip {kind} {name}: it is frozen")
        if kind == "kill":
            s.kill(name)
            self.dead.add(name)
            self.counts[name]["kill"] += 1
            self.note(f"kill -9 {name}; restart in {a['delay']:.2f}s")
            self.schedule(a["delay"], "restart", name)
        elif kind == "freeze":
            s.freeze(name)
            self.counts[name]["freeze"] += 1
            self.freezes[name] += 1
            self.note(f"SIGSTOP {name} for {a['freeze_for']:.2f}s")
            self.schedule(a["freeze_for"], "thaw", name, self.freezes[name])
        elif kind == "term":
            # Like `kill <pid>`: the server's master stops its workers gracefully.
            os.kill(s.procs[name].pid, signal.SIGTERM)
            self.dead.add(name)
            self.counts[name]["term"] += 1
            self.note(f"SIGTERM {name}; start again in 4s (kill -9 if still running)")
            self.schedule(4.0, "restart", name)
        return True

    def run_due_events(self, now):
        while self.events and self.events[0][0] <= now:
            _, _, kind, name, generation = heapq.heappop(self.events)
            if kind == "thaw" and name == self.broker_name:
                if self.broker_frozen and self.broker_freezes == generation:
                    self.signal_broker(signal.SIGCONT)
                    self.broker_frozen = False
                    self.note(f"SIGCONT {name}")
            elif kind == "thaw":
                if (name in self.system.frozen and self.freezes[name] == generation
                        and self.system.alive(name)):
                    self.system.thaw(name)
                    self.note(f"SIGCONT {name}")
            elif kind == "restart":
                self.restart(name)
            elif kind == "unlucky_kill":
                self.unlucky_kill(name, generation)
            elif kind == "fault_off":
                if self.fault_generation[name] == generation:
                    _, missed = self.put_fault(name, {"mode": "off"})
                    if missed:
                        # Frozen (or too busy to answer): its fault would last to the end
                        # of the run; try again shortly.
                        self.note(f"fault off on {name}: {missed} not reachable, again in 0.5s")
                        self.schedule(0.5, "fault_off", name, generation)
                    else:
                        self.note(f"fault off on {name}")

    def unlucky_kill(self, name, restart_in):
        s = self.system
        if name in self.dead or not s.alive(name):
            return self.note(f"skip kill -9 {name} after the broker's return: it is down")
        s.kill(name)
        self.dead.add(name)
        self.counts[name]["kill after broker"] += 1
        self.note(f"kill -9 {name} (after the broker's return); restart in {restart_in:.2f}s")
        self.schedule(restart_in, "restart", name)

    def restart(self, name):
        s = self.system
        if s.alive(name):
            s.kill(name)
            self.counts[name]["term forced to kill"] += 1
            self.note(f"{name} still running after SIGTERM: kill -9")
        s.spawn(name)
        self.dead.discard(name)
        self.counts[name]["start"] += 1
        self.note(f"start {name}")

    def check_processes(self):
        """Processes that died without us: a process must never exit on its own."""
        if self.system is None:
            return
        if self.broker and not self.broker_busy() and not self.broker.alive():
            rc = self.broker.proc.returncode if self.broker.proc else None
            self.unexpected_exits.append((self.broker_name, rc))
            self.note(f"{self.broker_name} exited on its own with {rc}; starting it again")
            self.broker_thread = threading.Thread(target=self.restart_broker,
                                                  args=("start", 0.0), daemon=True)
            self.broker_thread.start()
        for name in self.system.names:
            if name not in self.dead and name in self.system.procs and not self.system.alive(name):
                rc = self.system.procs[name].returncode
                self.unexpected_exits.append((name, rc))
                self.note(f"{name} exited on its own with {rc}; starting it again in 1s")
                self.dead.add(name)
                self.schedule(1.0, "restart", name)

    # -- faults

    def put_fault(self, svc, fault):
        """Set the fault on every process of service `svc` that can take it now.
        Returns (the processes that took it, those alive that could not: frozen, or
        too busy to answer)."""
        if self.system is None:
            headers = {"Authorization": f"Bearer {self.args.token}"} if self.args.token else {}
            try:
                resp = requests.put(self.args.url[0] + f"/faults/{svc}", json=fault,
                                    headers=headers, timeout=3)
                if resp.status_code == 200:
                    return [svc], []
            except requests.RequestException:
                pass
            return [], [svc]
        took, missed = [], []
        for name in self.system.instances(svc):
            if name in self.dead or not self.system.alive(name):
                continue   # it comes back without a fault
            if name in self.system.frozen:
                missed.append(name)
                continue
            try:
                resp = requests.put(self.system.url(name) + "/faults", json=fault, timeout=1)
                (took if resp.status_code == 200 else missed).append(name)
            except requests.RequestException:
                missed.append(name)
        return took, missed

    def set_fault(self, svc, fault, lifetime):
        took, _ = self.put_fault(svc, fault)
        if took:
            self.fault_generation[svc] += 1
            self.counts[f"service_{svc.lower()}"]["fault"] += 1
            where = "" if took == [SERVICES[svc]] or self.system is None else f" ({', '.join(took)})"
            self.note(f"fault on {svc}{where}: {json.dumps(fault)} for {lifetime:.2f}s")
            self.schedule(lifetime, "fault_off", svc, self.fault_generation[svc])
            return True
        self.note(f"skip fault on {svc}: {json.dumps(fault)} (service not reachable)")
        return False

    # -- the broker

    def broker_busy(self):
        return bool(self.broker_thread and self.broker_thread.is_alive())

    def act_on_broker(self, kind, downtime, freeze_for):
        name = self.broker_name
        if self.broker_busy() or not self.broker.alive():
            return self.note(f"skip {kind} {name}: it is down")
        if self.broker_frozen and kind != "kill":
            return self.note(f"skip {kind} {name}: it is frozen")
        if kind == "freeze":
            self.signal_broker(signal.SIGSTOP)
            self.broker_frozen = True
            self.broker_freezes += 1
            self.counts[name]["freeze"] += 1
            self.note(f"SIGSTOP {name} for {freeze_for:.2f}s")
            self.schedule(freeze_for, "thaw", name, self.broker_freezes)
            return True
        self.broker_frozen = False
        self.counts[name][kind] += 1
        self.broker_thread = threading.Thread(target=self.restart_broker, args=(kind, downtime),
                                              name="broker-restart", daemon=True)
        self.broker_thread.start()
        return True

    def signal_broker(self, sig):
        """The broker's process group and every descendant (some call setsid)."""
        pid = self.broker.proc.pid
        for child in [pid] + list_descendants(pid):
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass

    def restart_broker(self, how, downtime):
        """kill -9 (or stop gracefully) the broker, wait `downtime`, start it again on
        its port; a RabbitMQ node keeps its durable queues, a memory-only Kafka broker
        comes back empty."""
        name = self.broker_name
        try:
            began = time.monotonic()
            if how != "start":
                self.note(f"{name}: {'kill -9' if how == 'kill' else 'stop'}, start again "
                          f"{downtime:.2f}s later")
                self.broker_windows.append((began, None))
                self.broker.kill() if how == "kill" else self.broker.stop()
                time.sleep(downtime)
            for attempt in range(1, 4):
                try:
                    self.broker.start()
                    break
                except RuntimeError:
                    if attempt == 3:
                        raise
                    self.note(f"{name} did not start (attempt {attempt}); trying again")
                    time.sleep(1)
            took = time.monotonic() - began
            if how != "start":
                self.broker_windows[-1] = (began, time.monotonic())
                self.broker_restarts.append((how, round(downtime, 2), round(took, 2)))
            self.counts[name]["start"] += 1
            self.note(f"{name} serving again ({took:.2f}s after {how})")
            if how != "start":
                self.plan_unlucky_kills()
        except Exception:
            self.errors.append(f"{name} restart failed:\n" + traceback.format_exc())
            self.note(f"{name} restart failed")

    def plan_unlucky_kills(self):
        """With probability --unlucky, one or two service processes to kill -9 in the
        seconds after the broker is back (a fixed number of draws each time)."""
        rng, services = self.unlucky_rng, [n for n in self.system.names
                                           if n.startswith("service_")]
        roll, count = rng.random(), rng.choice((1, 2))
        victims = rng.sample(services, min(count, len(services)))
        plans = [(rng.uniform(0.2, 4.0), name, rng.uniform(0.1, 2.0)) for name in victims]
        if roll >= self.args.unlucky:
            return
        self.unlucky_rounds += 1
        self.note("after the broker's return: kill -9 " + ", ".join(
            f"{name} in {delay:.2f}s" for delay, name, _ in plans))
        for plan in plans:
            self.unlucky_planned.put(plan)

    def finish_broker(self):
        """After the chaos: the broker thawed, and running."""
        if self.broker is None:
            return
        if self.broker_thread:
            self.broker_thread.join(120)
        if self.broker_frozen:
            self.signal_broker(signal.SIGCONT)
            self.broker_frozen = False
        if not self.broker.alive():
            self.unexpected_exits.append((self.broker_name, self.broker.proc.returncode))
            self.broker.start()

    def broker_was_down(self, at, margin=5.0):
        return any(down - 0.5 <= at <= (up or float("inf")) + margin
                   for down, up in self.broker_windows)

    # -- the database

    def unfinished(self):
        """Whether some promised chaos has not happened yet: a process not yet killed or
        frozen, a service without a fault, a database restart still to come."""
        return bool(self.coverage or self.db_thresholds
                    or (self.db_thread and self.db_thread.is_alive()) or self.broker_busy())

    def maybe_restart_database(self):
        self.check_processes()
        if not self.db_thresholds or (self.db_thread and self.db_thread.is_alive()):
            return
        if self.clients.finished >= self.db_thresholds[0]:
            self.db_thresholds.pop(0)
            mode = self.db_rng.choice(("stop", "kill"))
            downtime = self.db_rng.uniform(0.5, 3.0)
            self.db_thread = threading.Thread(target=self.restart_database, args=(mode, downtime),
                                              name="db-restart", daemon=True)
            self.db_thread.start()

    def restart_database(self, mode, downtime):
        try:
            self.note(f"database: {'kill -9' if mode == 'kill' else 'stop'}, "
                      f"start again {downtime:.2f}s later")
            began = time.monotonic()
            self.db_windows.append((began, None))
            self.server.kill() if mode == "kill" else self.server.stop()
            time.sleep(downtime)
            self.server.start()
            log_deadlocks(self.server)
            took = time.monotonic() - began
            self.db_windows[-1] = (began, time.monotonic())
            self.db_restarts.append((mode, round(downtime, 2), round(took, 2)))
            self.note(f"database accepting connections again ({took:.2f}s after {mode})")
        except Exception:
            self.errors.append("database restart failed:\n" + traceback.format_exc())
            self.note("database restart failed")

    def db_was_down(self, at, margin=5.0):
        """Whether `at` falls in a database outage (or the seconds after it, while pools
        reconnect)."""
        return any(down - 0.5 <= at <= (up or float("inf")) + margin
                   for down, up in self.db_windows)

    def finish_database(self):
        if self.db_thread:
            self.db_thread.join(120)


# --- the balance sampler ------------------------------------------------------------------

class BalanceSampler(threading.Thread):
    """Reads every balance from the database every `period` seconds for the whole run,
    the way a bank test's reader does: a negative balance is a violation however briefly
    it lasted, and (when the run owns the database) so is a total above the opening
    total or, every `audit_every` reads, a balance the ledger does not account for."""

    MAX_REPORTED = 20

    def __init__(self, db, owned, period=0.05, audit_every=20):
        super().__init__(name="sampler", daemon=True)
        self.db, self.owned, self.period, self.audit_every = db, owned, period, audit_every
        self.stop_event = threading.Event()
        self.reads = 0
        self.failed_reads = 0          # the database was down or restarting
        self.audits = 0
        self.in_flight_reads = 0       # total below the opening total: money in flight
        self.opening_total = None
        self.min_balance = {}
        self.min_total = self.max_total = None
        self.violations = []
        self.bad_reads = 0
        self.errors = []

    def run(self):
        conn = None
        try:
            while not self.stop_event.is_set():
                began = time.monotonic()
                try:
                    if conn is None:
                        conn = self.db.connect()
                    self.read(conn)
                    if self.owned and self.reads % self.audit_every == 0:
                        self.audit(conn)
                except mysql.connector.Error:
                    self.failed_reads += 1
                    conn = close_quietly(conn)
                self.stop_event.wait(max(0.0, self.period - (time.monotonic() - began)))
        except Exception:
            self.errors.append(traceback.format_exc())
        finally:
            close_quietly(conn)

    def read(self, conn):
        accounts = read_accounts(conn.cursor())
        self.reads += 1
        total = sum(balance for _, balance in accounts.values())
        opening = sum(opening for opening, _ in accounts.values())
        self.opening_total = opening
        for account, (_, balance) in accounts.items():
            if account not in self.min_balance or balance < self.min_balance[account]:
                self.min_balance[account] = balance
        self.min_total = total if self.min_total is None else min(self.min_total, total)
        self.max_total = total if self.max_total is None else max(self.max_total, total)
        if total < opening:
            self.in_flight_reads += 1
        seen = {a: str(b) for a, (_, b) in accounts.items()}
        if any(balance < 0 for _, balance in accounts.values()):
            self.report(f"sampler read a negative balance: {seen}")
        if self.owned and total > opening:
            self.report(f"sampler read a total of {total}, above the opening {opening} "
                        f"(money from nothing): {seen}")

    def audit(self, conn):
        accounts, moves = consistent_audit(conn)
        self.audits += 1
        for problem in ledger_disagreements(accounts, moves):
            self.report(f"sampler, mid-run: {problem}")

    def report(self, text):
        self.bad_reads += 1
        if len(self.violations) < self.MAX_REPORTED:
            self.violations.append(f"{text} (read #{self.reads})")

    def stop(self):
        self.stop_event.set()
        self.join(10)
        if self.bad_reads > len(self.violations):
            self.violations.append(f"... and {self.bad_reads - len(self.violations)} more "
                                   "bad readings")

    def figures(self):
        return {"reads": self.reads, "failed_reads": self.failed_reads,
                "ledger_audits": self.audits, "reads_with_money_in_flight": self.in_flight_reads,
                "min_balance_seen": {a: str(b) for a, b in sorted(self.min_balance.items())},
                "min_total_seen": str(self.min_total) if self.min_total is not None else None,
                "max_total_seen": str(self.max_total) if self.max_total is not None else None}


def close_quietly(conn):
    if conn is not None:
        try:
            conn.close()
        except Exception:
            pass
    return None


# --- the checks ---------------------------------------------------------------------------

class Checker:
    """Rule 7, the bank invariant and the truth of every answer, read straight from the
    database. With a scope prefix (a shared system) it checks the sagas of this run
    only: registrations by their username prefix, transfers by this run's keys."""

    # Before the first request, how far back a foreign transfer still counts as one that
    # may move money during the run (one whose insert committed late).
    BASELINE_MARGIN = 5

    def __init__(self, db, scope_prefix=None, allow_failed=False, key_prefix=None,
                 run_as=None):
        self.db, self.prefix, self.allow_failed = db, scope_prefix, allow_failed
        self.key_prefix = key_prefix
        # (mode, transport) every saga must carry, when the run owns the database.
        self.run_as = run_as
        self.choreography = bool(run_as and run_as[0] == "choreography")
        self.violations = []
        self.suspects = []        # saga ids to dump
        self.notes = []
        self.bank = None          # the bank figures, when the run sent transfers
        self.baseline = None      # shared system: see take_baseline

    def violation(self, text, saga=None):
        self.violations.append(text)
        if saga and saga not in self.suspects:
            self.suspects.append(saga)

    def scope(self):
        if self.prefix is None:
            return "", ()
        return (" WHERE ((type = 'registration' AND label LIKE %s) OR id IN "
                "(SELECT saga_id FROM START_KEY WHERE idem_key LIKE %s))",
                (self.prefix + "-%", (self.key_prefix + "%").encode()))

    def active_count(self):
        where, params = self.scope()
        where = (where + " AND" if where else " WHERE") + " status IN ('RUNNING', 'COMPENSATING')"
        return self.db.query("SELECT COUNT(*) FROM SAGA" + where, params)[0][0]

    def unpublished_count(self):
        """Events committed to OUTBOX that no relay has published yet."""
        return self.db.query("SELECT COUNT(*) FROM OUTBOX WHERE published_at IS NULL")[0][0]

    def busy_count(self):
        """What the system still has to do: sagas running or compensating, and (in a
        choreography) events not yet published."""
        return self.active_count() + (self.unpublished_count() if self.choreography else 0)

    def key_sagas(self):
        """{Idempotency-Key: the saga it made} for this run's keys."""
        if self.key_prefix is None:
            return {}
        return {bytes(k).decode(): sid for k, sid in self.db.query(
            "SELECT idem_key, saga_id FROM START_KEY WHERE idem_key LIKE %s",
            ((self.key_prefix + "%").encode(),))}

    def take_baseline(self):
        """Against a shared system, before the first request: the balances, and whether
        another transfer is under way, so that the end can tell whether this run alone
        moved money."""
        since = self.db.query("SELECT NOW(3) - INTERVAL %s SECOND",
                              (self.BASELINE_MARGIN,))[0][0]
        running = self.db.query("SELECT COUNT(*) FROM SAGA WHERE type = 'transfer' AND "
                                "status IN ('RUNNING', 'COMPENSATING')")[0][0]
        # Recent transfers already settled: they moved their money before the reading.
        settled = {sid for (sid,) in self.db.query(
            "SELECT id FROM SAGA WHERE type = 'transfer' AND created_at >= %s AND status "
            "NOT IN ('RUNNING', 'COMPENSATING')", (since,))}
        conn = self.db.connect()
        try:
            accounts = read_accounts(conn.cursor())
        finally:
            conn.close()
        self.baseline = (since, running, settled, accounts)

    def check(self, answers, banking=False):
        where, params = self.scope()
        sagas = {}
        for sid, status, rejected, label, kind, data, reason, mode, transport in self.db.query(
                "SELECT id, status, rejected, label, type, input, reason, mode, transport "
                "FROM SAGA" + where, params):
            sagas[sid] = {"status": status, "rejected": bool(rejected), "label": label,
                          "type": kind, "input": json.loads(data), "reason": reason or "",
                          "run_as": (mode, transport)}
        rows = {t: defaultdict(list) for t in TABLES}
        for sid, rid in self.db.query("SELECT saga_id, id FROM TABLE_A"):
            rows["TABLE_A"][sid].append((rid, rid))
        for table in ("TABLE_B", "TABLE_C"):
            for sid, rid, user_id in self.db.query(f"SELECT saga_id, id, user_id FROM {table}"):
                rows[table][sid].append((rid, user_id))
        ledger = defaultdict(list)     # saga id -> [(service, op, state, request)]
        for sid, service, op, state, request in self.db.query(
                "SELECT saga_id, service, op, state, request FROM STEP_LEDGER"):
            ledger[sid].append((service, op, state, json.loads(request) if request else None))
        last_event = {}
        for sid, status in self.db.query("SELECT saga_id, status FROM SAGA_LOG "
                                         "WHERE service = 'SAGA' ORDER BY id"):
            last_event[sid] = status
        all_ids = {r[0] for r in self.db.query("SELECT id FROM SAGA")}
        key_sagas = self.key_sagas()

        outcomes = Counter(saga["status"] for saga in sagas.values())
        self.outcomes_by_type = defaultdict(Counter)
        for saga in sagas.values():
            self.outcomes_by_type[saga["type"]][saga["status"]] += 1
        for sid, saga in sagas.items():
            if saga["type"] == "transfer":
                self.check_transfer(sid, saga, ledger[sid])
            else:
                self.check_registration(sid, saga["status"], rows, ledger[sid])
            status = saga["status"]
            if status in ("COMPLETED", "COMPENSATED", "FAILED") and last_event.get(sid) != status:
                self.violation(f"saga {sid} is {status} but its last SAGA_LOG event is "
                               f"{last_event.get(sid)}", sid)
        # No business row without a saga; never two rows of one saga in a table.
        for t in TABLES:
            for sid, found in rows[t].items():
                if sid not in all_ids:
                    self.violation(f"{t} has {len(found)} row(s) for saga {sid}, "
                                   "which does not exist")
                if len(found) > 1:
                    self.violation(f"{t} has {len(found)} rows for saga {sid}", sid)
        transfers = {sid: saga for sid, saga in sagas.items() if saga["type"] == "transfer"}
        if banking or transfers:
            self.check_bank(transfers, ledger, all_ids, key_sagas)
        if self.run_as:
            self.check_run_as(sagas)
        if self.choreography:
            self.check_registration_keys(sagas, key_sagas)
            self.check_events()
        # What the clients were told.
        told = defaultdict(set)
        for a in answers:
            self.check_answer(a, sagas, rows, key_sagas)
            if a.saga is not None and a.key is not None:
                told[(a.kind, a.index)].add(a.saga)
        for (kind, index), named in told.items():
            if len(named) > 1:
                self.violation(f"{kind} request #{index} was answered about {len(named)} "
                               f"sagas under one Idempotency-Key: {sorted(named)}",
                               sorted(named)[0])
        return outcomes

    def check_run_as(self, sagas):
        """Every saga ran the way the run asked for (a choreography over RabbitMQ, or
        orchestrated over the transport given)."""
        wrong = Counter(saga["run_as"] for saga in sagas.values()
                        if saga["run_as"] != self.run_as)
        for (mode, transport), n in wrong.items():
            sid = next(s for s, saga in sagas.items() if saga["run_as"] == (mode, transport))
            self.violation(f"{n} saga(s) ran as {mode} over {transport}, not "
                           f"{self.run_as[0]} over {self.run_as[1]} (e.g. {sid})", sid)

    def check_registration_keys(self, sagas, key_sagas):
        """Registrations sent with an Idempotency-Key (a choreography's /register): each
        saga was made by one key of this run, and no username was registered twice."""
        made = set(key_sagas.values())
        labels = Counter(saga["label"] for saga in sagas.values()
                         if saga["type"] == "registration")
        for sid, saga in sagas.items():
            if saga["type"] != "registration":
                continue
            if sid not in made:
                self.violation(f"registration {sid} ({saga['label']}) was not made by any "
                               "Idempotency-Key of this run", sid)
            if labels[saga["label"]] > 1:
                self.violation(f"{saga['label']} was registered by {labels[saga['label']]} "
                               "sagas (one request, one key)", sid)

    def check_events(self):
        """A choreography's events: every one published by quiet, none written twice,
        and no step done (or undone) twice by the services' reactions."""
        for sid, service, event, created in self.db.query(
                "SELECT saga_id, service, event, created_at FROM OUTBOX "
                "WHERE published_at IS NULL ORDER BY id LIMIT 20"):
            self.violation(f"OUTBOX: {service}'s event {event} of saga {sid} (written "
                           f"{created}) is still unpublished at quiet", sid)
        for sid, service, event, n in self.db.query(
                "SELECT saga_id, service, event, COUNT(*) FROM OUTBOX GROUP BY saga_id, "
                "service, event HAVING COUNT(*) > 1 LIMIT 20"):
            self.violation(f"OUTBOX: {service} wrote event {event} of saga {sid} {n} times", sid)
        for sid, service, action, n in self.db.query(
                "SELECT saga_id, service, action, COUNT(*) FROM SAGA_LOG WHERE service <> "
                "'SAGA' AND action IN ('invoke', 'compensate') AND status = 'success' "
                "GROUP BY saga_id, service, action HAVING COUNT(*) > 1 LIMIT 20"):
            self.violation(f"SAGA_LOG: saga {sid}'s step at {service} was "
                           f"{'done' if action == 'invoke' else 'undone'} {n} times", sid)
        for sid, service, event, n in self.db.query(
                "SELECT saga_id, service, event, COUNT(*) FROM SAGA_LOG WHERE action = "
                "'publish' GROUP BY saga_id, service, event HAVING COUNT(*) > 1 LIMIT 20"):
            self.violation(f"SAGA_LOG: {service} logged publishing {event} of saga {sid} "
                           f"{n} times (an OUTBOX row claimed twice)", sid)
        for sid, events in self.db.query(
                "SELECT saga_id, GROUP_CONCAT(status ORDER BY id) FROM SAGA_LOG WHERE service "
                "= 'SAGA' AND status IN ('COMPLETED', 'COMPENSATED', 'FAILED') GROUP BY "
                "saga_id HAVING COUNT(*) > 1 LIMIT 20"):
            self.violation(f"SAGA_LOG: saga {sid} settled more than once: {events}", sid)

    def check_registration(self, sid, status, rows, entries):
        counts = {t: len(rows[t].get(sid, ())) for t in TABLES}
        invoked = sum(1 for _, _, state, _ in entries if state == "invoked")
        if status == "COMPLETED":
            if counts != {t: 1 for t in TABLES}:
                self.violation(f"saga {sid} COMPLETED but rows {counts}", sid)
            else:
                a_id = rows["TABLE_A"][sid][0][0]
                for t in ("TABLE_B", "TABLE_C"):
                    if rows[t][sid][0][1] != a_id:
                        self.violation(f"saga {sid}: {t}.user_id {rows[t][sid][0][1]} is not "
                                       f"its TABLE_A row {a_id}", sid)
            if invoked != 3:
                self.violation(f"saga {sid} COMPLETED but STEP_LEDGER {ledger_states(entries)}",
                               sid)
        elif status == "COMPENSATED":
            if any(counts.values()):
                self.violation(f"saga {sid} COMPENSATED but rows {counts}", sid)
            if invoked:
                self.violation(f"saga {sid} COMPENSATED but STEP_LEDGER "
                               f"{ledger_states(entries)}", sid)
        elif status == "FAILED":
            if not self.allow_failed:
                self.violation(f"saga {sid} FAILED (rows {counts}); a compensation "
                               "could not be made to succeed", sid)
        else:
            self.violation(f"saga {sid} still {status} after the settle timeout (stuck)", sid)

    def check_transfer(self, sid, saga, entries):
        """COMPLETED: exactly the debit at `from` and the credit at `to` are 'invoked', each
        for the saga's amount; COMPENSATED: nothing is 'invoked' (a debit was refunded,
        refused or never made; a credit was refused or never made)."""
        status, data = saga["status"], saga["input"]
        name = f"transfer {sid} ({saga['label']})"
        invoked = {(svc, op): request for svc, op, state, request in entries
                   if state == "invoked"}
        if status == "COMPLETED":
            want = {(data["from"], "debit"), (data["to"], "credit")}
            if set(invoked) != want:
                self.violation(f"{name} COMPLETED but 'invoked' in STEP_LEDGER: "
                               f"{sorted(invoked) or 'nothing'} (expected the debit at "
                               f"{data['from']} and the credit at {data['to']})", sid)
            for (svc, op), request in invoked.items():
                request = request or {}
                if request.get("account") != svc or \
                        money(request.get("amount", 0)) != money(data["amount"]):
                    self.violation(f"{name}: its {op} at {svc} was for {request}, not "
                                   f"{data['amount']} on account {svc}", sid)
        elif status == "COMPENSATED":
            if invoked:
                self.violation(f"{name} COMPENSATED but STEP_LEDGER still holds "
                               f"{sorted(invoked)} 'invoked' (money moved)", sid)
        elif status == "FAILED":
            self.violation(f"{name} FAILED: a refund is retried until it lands, so a "
                           "transfer never fails", sid)
        else:
            self.violation(f"{name} still {status} after the settle timeout (stuck)", sid)

    def check_bank(self, transfers, ledger, all_ids, key_sagas):
        """At quiet: no balance negative; each balance its opening (or, on a shared system,
        the reading before the run) plus the COMPLETED transfers into it minus those out of
        it; the total unchanged; the ledger agreeing with every balance."""
        conn = self.db.connect()
        try:
            accounts, moves = consistent_audit(conn)
        finally:
            conn.close()
        delta = defaultdict(Decimal)
        moved = Decimal("0.00")
        for saga in transfers.values():
            if saga["status"] == "COMPLETED":
                amount = money(saga["input"]["amount"])
                delta[saga["input"]["from"]] -= amount
                delta[saga["input"]["to"]] += amount
                moved += amount
        for account, (_, balance) in accounts.items():
            if balance < 0:
                self.violation(f"account {account} holds {balance}, a negative balance")
        opening_total = sum(o for o, _ in accounts.values())
        total = sum(b for _, b in accounts.values())
        if self.prefix is None:
            basis, check = {a: o for a, (o, _) in accounts.items()}, "checked"
            for problem in ledger_disagreements(accounts, moves):
                self.violation(f"at quiet: {problem}")
            for sid, entries in ledger.items():
                moved_here = [(svc, op) for svc, op, state, _ in entries
                              if state == "invoked" and op in ("debit", "credit")]
                if moved_here and sid not in all_ids:
                    self.violation(f"STEP_LEDGER moved money ({moved_here}) for saga {sid}, "
                                   "which does not exist")
            made = set(key_sagas.values())
            for sid in transfers:
                if sid not in made:
                    self.violation(f"transfer {sid} ({transfers[sid]['label']}) was not made "
                                   "by any Idempotency-Key of this run (a second saga for "
                                   "one request?)", sid)
        else:
            basis, check = self.shared_basis(transfers)
        if basis is not None:
            if total != sum(basis.values()):
                self.violation(f"money not conserved: the accounts hold {total}, "
                               f"{'opened with' if self.prefix is None else 'held'} "
                               f"{sum(basis.values())}")
            for account, (_, balance) in accounts.items():
                expected = basis[account] + delta[account]
                if balance != expected:
                    self.violation(f"account {account} holds {balance}, but its "
                                   f"{'opening' if self.prefix is None else 'reading before the run'}"
                                   f" {basis[account]} plus the COMPLETED transfers "
                                   f"({delta[account]:+}) is {expected}")
        else:
            self.notes.append(f"balances not checked against the transfers: {check}")
        counts = Counter(saga["status"] for saga in transfers.values())
        refused = [saga for saga in transfers.values()
                   if saga["status"] == "COMPENSATED" and saga["rejected"]]
        short = sum(1 for saga in refused if "insufficient funds" in saga["reason"])
        self.bank = {
            "transfers": len(transfers), "completed": counts.get("COMPLETED", 0),
            "compensated": counts.get("COMPENSATED", 0), "refused": len(refused),
            "refused_insufficient_funds": short, "refused_other": len(refused) - short,
            "failed": counts.get("FAILED", 0), "money_moved": str(moved),
            "opening": {a: str(o) for a, (o, _) in accounts.items()},
            "balances": {a: str(b) for a, (_, b) in accounts.items()},
            "opening_total": str(opening_total), "total": str(total),
            "balance_check": check}

    def shared_basis(self, transfers):
        """On a shared system: the balances read before the run, if this run's transfers
        are the only ones that can have moved money since; (None, why not) otherwise."""
        if self.baseline is None:
            return None, "no reading before the run"
        since, running, settled, accounts = self.baseline
        if running:
            return None, (f"{running} other transfer(s) were running when the run began "
                          "(the run does not own the accounts)")
        others = [sid for (sid,) in self.db.query(
            "SELECT id FROM SAGA WHERE type = 'transfer' AND created_at >= %s", (since,))
            if sid not in transfers and sid not in settled]
        if others:
            return None, (f"{len(others)} other transfer(s) were started during the run "
                          "(the run does not own the accounts)")
        return ({a: b for a, (_, b) in accounts.items()},
                "checked against the reading before the run (no one else moved money)")

    def check_answer(self, a, sagas, rows, key_sagas):
        said = f"answer {a.code} {a.status} to {a.kind} request #{a.index}"
        if a.code is None:
            return
        if a.code == 503 and a.saga is None:
            return
        if a.saga is None:
            return self.violation(f"{said} ({a.url}) carried no saga id: {a.error}")
        if a.saga not in sagas:
            return self.violation(f"{said}: saga {a.saga} is not in the database", a.saga)
        saga = sagas[a.saga]
        status, rejected = saga["status"], saga["rejected"]
        if a.kind == "transfer":
            data = saga["input"]
            if saga["type"] != "transfer" or data.get("from") != a.sent["from"] or \
                    data.get("to") != a.sent["to"] or \
                    money(data.get("amount", 0)) != money(a.sent["amount"]):
                self.violation(f"{said}: saga {a.saga} is {saga['type']} {data}, not the "
                               f"transfer {a.sent} that was sent", a.saga)
        elif saga["type"] != "registration" or saga["label"] != a.sent.get("username"):
            self.violation(f"{said}: saga {a.saga} is {saga['type']} {saga['label']!r}, not "
                           f"the registration of {a.sent.get('username')!r}", a.saga)
        if a.key is not None and key_sagas.get(a.key) != a.saga:
            self.violation(f"{said}: its Idempotency-Key made saga "
                           f"{key_sagas.get(a.key)}, not {a.saga}", a.saga)
        if a.code == 200:
            if a.status != "COMPLETED":
                self.violation(f"{said}: 200 with status {a.status}", a.saga)
            if status != "COMPLETED":
                self.violation(f"{said}: the client was told COMPLETED but saga {a.saga} "
                               f"is {status}", a.saga)
            elif isinstance(a.results, dict) and a.kind == "transfer":
                self.check_transfer_results(said, a, saga["input"])
            elif isinstance(a.results, dict):
                for svc, (t, id_name) in ROW_IDS.items():
                    rid = (a.results.get(svc) or {}).get(id_name)
                    have = [r for r, _ in rows[t].get(a.saga, ())]
                    if rid is not None and rid not in have:
                        self.violation(f"{said}: told {t} id {rid}, the row is {have}", a.saga)
        elif a.code == 202:
            if a.status not in ACTIVE:
                self.violation(f"{said}: 202 with status {a.status}", a.saga)
        elif a.code == 409:
            if a.status != "COMPENSATED":
                self.violation(f"{said}: 409 with status {a.status}", a.saga)
            if status != "COMPENSATED" or not rejected:
                self.violation(f"{said}: saga {a.saga} is {status} (rejected={rejected})", a.saga)
        elif a.code == 502:
            if a.status not in ("COMPENSATED", "FAILED"):
                self.violation(f"{said}: 502 with status {a.status}", a.saga)
            if status not in ("COMPENSATED", "FAILED"):
                self.violation(f"{said}: saga {a.saga} is {status}", a.saga)
        else:
            self.violation(f"{said}: unexpected HTTP {a.code}: {a.error}", a.saga)

    def check_transfer_results(self, said, a, data):
        """A 200 names what was debited and credited: the saga's amount, on its accounts."""
        for step, account, verb in (("debit", data["from"], "debited"),
                                    ("credit", data["to"], "credited")):
            got = a.results.get(step)
            if not isinstance(got, dict):
                self.violation(f"{said}: results carry no {step}: {a.results}", a.saga)
            elif got.get("account") != account or money(got.get(verb, 0)) != money(data["amount"]):
                self.violation(f"{said}: told {step} {got}, the transfer is {data['amount']} "
                               f"{data['from']}→{data['to']}", a.saga)

    def dump(self, sid):
        out = []
        rows = self.db.query("SELECT id, type, label, input, status, step, attempt, "
                             "failed_step, reason, rejected, lease_owner, lease_until, fence, "
                             "created_at, updated_at FROM SAGA WHERE id = %s", (sid,))
        out.append(f"  SAGA {rows[0] if rows else None}")
        if not rows or rows[0][1] == "registration":
            for t in TABLES:
                out.append(f"  {t}: {self.db.query(f'SELECT * FROM {t} WHERE saga_id = %s', (sid,))}")
        out.append("  STEP_LEDGER:")
        for r in self.db.query("SELECT service, op, state, request, answer, created_at, "
                               "updated_at FROM STEP_LEDGER WHERE saga_id = %s", (sid,)):
            out.append("    " + " | ".join(str(v) for v in r))
        out.append("  SAGA_LOG:")
        for r in self.db.query("SELECT id, created_at, service, action, step, attempt, status, "
                               "http_status, elapsed_ms, event, message FROM SAGA_LOG "
                               "WHERE saga_id = %s ORDER BY id", (sid,)):
            out.append("    " + " | ".join(str(v) for v in r))
        outbox = self.db.query("SELECT id, service, event, created_at, published_at FROM OUTBOX "
                               "WHERE saga_id = %s ORDER BY id", (sid,))
        if outbox:
            out.append("  OUTBOX:")
            for r in outbox:
                out.append("    " + " | ".join(str(v) for v in r))
        return "\n".join(out)


def ledger_states(entries):
    return dict(Counter(state for _, _, state, _ in entries))


# --- the run ------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Long runs: python chaos.py --sagas 10000 --clients 16 "
                                       "--db-restarts 3; python chaos.py --saga transfer "
                                       "--sagas 3000 --clients 16 --orchestrators 2 "
                                       "--db-restarts 2; python chaos.py --mode choreography "
                                       "--sagas 3000 --second-b --db-restarts 2 --broker-share "
                                       "0.1; python chaos.py --transport kafka --saga transfer "
                                       "--sagas 3000 --clients 16 --orchestrators 2 --second-b "
                                       "--db-restarts 2")
    p.add_argument("--sagas", type=int, default=200, help="saga requests to make (default 200)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--saga", choices=SAGA_CHOICES, default="registration",
                   help="what the clients run: registrations (default), money transfers "
                   "(a bank test: balances sampled, money conserved) or a mix of both")
    p.add_argument("--seed", type=int, default=None, help="seed for the chaos and the inputs "
                   "(default: random, printed)")
    p.add_argument("--mode", choices=MODES, default="orchestration",
                   help="orchestrated sagas (default), or registrations choreographed by the "
                   "services over a private RabbitMQ, started at A's POST /register with an "
                   "Idempotency-Key; no orchestrator runs unless --with-orchestrator")
    p.add_argument("--transport", choices=TRANSPORTS, default="http",
                   help="how the orchestrator calls the services: HTTP (default) or Kafka "
                   "commands through a private Kafka-protocol broker")
    p.add_argument("--with-orchestrator", action="store_true",
                   help="choreography: run the orchestrator(s) too (its recovery must leave "
                   "choreographed sagas alone), and kill and freeze it like the rest")
    p.add_argument("--second-b", action="store_true",
                   help="a second process of service B (service_b2) sharing its work: its "
                   "Kafka command partitions, or its RabbitMQ queue")
    p.add_argument("--broker-share", type=float, default=None,
                   help="with a broker: the share of chaos actions aimed at it (kill -9, "
                   "graceful stop, freeze; default 0.03 for RabbitMQ, whose restart takes "
                   "5-8 s, and 0.06 for Kafka)")
    p.add_argument("--unlucky", type=float, default=None, metavar="P",
                   help="after a broker restart, with probability P, kill -9 one or two "
                   "service processes 0.2-4 s after the broker is back (default 0.5 with "
                   "--transport kafka, else 0)")
    p.add_argument("--orchestrators", type=int, default=1,
                   help="orchestrator processes sharing the database (default 1)")
    p.add_argument("--db-restarts", type=int, default=0,
                   help="restart the database this many times during the run (default 0)")
    p.add_argument("--interval", type=float, default=0.7,
                   help="mean seconds between chaos actions (default 0.7)")
    p.add_argument("--no-chaos", action="store_true", help="no chaos thread (a baseline run)")
    p.add_argument("--allow-failed", action="store_true",
                   help="a FAILED registration is not a violation (it needs an operator); "
                   "a FAILED transfer always is (its refund never gives up)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop sending new sagas after this long (default 120 + sagas/2)")
    p.add_argument("--settle-timeout", type=float, default=180,
                   help="longest wait for quiet after the chaos stops (default 180)")
    p.add_argument("--grace", type=float, default=3.5,
                   help="seconds to wait after quiet for late requests to land (default 3.5)")
    p.add_argument("--dump", type=int, default=5, help="sagas to print in full on a violation")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="print every chaos action")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the processes (repeatable)")
    g = p.add_argument_group("against a running system (fault injection only)")
    g.add_argument("--url", action="append", default=[],
                   help="an orchestrator's URL (repeatable); the harness then starts nothing")
    g.add_argument("--db-host", default=os.environ.get("SAGA_DB_HOST", "127.0.0.1"))
    g.add_argument("--db-port", type=int, default=int(os.environ.get("SAGA_DB_PORT", "3306")))
    g.add_argument("--db-user", default=os.environ.get("SAGA_DB_USER", "saga"))
    g.add_argument("--db-password", default=os.environ.get("SAGA_DB_PASSWORD", "saga"))
    g.add_argument("--db-name", default=os.environ.get("SAGA_DB_NAME", "saga_db"))
    g.add_argument("--token", default=os.environ.get("SAGA_API_TOKEN"),
                   help="bearer token for PUT /faults (default $SAGA_API_TOKEN)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10 ** 6)
    if args.url and args.db_restarts:
        p.error("--db-restarts needs the harness to own the database (no --url)")
    if args.url and args.orchestrators != 1:
        p.error("--orchestrators starts processes; with --url, pass --url once per orchestrator")
    if args.sagas < 1 or args.clients < 1 or args.orchestrators < 1 or args.db_restarts < 0:
        p.error("--sagas, --clients and --orchestrators must be at least 1")
    if args.url and (args.mode != "orchestration" or args.transport != "http" or args.second_b):
        p.error("--mode choreography, --transport kafka and --second-b start a broker and "
                "processes: the harness must own the system (no --url)")
    if args.mode == "choreography":
        if args.saga != "registration":
            p.error("--mode choreography runs registrations only (--saga registration)")
        if args.transport != "http":
            p.error("a choreography travels over RabbitMQ: --transport does not apply")
        if args.orchestrators != 1 and not args.with_orchestrator:
            p.error("--orchestrators needs --with-orchestrator in a choreography")
    elif args.with_orchestrator:
        p.error("--with-orchestrator is for --mode choreography (orchestrated runs have one)")
    if args.second_b and args.mode == "orchestration" and args.transport == "http":
        p.error("--second-b needs --transport kafka or --mode choreography (over HTTP the "
                "orchestrator calls one URL per service)")
    if args.broker_share is None:
        args.broker_share = BROKER_SHARE[args.mode == "choreography"]
    if not 0 <= args.broker_share <= 1:
        p.error("--broker-share must be from 0 to 1")
    if args.unlucky is None:
        args.unlucky = UNLUCKY.get(run_as(args)[1], 0.0) if uses_broker(args) else 0.0
    if not 0 <= args.unlucky <= 1:
        p.error("--unlucky must be from 0 to 1")
    if args.max_seconds is None:
        args.max_seconds = 120 + args.sagas / 2
    return args


def replay_command(args):
    cmd = ["python chaos.py", f"--seed {args.seed}", f"--sagas {args.sagas}",
           f"--clients {args.clients}"]
    if args.saga != "registration":
        cmd.append(f"--saga {args.saga}")
    if args.mode != "orchestration":
        cmd.append(f"--mode {args.mode}")
    if args.transport != "http":
        cmd.append(f"--transport {args.transport}")
    if args.with_orchestrator:
        cmd.append("--with-orchestrator")
    if args.second_b:
        cmd.append("--second-b")
    if uses_broker(args) and args.broker_share != BROKER_SHARE[args.mode == "choreography"]:
        cmd.append(f"--broker-share {args.broker_share}")
    if uses_broker(args) and args.unlucky != UNLUCKY.get(run_as(args)[1], 0.0):
        cmd.append(f"--unlucky {args.unlucky}")
    if args.orchestrators != 1:
        cmd.append(f"--orchestrators {args.orchestrators}")
    if args.db_restarts:
        cmd.append(f"--db-restarts {args.db_restarts}")
    if args.interval != 0.7:
        cmd.append(f"--interval {args.interval}")
    if args.allow_failed:
        cmd.append("--allow-failed")
    if args.no_chaos:
        cmd.append("--no-chaos")
    for e in args.env:
        cmd.append(f"--env {e}")
    for u in args.url:
        cmd.append(f"--url {u}")
    return " ".join(cmd)


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


def faults_off(args, system):
    targets = [(svc, name) for svc in SERVICES for name in
               (system.instances(svc) if system is not None else [None])]
    for svc, name in targets:
        resp = None
        for _ in range(20):
            try:
                if system is not None:
                    resp = requests.put(system.url(name) + "/faults", json={"mode": "off"},
                                        timeout=2)
                else:
                    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
                    resp = requests.put(args.url[0] + f"/faults/{svc}", json={"mode": "off"},
                                        headers=headers, timeout=5)
                if resp.status_code == 200:
                    break
                if resp.status_code == 401:
                    raise RuntimeError("PUT /faults needs the operator token: pass --token "
                                       "or set SAGA_API_TOKEN")
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            detail = (f"HTTP {resp.status_code}: {resp.text[:200]}" if resp is not None
                      else "no answer")
            raise RuntimeError(f"could not turn faults off on {name or 'service ' + svc} "
                               f"({detail})")


APP_ERROR = re.compile(r"^\S+ \S+ (orchestrator|service_[abc]) (ERROR|CRITICAL) ")
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


def wait_quiet(checker, timeout):
    """Until no saga is running or compensating (and, in a choreography, no event waits
    in OUTBOX); returns (seconds waited, what was still busy at the end)."""
    began = time.monotonic()
    last = None
    while True:
        try:
            last = checker.busy_count()
            if last == 0:
                return time.monotonic() - began, 0
        except mysql.connector.Error:
            pass
        if time.monotonic() - began > timeout:
            return time.monotonic() - began, last
        time.sleep(0.25)


def summarize(args, clients, chaos, checker, outcomes, timing, stuck, extra_notes,
              sampler=None):
    codes = Counter("no answer" if a.code is None else str(a.code) for a in clients.answers)
    codes_by_type = defaultdict(Counter)
    for a in clients.answers:
        codes_by_type[a.kind]["no answer" if a.code is None else str(a.code)] += 1
    bank = None
    if checker.bank is not None:
        bank = {**checker.bank, **(sampler.figures() if sampler else {})}
    per_process = {name: dict(c) for name, c in sorted(chaos.counts.items())} if chaos else {}
    db_restarts = chaos.db_restarts if chaos else []
    broker = None
    if uses_broker(args):
        acted = chaos.counts.get(chaos.broker_name, {}) if chaos else {}
        broker = {"kind": "rabbitmq" if args.mode == "choreography" else "kafka",
                  "kills": acted.get("kill", 0), "stops": acted.get("stop", 0),
                  "freezes": acted.get("freeze", 0),
                  "restarts": chaos.broker_restarts if chaos else [],
                  "followed_by_service_kills": chaos.unlucky_rounds if chaos else 0}
    mode, transport = run_as(args)
    summary = {
        "seed": args.seed,
        "saga": args.saga,
        "mode": mode,
        "transport": transport,
        "run": describe_run(args),
        "orchestrator_running": args.mode != "choreography" or args.with_orchestrator,
        "second_b": args.second_b,
        "broker": broker,
        "broker_kills": broker["kills"] if broker else 0,
        "replay": replay_command(args),
        "sagas_requested": args.sagas,
        "sagas_sent": clients.sent(),
        "stopped_early": clients.stopped_early,
        "sagas_in_db": sum(outcomes.values()),
        "answers": dict(sorted(codes.items())),
        "answers_by_type": {k: dict(sorted(c.items())) for k, c in sorted(codes_by_type.items())},
        "repeated_answers": sum(1 for a in clients.answers if a.repeated),
        "retried": dict(clients.retried),
        "gave_up": clients.gave_up,
        "no_answer": len([a for a in clients.answers if a.code is None]),
        "no_answer_saga_exists": extra_notes.get("no_answer_exists", 0),
        "no_answer_kinds": dict(Counter((a.error or "").split(":")[0] for a in clients.answers
                                        if a.code is None)),
        "completed": outcomes.get("COMPLETED", 0),
        "compensated": outcomes.get("COMPENSATED", 0),
        "failed": outcomes.get("FAILED", 0),
        "stuck": stuck,
        "outcomes_by_type": {k: dict(c) for k, c in
                             sorted(getattr(checker, "outcomes_by_type", {}).items())},
        "bank": bank,
        "chaos": per_process,
        "db_restarts": db_restarts,
        "db_restarts_requested": args.db_restarts,
        "unexpected_exits": chaos.unexpected_exits if chaos else [],
        "coverage_left": chaos.coverage if chaos else [],
        "covered_after": round(chaos.covered_at, 1) if chaos and chaos.covered_at else None,
        "timing": timing,
        "violations": checker.violations,
        "notes": extra_notes.get("notes", []),
    }
    say("")
    say(f"===== chaos summary (seed {args.seed}) =====")
    say(f"replay:      {summary['replay']}")
    say(f"run:         {args.saga} sagas, {summary['run']}")
    say(f"sagas:       {args.sagas} requested, {summary['sagas_sent']} sent"
        f"{' (stopped at --max-seconds)' if clients.stopped_early else ''}, "
        f"{summary['sagas_in_db']} in the database")
    say("answers:     " + "  ".join(f"{k}: {v}" for k, v in summary["answers"].items())
        + f"   (retried: {dict(clients.retried) or 'none'}; gave up: {clients.gave_up})")
    say(f"no answer:   {summary['no_answer']} (of which {summary['no_answer_saga_exists']} "
        f"sagas were made anyway; all checked like the rest) {summary['no_answer_kinds'] or ''}")
    say(f"outcomes:    completed {summary['completed']}  compensated {summary['compensated']}  "
        f"failed {summary['failed']}  stuck {stuck}")
    if args.saga == "mixed":
        for kind, c in summary["outcomes_by_type"].items():
            say(f"  {kind:<13} " + "  ".join(f"{k.lower()} {v}" for k, v in sorted(c.items()))
                + "   answers " + "  ".join(f"{k}: {v}" for k, v in
                                           summary["answers_by_type"].get(kind, {}).items()))
    if bank:
        say(f"bank:        transfers {bank['transfers']}: completed {bank['completed']}, "
            f"compensated {bank['compensated']} (refused {bank['refused']}: insufficient "
            f"funds {bank['refused_insufficient_funds']}, other {bank['refused_other']}), "
            f"failed {bank['failed']}; money moved {bank['money_moved']}")
        say("bank:        balances " + "  ".join(f"{a} {b}" for a, b in bank["balances"].items())
            + f"  total {bank['total']} (opening {bank['opening_total']}); "
            + f"repeated-key answers {summary['repeated_answers']}")
        if "reads" in bank:
            say(f"sampler:     {bank['reads']} reads ({bank['failed_reads']} failed while the "
                f"database was away), {bank['ledger_audits']} ledger audits; min balance seen "
                + "  ".join(f"{a} {b}" for a, b in bank["min_balance_seen"].items())
                + f"; total seen {bank['min_total_seen']}..{bank['max_total_seen']} "
                f"(below the opening in {bank['reads_with_money_in_flight']} reads: money "
                "in flight between a debit and its credit)")
        say(f"bank:        balance check: {bank['balance_check']}")
    if chaos:
        for name, c in per_process.items():
            say(f"chaos:       {name:<14} " + "  ".join(f"{k} {v}" for k, v in sorted(c.items())))
        if chaos.system is None:
            say("chaos:       fault injection only (--url: the harness owns no process)")
        else:
            say(f"database:    {len(db_restarts)} of {args.db_restarts} restart(s) "
                + ", ".join(f"{m} (down {d}s, back after {t}s)" for m, d, t in db_restarts))
        if broker:
            back = [t for _, _, t in broker["restarts"]]
            say(f"broker:      {broker['kind']} killed -9 {broker['kills']}, stopped "
                f"{broker['stops']}, frozen {broker['freezes']} time(s)"
                + (f"; serving again {min(back):.1f}-{max(back):.1f}s after each"
                   if back else "")
                + (f"; {broker['followed_by_service_kills']} restart(s) followed by kill -9 "
                   "of service processes" if broker["followed_by_service_kills"] else ""))
        if chaos.unexpected_exits:
            say(f"exits:       processes that died on their own: {chaos.unexpected_exits}")
    if summary["covered_after"] is not None:
        say(f"coverage:    every process{' and the broker' if broker else ''} killed and "
            f"frozen, every service given a fault, after {summary['covered_after']}s")
    say(f"timing:      chaos phase {timing['chaos_phase']:.1f}s, recovery (thaw/restart) "
        f"{timing['recover']:.1f}s, settle to quiet {timing['settle']:.1f}s "
        f"(from chaos stop), total {timing['total']:.1f}s")
    for note in summary["notes"]:
        say(f"note:        {note}")
    say(f"violations:  {len(checker.violations)}")
    for v in checker.violations[:100]:
        say(f"  - {v}")
    if len(checker.violations) > 100:
        say(f"  ... and {len(checker.violations) - 100} more")
    return summary


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    say(f"chaos seed {args.seed}  (replay: {replay_command(args)})")
    rng = random.Random(args.seed)
    tag = f"chaos{args.seed}-{uuid.uuid4().hex[:6]}"
    owned = not args.url
    rundir = tempfile.mkdtemp(prefix=f"saga-chaos-{args.seed}-")
    keep = args.keep
    server = broker = system = chaos = sampler = None
    banking = args.saga != "registration"     # the run moves money
    began = time.monotonic()
    try:
        if owned:
            server, broker, system, db, env = start_owned(args, rundir)
            # A choreography starts at A's /register; the rest at the orchestrators.
            urls = [system.url("service_a")] if args.mode == "choreography" else \
                [system.url(n) for n in system.orchestrators]
            client_timeout = float(env["SAGA_START_WAIT"]) + 30
        else:
            urls = [u.rstrip("/") for u in args.url]
            db = Database(args.db_host, args.db_port, args.db_user, args.db_password, args.db_name)
            db.query("SELECT 1")
            client_timeout = 90
            faults_off(args, None)   # fails early without the operator token
        clients = Clients(urls, args.sagas, args.clients, args.seed, tag, client_timeout,
                          time.monotonic() + args.max_seconds, retry_for=120, saga=args.saga,
                          mode=args.mode)
        checker = Checker(db, None if owned else tag, args.allow_failed, clients.key_prefix(),
                          run_as(args) if owned else None)
        if banking:
            if not owned:
                checker.take_baseline()
            sampler = BalanceSampler(db, owned)
            sampler.start()
        actions_log = open(os.path.join(rundir, "chaos-actions.log"), "w")
        if not args.no_chaos:
            chaos = Chaos(args, rng, system, server, clients, actions_log, broker)
            clients.more = chaos.unfinished
        say(f"running {args.sagas} {'' if args.saga == 'registration' else args.saga + ' '}"
            f"sagas from {args.clients} clients, "
            + (describe_run(args) if owned else f"over {len(urls)} orchestrator(s)")
            + f"{'' if chaos else ', without chaos'}"
            f"{'; sampling balances every 50 ms' if sampler else ''}")
        chaos_began = time.monotonic()
        clients.start()
        if chaos:
            chaos.start()
        last_print = time.monotonic()
        while clients.running():
            time.sleep(0.2)
            if time.monotonic() - last_print >= 5:
                last_print = time.monotonic()
                say(f"  [{last_print - chaos_began:6.1f}s] {clients.finished}/{args.sagas} done, "
                    f"{len(clients.answers)} answers"
                    + (f", {sum(sum(c.values()) for c in chaos.counts.values())} chaos actions"
                       if chaos else "")
                    + (f", {sampler.reads} balance reads" if sampler else ""))
        stopped = time.monotonic()
        if chaos:
            chaos.stop_event.set()
            chaos.join(30)
            chaos.finish_database()
            chaos.finish_broker()
        recover_began = time.monotonic()
        if system:
            recover_everything(system, chaos)
        faults_off(args, system)
        recovered = time.monotonic()
        settle, stuck = wait_quiet(checker, args.settle_timeout)
        settle_total = time.monotonic() - stopped
        if not stuck:
            # Late requests (a hang fault sleeps past the read timeout) land now or never.
            time.sleep(args.grace)
            _, stuck = wait_quiet(checker, args.settle_timeout)
        queued = {}
        if not stuck and args.mode == "choreography":
            # Events handed out again after a broker restart are taken as repeats; none
            # may be left waiting (nor change anything: the checks come after).
            queued = wait_events_drained(broker, env, args.settle_timeout / 3)
            _, stuck = wait_quiet(checker, args.settle_timeout)
        stuck = checker.active_count()
        for queue, ready in queued.items():
            checker.violation(f"events still queued at quiet: {queue}: {ready}")
        if sampler:
            sampler.stop()
            checker.violations.extend(sampler.violations)
            for err in sampler.errors:
                checker.violations.append("harness: sampler: " + err.strip().splitlines()[-1])
        answers = list(clients.answers)
        outcomes = checker.check(answers, banking)
        notes = {"notes": list(checker.notes)}
        if chaos:
            for err in chaos.errors:
                checker.violations.append("harness: " + err.strip().splitlines()[-1])
            for name, rc in chaos.unexpected_exits:
                checker.violation(f"process {name} exited on its own (exit code {rc})")
            if len(chaos.db_restarts) < args.db_restarts:
                notes["notes"].append(f"only {len(chaos.db_restarts)} of {args.db_restarts} "
                                      "database restarts happened (the run ended first)")
            if chaos.coverage:
                notes["notes"].append("not every process was killed and frozen, nor every "
                                      f"service given a fault; left: {chaos.coverage}")
            odd = [a for a in answers if a.code == 503 and not chaos.db_was_down(a.at)]
            if odd:
                kinds = Counter(re.sub(r"\d{3,}", "N", a.error or "")[:160] for a in odd)
                notes["notes"].append(
                    f"{len(odd)} answer(s) 503 while the database was up (retried): "
                    + "; ".join(f"{n}x {k}" for k, n in kinds.most_common(4)))
        if server:
            locks = deadlocks(server)
            if locks:
                notes["notes"].append(f"{len(locks)} deadlock(s) in the database (see "
                                      f"{server.log_path}): " + "; ".join(
                                          f"{n}x {k}" for k, n in Counter(locks).most_common(3)))
        if system:
            app_errors, server_errors = scan_logs(system.logdir)
            for line in app_errors[:20]:
                checker.violation(f"error logged: {line}")
            if len(app_errors) > 20:
                checker.violation(f"... and {len(app_errors) - 20} more errors logged")
            if server_errors:
                notes["notes"].append("gunicorn errors: " + "; ".join(
                    f"{n}x {text}" for text, n in server_errors.most_common(5)))
        usernames = {clients.username(a.index) for a in answers
                     if a.code is None and a.kind == "registration" and a.key is None}
        if usernames:
            where = ", ".join(["%s"] * len(usernames))
            notes["no_answer_exists"] = db.query(
                f"SELECT COUNT(*) FROM SAGA WHERE label IN ({where})", tuple(usernames))[0][0]
        keys = {a.key for a in answers if a.code is None and a.key is not None}
        if keys:
            notes["no_answer_exists"] = notes.get("no_answer_exists", 0) + len(
                keys & set(checker.key_sagas()))
        timing = {"chaos_phase": stopped - chaos_began, "recover": recovered - recover_began,
                  "settle": settle_total, "total": time.monotonic() - began}
        summary = summarize(args, clients, chaos, checker, outcomes, timing, stuck, notes,
                            sampler)
        if checker.suspects and args.dump:
            say("")
            say(f"first {min(args.dump, len(checker.suspects))} saga(s) involved:")
            for sid in checker.suspects[:args.dump]:
                say(f"saga {sid}")
                say(checker.dump(sid))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2, default=str)
        failed = bool(checker.violations)
        if failed:
            keep = True
        return 1 if failed else 0
    except KeyboardInterrupt:
        keep = True
        say("interrupted")
        return 2
    except Exception:
        keep = True
        say("harness error:\n" + traceback.format_exc())
        return 2
    finally:
        if chaos:
            chaos.stop_event.set()
        if sampler:
            sampler.stop_event.set()
        if system:
            try:
                system.stop()
            except Exception:
                pass
        if broker:
            try:
                broker.stop()
            except Exception:
                try:
                    broker.kill()
                except Exception:
                    pass
        if server:
            try:
                server.stop()
            except Exception:
                try:
                    server.kill()
                except Exception:
                    pass
        if keep:
            say(f"run directory kept: {rundir} "
                f"({'logs/, chaos-actions.log, mariadb/' if owned else 'chaos-actions.log'}"
                f"{', broker/' if broker else ''})")
        else:
            shutil.rmtree(rundir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
