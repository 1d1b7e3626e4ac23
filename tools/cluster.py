#!/usr/bin/env python3
"""The saga system past one process of each, on one machine: HAProxy in front of two
orchestrators and two processes of each service (A, B, C), the orchestrators reaching
the services through it too, on a MariaDB primary with a semi-synchronous replica
(tools/cluster_db.py) and a three-node RabbitMQ cluster (tools/cluster_rabbit.py); a
single private MariaDB / RabbitMQ node stands in where those are not available.

    # ./run.sh cluster: the whole topology in the foreground (Ctrl-C stops it all);
    # clients on 127.0.0.1:5000 (as the demo), the services' fronts on 5001-5003,
    # HAProxy's statistics on 5004, the processes on 5010/5020 (orchestrators),
    # 5011/5021 (A), 5012/5022 (B), 5013/5023 (C); everything under .cluster/
    python tools/cluster.py up
    python tools/cluster.py up --free-ports --dir /tmp/cluster

    # kill -9 any one process (and a RabbitMQ node, and the MariaDB primary) over and
    # over under load, then check every saga, the types' invariants and every answer
    python tools/cluster.py chaos --duration 120 --clients 8 --seed 7

    # throughput with one and with two of each process, and the price of the HAProxy hop
    python tools/cluster.py bench --concurrency 1,16 --duration 8 --repeat 3

What the chaos checks, once the load stops, everything is restarted and no saga is
active (read from the database):
  - every saga of the run is COMPLETED or COMPENSATED (none RUNNING, COMPENSATING or
    FAILED), and each saga type's invariant holds (saga.definitions: all or nothing,
    money conserved, ...);
  - every saga was made by one client request's Idempotency-Key (a request sent twice,
    by a client after a 504 or by the balancer, made one saga);
  - no client got a false answer: a 200 said COMPLETED of a COMPLETED saga, a 409
    COMPENSATED of a COMPENSATED one, a 502 COMPENSATED or FAILED as its saga is, a 202
    named a saga that exists, each the saga its key made; a 504 or 503 is the balancer's
    "no answer" / "no process" (the API answers neither 504 nor 502 without a saga);
  - every request got a definite answer in the end (its client repeats it with its key
    after a 503, a 504 or a dropped connection, for up to --answer-within seconds).
It exits 1 on any violation, 2 if the cluster could not be run.
"""

import argparse
import collections
import csv
import io
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import common  # noqa: E402,F401  (the driver first, and the demo's saga types)
import mysql.connector  # noqa: E402
import requests  # noqa: E402

from brokers import PrivateRabbitMQ, list_descendants  # noqa: E402
from launcher import PrivateMariaDB, System, find_binary, free_port, wait_for  # noqa: E402
from saga.common import SERVICES  # noqa: E402
from saga.definitions import SAGA_TYPES  # noqa: E402

HAPROXY_CFG = os.path.join(ROOT, "deploy", "haproxy", "haproxy.cfg")
HAPROXY_ERRORS = os.path.join(ROOT, "deploy", "haproxy", "errors")
DB_NAME = "saga_db"
ACTIVE = ("RUNNING", "COMPENSATING")

# ./run.sh cluster: the clients' front where the demo's orchestrator is, so the README's
# calls work unchanged; process k of each kind on 50k0 + its place in the demo's order.
FIXED_FRONTS = {"orchestrator": 5000, "A": 5001, "B": 5002, "C": 5003, "stats": 5004}


def fixed_process_ports():
    ports = {}
    for k, suffix in ((1, ""), (2, "2")):
        ports["orchestrator" + suffix] = 5000 + 10 * k
        for n, service in enumerate(SERVICES, start=1):
            ports[f"service_{service.lower()}{suffix}"] = 5000 + 10 * k + n
    return ports


def say(*parts):
    print(time.strftime("%H:%M:%S"), "cluster:", *parts, flush=True)


def process_name(kind, k):
    """orchestrator / orchestrator2, service_a / service_a2 (launcher.System's names)."""
    base = "orchestrator" if kind == "orchestrator" else f"service_{kind.lower()}"
    return base + ("" if k == 1 else str(k))


# --- HAProxy -----------------------------------------------------------------------------

class LoadBalancer:
    """Debian's HAProxy with deploy/haproxy/haproxy.cfg, in the foreground in its own
    process group; its admin socket answers `show stat`."""

    def __init__(self, basedir, fronts, backends):
        self.basedir = basedir
        self.fronts = fronts        # "orchestrator", each service, "stats" -> port
        self.backends = backends    # "orchestrator", each service -> [process ports]
        self.socket = os.path.join(basedir, "haproxy.sock")
        self.proc = None

    def url(self, front="orchestrator"):
        return f"http://127.0.0.1:{self.fronts[front]}"

    def environment(self):
        env = {**os.environ, "LB_SOCKET": self.socket, "LB_ERRORS": HAPROXY_ERRORS,
               "LB_ORCHESTRATOR": f"127.0.0.1:{self.fronts['orchestrator']}",
               "LB_STATS": f"127.0.0.1:{self.fronts['stats']}"}
        for kind, ports in self.backends.items():
            prefix = "ORCHESTRATOR" if kind == "orchestrator" else f"SERVICE_{kind}"
            if kind != "orchestrator":
                env[f"LB_SERVICE_{kind}"] = f"127.0.0.1:{self.fronts[kind]}"
            for k, port in enumerate(ports, start=1):
                env[f"{prefix}_{k}"] = f"127.0.0.1:{port}"
        return env

    def start(self):
        os.makedirs(self.basedir, exist_ok=True)
        haproxy = find_binary("haproxy")
        env = self.environment()
        check = subprocess.run([haproxy, "-c", "-q", "-f", HAPROXY_CFG], env=env,
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
        log = open(os.path.join(self.basedir, "haproxy.log"), "ab")
        self.proc = subprocess.Popen([haproxy, "-db", "-f", HAPROXY_CFG], env=env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        wait_for(self._ready, 20, "HAProxy to listen", 0.05)
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited; see {self.basedir}/haproxy.log")
        try:
            self.command("show info")
            return True
        except OSError:
            return False

    def command(self, line):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self):
        """(backend, server) -> HAProxy's status of it (UP, DOWN, ...)."""
        text = self.command("show stat").lstrip("# ")
        return {(row["pxname"], row["svname"]): row["status"].split(" ")[0]
                for row in csv.DictReader(io.StringIO(text))
                if row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_all_up(self, timeout=30):
        wait_for(lambda: all(s == "UP" for s in self.server_states().values()), timeout,
                 "HAProxy to see every process up", 0.1)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


# --- the database and the broker ---------------------------------------------------------

def cluster_part(module, name):
    """MariaDBPair / RabbitCluster from tools/cluster_db.py / cluster_rabbit.py, when
    they are there."""
    try:
        return getattr(__import__(module), name)
    except (ImportError, AttributeError):
        return None


class SingleDatabase:
    """One private MariaDB, for where the primary/replica pair is not wanted (the tests,
    the benchmark) or not available."""

    def __init__(self, basedir):
        self.server = PrivateMariaDB(basedir)

    def start(self):
        self.server.install()
        self.server.start()
        self.server.create_database(DB_NAME)
        return self

    def url_env(self):
        return {"SAGA_DB_HOST": "127.0.0.1", "SAGA_DB_PORT": str(self.server.port),
                "SAGA_DB_USER": "saga", "SAGA_DB_PASSWORD": "saga", "SAGA_DB_NAME": DB_NAME}

    def pids(self):
        return [self.server.proc.pid]

    def stop(self):
        self.server.stop()


def make_database(kind, basedir):
    """kind: pair, single or auto (the pair when tools/cluster_db.py is there)."""
    pair = cluster_part("cluster_db", "MariaDBPair")
    if kind == "pair" and pair is None:
        raise SystemExit("--database pair: tools/cluster_db.py (MariaDBPair) is missing")
    if kind == "single" or pair is None:
        return SingleDatabase(basedir)
    return pair(basedir)


def make_broker(kind, basedir):
    """kind: cluster, single, off or auto (the cluster when tools/cluster_rabbit.py is
    there). Returns (broker or None, a function giving RABBITMQ_URL)."""
    rabbit = cluster_part("cluster_rabbit", "RabbitCluster")
    if kind == "off":
        return None, lambda: "off"
    if kind == "cluster" and rabbit is None:
        raise SystemExit("--rabbitmq cluster: tools/cluster_rabbit.py (RabbitCluster) is missing")
    if kind == "single" or rabbit is None:
        broker = PrivateRabbitMQ(basedir)
        return broker, lambda: broker.url
    broker = rabbit(basedir, nodes=3)
    return broker, broker.url


# --- the whole topology ------------------------------------------------------------------

class Cluster:
    """HAProxy, `per_kind` orchestrators and `per_kind` processes of each service (1 or
    2), the database and the broker, all under `basedir`. The orchestrators find each
    service at its front on the balancer (SERVICE_<X>_URL); clients use `url()`."""

    def __init__(self, basedir, per_kind=2, fixed_ports=False, env=None, database="auto",
                 rabbitmq="auto"):
        self.basedir = basedir
        self.per_kind = per_kind
        self.fixed_ports = fixed_ports
        self.extra_env = env or {}
        self.database = make_database(database, os.path.join(basedir, "db"))
        self.broker, self.broker_url = make_broker(rabbitmq, os.path.join(basedir, "rabbitmq"))
        kinds = ("orchestrator", *SERVICES)
        self.names = [process_name(kind, k) for kind in kinds for k in range(1, per_kind + 1)]
        if fixed_ports:
            fronts, ports = dict(FIXED_FRONTS), fixed_process_ports()
        else:
            fronts = {kind: free_port() for kind in (*kinds, "stats")}
            ports = {name: free_port() for name in self.names}
        self.ports = {name: ports[name] for name in self.names}
        backends = {kind: [self.ports[process_name(kind, k)] for k in range(1, per_kind + 1)]
                    for kind in kinds}
        self.balancer = LoadBalancer(os.path.join(basedir, "haproxy"), fronts, backends)
        self.system = None
        self.logdir = os.path.join(basedir, "logs")

    def url(self, front="orchestrator"):
        return self.balancer.url(front)

    def start(self):
        os.makedirs(self.logdir, exist_ok=True)
        say(f"starting the database ({type(self.database).__name__})")
        self.database.start()
        if self.broker is not None:
            say(f"starting RabbitMQ ({type(self.broker).__name__})")
            self.broker.start()
        self.balancer.start()
        env = {"SAGA_FAULTS": "off", **self.database.url_env(),
               "RABBITMQ_URL": self.broker_url(),
               **{f"SERVICE_{s}_URL": self.url(s) for s in SERVICES}, **self.extra_env}
        self.system = System(self.logdir, env, orchestrators=self.per_kind,
                             second_instances=SERVICES if self.per_kind == 2 else ())
        self.system.ports.update(self.ports)
        say(f"starting {len(self.names)} processes behind HAProxy")
        self.system.start()
        self.balancer.wait_all_up()
        return self

    def db_env(self):
        """SAGA_DB_* that reach the current primary (after a failover too)."""
        return self.database.url_env()

    def connect(self):
        e = self.db_env()
        return mysql.connector.connect(
            host=e["SAGA_DB_HOST"], port=int(e["SAGA_DB_PORT"]), user=e["SAGA_DB_USER"],
            password=e["SAGA_DB_PASSWORD"], database=e["SAGA_DB_NAME"], autocommit=True,
            collation="utf8mb4_unicode_ci", connection_timeout=5)

    def alive(self, name):
        return self.system.alive(name)

    def balancer_state(self, name):
        """What HAProxy thinks of process `name` (UP, DOWN, ...); its servers are named
        as the processes are."""
        backend = "orchestrators" if name.startswith("orchestrator") \
            else name.rstrip("0123456789")
        return self.balancer.server_states()[(backend, name)]

    def kill(self, name):
        """kill -9 one process (its whole process group)."""
        self.system.kill(name)

    def restart(self, name):
        self.system.start(name)

    def cpu_groups(self):
        """Process group -> session leaders, for tools/bench's CpuMeter."""
        groups = {name: [p.pid] for name, p in self.system.procs.items()}
        groups["haproxy"] = [self.balancer.proc.pid]
        if hasattr(self.database, "pids"):
            groups["mariadb"] = self.database.pids()
        return groups

    def describe(self):
        lines = [f"clients:        {self.url()}  (POST /start, /transfer, GET / for the UI)"]
        for s in SERVICES:
            lines.append(f"service {s} front: {self.url(s)}  (POST /register, /orders at A)"
                         if s == SERVICES[0] else f"service {s} front: {self.url(s)}")
        lines.append(f"HAProxy stats:  {self.url('stats')}/")
        for name in self.names:
            proc = self.system.procs.get(name) if self.system else None
            lines.append(f"  {name:<14} http://127.0.0.1:{self.ports[name]}  "
                         f"pid {proc.pid if proc else '-':<8} log {self.logdir}/{name}.log")
        db = self.db_env()
        lines.append(f"database:       {db['SAGA_DB_HOST']}:{db['SAGA_DB_PORT']}/"
                     f"{db['SAGA_DB_NAME']} ({type(self.database).__name__})")
        for role in ("primary", "replica"):   # the pair's nodes, to kill -9 by hand
            node = getattr(self.database, role, None)
            if node is not None and getattr(node, "proc", None) is not None:
                lines.append(f"  MariaDB {role:<7} 127.0.0.1:{node.port}  pid {node.proc.pid}")
        lines.append(f"RabbitMQ:       {self.broker_url()}")
        for i, node in enumerate(getattr(self.broker, "nodes", None) or []):
            proc = getattr(node, "proc", None)
            beam = [p for p in (list_descendants(proc.pid) if proc else [])
                    if "beam" in _command(p)]
            lines.append(f"  RabbitMQ node {i}  127.0.0.1:{node.port}  "
                         f"pid {beam[0] if beam else (proc.pid if proc else '-')}")
        return "\n".join(lines)

    def stop(self):
        for part in (self.system, self.balancer, self.broker, self.database):
            if part is None:
                continue
            try:
                part.stop()
            except Exception as exc:  # stop the rest whatever one of them does
                say(f"stopping {type(part).__name__}: {exc}")


# --- load: clients that keep every answer -------------------------------------------------

@dataclass
class Answer:
    key: str
    kind: str                 # registration, transfer, choreography
    code: object              # HTTP status, or "no answer"
    body: object              # the JSON body (or text), None without an answer
    sent: float               # monotonic time the request was sent
    received: float


@dataclass
class Request:
    key: str
    kind: str
    body: dict
    final: Answer | None = None
    answers: list = field(default_factory=list)


class Load:
    """`clients` threads, each POSTing sagas through the balancer one after the other
    (registrations by /start, transfers by /transfer, and choreographed registrations by
    A's /register when a broker runs), each with an Idempotency-Key; a 503, a 504 or a
    dropped connection is sent again with the same key until a definite answer or
    `answer_within` seconds."""

    RETRY = (503, 504, "no answer")

    def __init__(self, cluster, clients=8, seed=None, answer_within=120.0, choreography=None):
        self.cluster = cluster
        self.clients = clients
        self.seed = random.randrange(10 ** 6) if seed is None else seed
        self.tag = f"c{self.seed}-{int(time.time()) % 100000}"
        self.answer_within = answer_within
        if choreography is None:
            choreography = cluster.broker is not None
        self.kinds = ["registration", "transfer"] + (["choreography"] if choreography else [])
        self.requests = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = []
        self.numbers = iter(range(10 ** 9))

    def start(self):
        for k in range(self.clients):
            t = threading.Thread(target=self._client, args=(k,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self, timeout=None):
        """No new requests; wait for each client's current one to get its answer."""
        self.stopping.set()
        for t in self.threads:
            t.join(timeout or self.answer_within + 30)

    def completed(self):
        with self.lock:
            return sum(1 for r in self.requests if r.final and r.final.code == 200)

    def completed_after(self, moment):
        """Sagas answered 200 whose request was sent after `moment`."""
        with self.lock:
            return sorted(r.final.received for r in self.requests
                          if r.final and r.final.code == 200 and r.answers[0].sent > moment)

    def _make(self, rng):
        with self.lock:
            n = next(self.numbers)
        kind = self.kinds[n % len(self.kinds)]
        key = f"{self.tag}-{n}"
        if kind == "transfer":
            a, b = rng.sample(list(SERVICES), 2)
            body = {"from": a, "to": b, "amount": f"{rng.randint(1, 30000) / 100:.2f}"}
        else:
            body = {"username": key, "address": f"{n} Main St", "payment": "Visa"}
        return Request(key, kind, body)

    def _url(self, kind):
        if kind == "choreography":
            return self.cluster.url(SERVICES[0]) + "/register"
        return self.cluster.url() + ("/transfer" if kind == "transfer" else "/start")

    def _client(self, k):
        rng = random.Random(f"{self.seed}-{k}")
        session = requests.Session()
        while not self.stopping.is_set():
            req = self._make(rng)
            with self.lock:
                self.requests.append(req)
            give_up = time.monotonic() + self.answer_within
            while True:
                answer = self._send(session, req)
                req.answers.append(answer)
                if answer.code not in self.RETRY:
                    req.final = answer
                    break
                if time.monotonic() > give_up:
                    break
                if answer.code == "no answer":
                    session.close()
                    session = requests.Session()
                time.sleep(rng.uniform(0.1, 0.4))

    def _send(self, session, req):
        sent = time.monotonic()
        try:
            resp = session.post(self._url(req.kind), json=req.body, timeout=(2, 90),
                                headers={"Idempotency-Key": req.key})
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            return Answer(req.key, req.kind, resp.status_code, body, sent, time.monotonic())
        except requests.RequestException as exc:
            return Answer(req.key, req.kind, "no answer", repr(exc)[:200], sent,
                          time.monotonic())

    def codes(self):
        with self.lock:
            return collections.Counter(a.code for r in self.requests for a in r.answers)


# --- the checks ----------------------------------------------------------------------------

def wait_quiet(cluster, timeout=180):
    """Until no saga is RUNNING or COMPENSATING; returns the seconds it took."""
    t0 = time.monotonic()

    def quiet():
        try:
            conn = cluster.connect()
        except mysql.connector.Error:
            return False
        try:
            cur = conn.cursor()
            cur.execute("SELECT COUNT(*) FROM SAGA WHERE status IN ('RUNNING', 'COMPENSATING')")
            return cur.fetchone()[0] == 0
        finally:
            conn.close()
    wait_for(quiet, timeout, "every saga to finish", 0.2)
    return time.monotonic() - t0


def check(cluster, load):
    """Violations of the promises listed at the top (empty: none), and the outcomes."""
    violations = []
    conn = cluster.connect()
    try:
        cur = conn.cursor(dictionary=True)
        cur.execute("SELECT s.id, s.type, s.mode, s.status, k.idem_key FROM SAGA s "
                    "LEFT JOIN START_KEY k ON k.saga_id = s.id")
        sagas = {row["id"]: row for row in cur.fetchall()}
        by_key = {row["idem_key"].decode() if isinstance(row["idem_key"], (bytes, bytearray))
                  else row["idem_key"]: row for row in sagas.values() if row["idem_key"]}
        outcomes = collections.Counter(f"{r['type']}/{r['status']}" + (
            " (choreographed)" if r["mode"] == "choreography" else "") for r in sagas.values())
        for row in sagas.values():
            if row["status"] in ACTIVE or row["status"] == "FAILED":
                violations.append(f"saga {row['id']} ({row['type']}) is {row['status']}")
            if not row["idem_key"]:
                violations.append(f"saga {row['id']} ({row['type']}) was made by no client's "
                                  "key (a request made two sagas?)")
        for name, saga_type in SAGA_TYPES.items():
            for wrong in saga_type.invariant(cur):
                violations.append(f"{name} invariant: {wrong}")
    finally:
        conn.close()
    with load.lock:
        reqs = list(load.requests)
    for req in reqs:
        saga = by_key.get(req.key)
        if req.final is None:
            violations.append(f"{req.kind} {req.key}: no definite answer within "
                              f"{load.answer_within:g} s ({[a.code for a in req.answers]})")
        for a in req.answers:
            wrong = false_answer(a, saga)
            if wrong:
                violations.append(f"{req.kind} {req.key}: {wrong}")
    return violations, outcomes


def false_answer(a, saga):
    """What is false in answer `a` about the saga its key made (None: nothing)."""
    body = a.body if isinstance(a.body, dict) else {}
    status = saga["status"] if saga else None
    said = body.get("status")
    if a.code == "no answer":
        return None
    if "saga" in body and (saga is None or body["saga"] != saga["id"]):
        return f"answered {a.code} about saga {body['saga']}, but its key made " \
               f"{saga['id'] if saga else 'none'}"
    if a.code == 200:
        if said != "COMPLETED" or status != "COMPLETED":
            return f"200 saying {said}, saga is {status}"
    elif a.code == 409:
        if said != "COMPENSATED" or status != "COMPENSATED":
            return f"409 saying {said}, saga is {status}"
    elif a.code == 502:
        if said not in ("COMPENSATED", "FAILED") or status != said:
            return f"502 saying {said!r}, saga is {status}: {str(a.body)[:160]}"
    elif a.code == 202:
        if saga is None:
            return "202 about a saga that does not exist"
    elif a.code == 504:
        if body.get("balancer") != "no answer":
            return f"504 not from the balancer: {str(a.body)[:160]}"
    elif a.code == 503:
        if not body.get("error"):
            return f"503 without a JSON error: {str(a.body)[:160]}"
    else:
        return f"answered {a.code}: {str(a.body)[:200]}"
    return None


def scan_logs(logdir):
    """Unexpected exceptions (500s) logged by any process: each one's first line and the
    exception it ended with. (A caller that goes away mid-request is not one: the
    service says so and answers 400.)"""
    found = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), errors="replace") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if "unexpected error" not in line:
                continue
            trace = []
            for more in lines[i + 1:]:
                if more.startswith(("Traceback", " ", "The above", "During handling")) \
                        or not more.strip() or not trace or trace[-1].startswith(" "):
                    trace.append(more)
                else:
                    break
            error = next((t for t in reversed(trace) if t.strip() and not t.startswith(" ")),
                         "")
            found.append(f"{name}: {line.strip()[:160]} ... {error[:120]}")
    return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# --- chaos ---------------------------------------------------------------------------------

class Chaos(threading.Thread):
    """Kill -9 one process at a time (each in turn, in a shuffled order, then at random),
    leaving it down `down` seconds before starting it again; a RabbitMQ node now and then
    (one at a time, a second only after the first is back); the MariaDB primary once,
    half way through, timing its failover."""

    def __init__(self, cluster, load, rng, duration, down=(0.5, 3.0), pause=(0.5, 2.0),
                 db_kill=True, rabbit_kills=2):
        super().__init__(daemon=True)
        self.cluster, self.load, self.rng = cluster, load, rng
        self.duration, self.down, self.pause = duration, down, pause
        self.db_kill = db_kill and hasattr(cluster.database, "kill_primary")
        self.rabbit_kills = rabbit_kills if hasattr(cluster.broker, "kill") else 0
        self.actions = collections.Counter()
        self.events = []          # (monotonic time, text)
        self.failover = None      # {"killed_at", "promoted_in", ...}
        self.error = None

    def note(self, text):
        self.events.append((time.monotonic(), text))
        say(text)

    def run(self):
        try:
            self._run()
        except Exception as exc:  # reported by the caller as a harness failure
            self.error = exc

    def _run(self):
        t0 = time.monotonic()
        end = t0 + self.duration
        order = list(self.cluster.names)
        self.rng.shuffle(order)
        rabbit_at = sorted(t0 + self.duration * f for f in (0.25, 0.7)[:self.rabbit_kills])
        db_at = t0 + self.duration * 0.5 if self.db_kill else None
        while time.monotonic() < end:
            now = time.monotonic()
            if db_at and now >= db_at:
                db_at = None
                self.kill_primary()
            elif rabbit_at and now >= rabbit_at[0]:
                rabbit_at.pop(0)
                self.kill_rabbit_node()
            else:
                name = order.pop(0) if order else self.rng.choice(self.cluster.names)
                self.kill_process(name)
            time.sleep(self.rng.uniform(*self.pause))

    def kill_process(self, name):
        self.cluster.kill(name)
        self.actions[name] += 1
        self.note(f"kill -9 {name}")
        time.sleep(self.rng.uniform(*self.down))
        self.cluster.restart(name)
        self.note(f"{name} is back")

    def kill_rabbit_node(self):
        i = self.actions["rabbitmq"] % 3
        self.cluster.broker.kill(i)
        self.actions["rabbitmq"] += 1
        self.note(f"kill -9 RabbitMQ node {i}")
        time.sleep(self.rng.uniform(2, 5))
        self.cluster.broker.restart(i)
        self.note(f"RabbitMQ node {i} is back")

    def kill_primary(self):
        killed_at = time.monotonic()
        self.cluster.database.kill_primary()
        self.actions["mariadb primary"] += 1
        self.note("kill -9 the MariaDB primary")
        promoted_in = self.cluster.database.wait_promoted(120)
        self.failover = {"killed_at": killed_at, "promoted_in": promoted_in}
        self.note(f"replica promoted {promoted_in:.1f} s after the kill")

    def recover(self):
        """Everything that is down, up again (after the chaos stops)."""
        for name in self.cluster.names:
            if not self.cluster.alive(name):
                self.cluster.restart(name)


def chaos_main(args):
    rng = random.Random(args.seed)
    basedir = args.dir or tempfile.mkdtemp(prefix="saga-cluster-chaos-")
    say(f"seed {args.seed}; everything under {basedir}")
    cluster = Cluster(basedir, env=dict(a.split("=", 1) for a in args.env),
                      database=args.database, rabbitmq=args.rabbitmq)
    try:
        cluster.start()
    except Exception as exc:
        say(f"could not start the cluster: {exc}")
        cluster.stop()
        return 2
    say("\n" + cluster.describe())
    load = Load(cluster, args.clients, args.seed, args.answer_within)
    chaos = Chaos(cluster, load, rng, args.duration, db_kill=not args.no_db_kill,
                  rabbit_kills=args.rabbit_kills)
    try:
        load.start()
        wait_for(lambda: load.completed() >= 1, 120, "a first saga to complete")
        chaos.start()
        chaos.join()
        if chaos.error:
            raise chaos.error
        say("chaos over; restarting what is down, letting the clients finish")
        chaos.recover()
        load.stop()
        settle = wait_quiet(cluster)
        violations, outcomes = check(cluster, load)
        errors = scan_logs(cluster.logdir)
        report(args, load, chaos, outcomes, violations, errors, settle)
        return 1 if violations or errors else 0
    except Exception as exc:
        say(f"the harness failed: {type(exc).__name__}: {exc}")
        return 2
    finally:
        load.stopping.set()
        if not args.keep:
            cluster.stop()


def report(args, load, chaos, outcomes, violations, errors, settle):
    print("\n=== cluster chaos ===")
    print(f"seed {args.seed}: replay with  python tools/cluster.py chaos --seed {args.seed} "
          f"--duration {args.duration:g} --clients {args.clients}")
    print(f"requests: {len(load.requests)}; answers by code: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(load.codes().items(), key=str)))
    print("sagas: " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
    reasons = collections.Counter(str(a.body).split("(")[0] for r in load.requests
                                  for a in r.answers if a.code == "no answer")
    if reasons:
        print("no answer: " + ", ".join(f"{k} x{v}" for k, v in reasons.most_common()))
    print("kill -9: " + ", ".join(f"{k} x{v}" for k, v in sorted(chaos.actions.items())))
    if chaos.failover:
        back = load.completed_after(chaos.failover["killed_at"])
        again = f"{back[0] - chaos.failover['killed_at']:.1f} s" if back else "never"
        print(f"MariaDB failover: promoted {chaos.failover['promoted_in']:.1f} s after the "
              f"kill; the first saga started after the kill completed {again} after it")
    print(f"settled {settle:.1f} s after the load stopped")
    for line in errors[:20]:
        print(f"  logged: {line}")
    print(f"violations: {len(violations)}")
    for v in violations[:40]:
        print(f"  {v}")


# --- up --------------------------------------------------------------------------------------

def up_main(args):
    if args.dir:
        basedir = args.dir
    else:
        basedir = os.path.join(ROOT, ".cluster")
        shutil.rmtree(basedir, ignore_errors=True)   # a throwaway topology, fresh each time
    cluster = Cluster(basedir, fixed_ports=not args.free_ports,
                      env=dict(a.split("=", 1) for a in args.env),
                      database=args.database, rabbitmq=args.rabbitmq)
    stop = threading.Event()
    # Ctrl-C or a SIGTERM stops it all (a shell may start us with SIGINT ignored).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start()
        print("\n" + cluster.describe() + "\n", flush=True)
        print("try:  curl -X POST " + cluster.url() + "/start -H 'Content-Type: "
              "application/json' -d '{\"username\":\"john_doe\",\"address\":\"123 Main St\","
              "\"payment\":\"Visa\"}'", flush=True)
        print("kill -9 any process (pids above); Ctrl-C stops it all", flush=True)
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        say("stopping")
        cluster.stop()
    return 0


# --- bench -----------------------------------------------------------------------------------

class Direct:
    """One of each process, no balancer: the orchestrator calls the services directly and
    clients call it (the baseline for the price of the HAProxy hop)."""

    def __init__(self, basedir, server, env):
        server.create_database("saga_direct")
        self.server = server
        os.makedirs(os.path.join(basedir, "logs"), exist_ok=True)
        self.system = System(os.path.join(basedir, "logs"), {
            **env, "SAGA_DB_HOST": "127.0.0.1", "SAGA_DB_PORT": str(server.port),
            "SAGA_DB_USER": "saga", "SAGA_DB_PASSWORD": "saga", "SAGA_DB_NAME": "saga_direct"})

    def start(self):
        self.system.start()
        return self

    def url(self):
        return self.system.url()

    def cpu_groups(self):
        groups = {name: [p.pid] for name, p in self.system.procs.items()}
        groups["mariadb"] = [self.server.proc.pid]
        return groups

    def stop(self):
        self.system.stop()


class SharedDatabase:
    """A Cluster's database: its own schema on the benchmark's one MariaDB server."""

    def __init__(self, server, name):
        self.server, self.name = server, name

    def start(self):
        self.server.create_database(self.name)

    def url_env(self):
        return {"SAGA_DB_HOST": "127.0.0.1", "SAGA_DB_PORT": str(self.server.port),
                "SAGA_DB_USER": "saga", "SAGA_DB_PASSWORD": "saga", "SAGA_DB_NAME": self.name}

    def pids(self):
        return [self.server.proc.pid]

    def stop(self):
        pass


@dataclass
class Target:
    """What tools/bench.py's measured() needs of a system."""
    label: str
    base: str
    groups: object
    server: object
    saga: str = "registration"

    @property
    def url(self):
        return self.base + "/start"

    def cpu_groups(self):
        return self.groups()


def bench_main(args):
    import bench  # tools/bench.py: the project's measuring (wrk, CPU per process group)

    basedir = args.dir or tempfile.mkdtemp(prefix="saga-cluster-bench-")
    env = {"SAGA_FAULTS": "off", "RABBITMQ_URL": "off", **dict(a.split("=", 1) for a in args.env)}
    server = PrivateMariaDB(os.path.join(basedir, "mariadb"))
    say(f"one MariaDB for three systems, under {basedir}")
    server.install()
    server.start()
    systems = []
    try:
        direct = Direct(os.path.join(basedir, "direct"), server, env).start()
        systems.append(direct)
        targets = [Target("direct", direct.url(), direct.cpu_groups, server)]
        for per_kind in (1, 2):
            c = Cluster(os.path.join(basedir, f"lb{per_kind}"), per_kind=per_kind, env=env,
                        database="single", rabbitmq="off")
            c.database = SharedDatabase(server, f"saga_lb{per_kind}")
            systems.append(c.start())
            targets.append(Target(f"lb x{per_kind}", c.url(), c.cpu_groups, server))
        for t in targets:   # one saga through each before anything is measured
            wait_for(lambda: requests.post(t.url, json={"username": "warm", "address": "x",
                                                        "payment": "y"}, timeout=60
                                           ).status_code == 200, 60, f"{t.label} to serve")
        levels = [int(c) for c in args.concurrency.split(",")]
        rounds = collections.defaultdict(list)
        for i in range(args.repeat):
            for c in levels:
                order = targets if i % 2 == 0 else targets[::-1]
                for t in order:
                    r = bench.measured(t, c, args, f"{t.label}-{c}-{i}")
                    bench.print_result(r)
                    rounds[(t.label, c)].append(r)
        print_bench(rounds, targets, levels)
        return 0
    finally:
        for s in systems:
            s.stop()
        server.stop()


def print_bench(rounds, targets, levels):
    print("\n=== one vs two of each process, and the HAProxy hop (registration, wrk) ===")
    head = (f"{'c':>3} {'system':>8} {'sagas/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7}"
            f" {'cpu ms/saga':>11}  {'orch':>5} {'svcs':>5} {'db':>5} {'lb':>5}  "
            f"{'rounds sagas/s':<18} {'other cores':<14} errors")
    print(head)
    print("-" * len(head))
    summary = {}
    for c in levels:
        for t in targets:
            rs = rounds[(t.label, c)]
            ok = sum(r.ok for r in rs) or 1
            cpu = sum(v for r in rs for k, v in r.cpu.items() if not k.startswith("client"))
            lb = sum(r.cpu.get("haproxy", 0) for r in rs)
            part = lambda p: sum(v for r in rs for k, v in r.cpu.items()  # noqa: E731
                                 if k.startswith(p)) / ok * 1000
            m = summary[(t.label, c)] = {
                "rate": statistics.median(r.rate for r in rs),
                "p50": statistics.median(r.pct[50] for r in rs),
                "p90": statistics.median(r.pct[90] for r in rs),
                "p99": statistics.median(r.pct[99] for r in rs),
                "cpu": cpu / ok * 1000, "lb": lb / ok * 1000,
                "busy": statistics.mean(r.busy_cores for r in rs)}
            errors = collections.Counter()
            for r in rs:
                errors.update(r.errors())
            print(f"{c:>3} {t.label:>8} {m['rate']:8.1f} {m['p50']:7.1f} {m['p90']:7.1f} "
                  f"{m['p99']:7.1f} {m['cpu']:11.2f}  {part('orch'):5.2f} {part('service'):5.2f} "
                  f"{part('mariadb'):5.2f} {m['lb']:5.2f}  "
                  f"{'/'.join(f'{r.rate:.0f}' for r in rs):<18} "
                  f"{'/'.join(f'{r.other_cores:.2f}' for r in rs):<14} {dict(errors) or 0}")
    for c in levels:
        d, one, two = (summary[(label, c)] for label in ("direct", "lb x1", "lb x2"))
        print(f"c={c}: the HAProxy hop (lb x1 vs direct) costs {one['cpu'] - d['cpu']:+.2f} CPU "
              f"ms/saga (HAProxy itself {one['lb']:.2f}) and {one['p50'] - d['p50']:+.1f} ms "
              f"at p50; two of each vs one: {two['rate'] / max(one['rate'], 1e-9):.2f}x "
              "the throughput")
    print("(sagas/s and latency: median over rounds; CPU ms/saga: every process, the database "
          "and HAProxy, not the client, over all rounds; other cores: busy with what this run "
          "did not start, per round: the machine's other load)")


# --- command line ----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common_args(q):
        q.add_argument("--dir", help="base directory (default: a new temporary one; "
                                     "up: .cluster/ in the project, wiped at start)")
        q.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                       help="extra environment for every saga process")

    def topology_args(q):
        q.add_argument("--database", choices=("auto", "pair", "single"), default="auto",
                       help="MariaDB primary + replica (tools/cluster_db.py), or one server; "
                            "auto: the pair when it is there")
        q.add_argument("--rabbitmq", choices=("auto", "cluster", "single", "off"),
                       default="auto", help="three RabbitMQ nodes (tools/cluster_rabbit.py), "
                                            "one, or none (no choreography)")

    up = sub.add_parser("up", help="the whole topology in the foreground")
    common_args(up)
    topology_args(up)
    up.add_argument("--free-ports", action="store_true",
                    help="free ports instead of 5000-5004 and 5010-5023")

    ch = sub.add_parser("chaos", help="kill -9 processes and nodes under load, then check")
    common_args(ch)
    topology_args(ch)
    ch.add_argument("--duration", type=float, default=120, help="seconds of chaos")
    ch.add_argument("--clients", type=int, default=8)
    ch.add_argument("--seed", type=int, default=random.randrange(10 ** 6))
    ch.add_argument("--answer-within", type=float, default=120,
                    help="seconds a client keeps repeating a request (with its key)")
    ch.add_argument("--no-db-kill", action="store_true", help="leave the MariaDB primary be")
    ch.add_argument("--rabbit-kills", type=int, default=2, choices=(0, 1, 2))
    ch.add_argument("--keep", action="store_true", help="leave the cluster running")

    be = sub.add_parser("bench", help="one vs two of each process; the HAProxy hop")
    common_args(be)
    be.add_argument("--concurrency", default="1,16")
    be.add_argument("--duration", type=float, default=8)
    be.add_argument("--warmup", type=float, default=2)
    be.add_argument("--repeat", type=int, default=2)
    be.add_argument("--client", choices=("wrk", "python"), default="wrk")
    be.add_argument("--wrk-threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return {"up": up_main, "chaos": chaos_main, "bench": bench_main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
