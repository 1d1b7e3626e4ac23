"""A MariaDB primary with a semi-synchronous replica, failed over by MHA, behind HAProxy.

    pair = MariaDBPair(basedir)
    pair.start()              # both servers, replication, MHA watching, HAProxy routing
    env = pair.url_env()      # SAGA_DB_* for the processes: always the current primary
    pair.kill_primary()       # kill -9
    pair.wait_promoted(60)    # seconds from the kill until the replica takes writes
    pair.stop()

What runs (every piece an existing tool, configured from deploy/mariadb/):
* two mariadbd (launcher.PrivateMariaDB, with node.cnf): GTID replication, semi-sync
  AFTER_SYNC, so a commit acknowledged to a client is in the replica's relay log;
  both start read-only, and only the current primary is made writable at run time;
* MHA (mha4mysql-manager): pings the primary, and when it dies fences it, applies every
  relay log (and any binary log event the dead primary holds beyond them, fetched over
  SSH) on the replica, and promotes it; it needs SSH to each database host, so a
  private sshd runs on loopback with a key made here;
* HAProxy on one port: the applications' address; MHA's failover script
  (mha_failover_haproxy.py) moves it from the dead primary to the new one.

CLI:
    python tools/cluster_db.py run [--dir DIR]
        a pair in the foreground; prints its SAGA_DB_* environment; stops on SIGTERM/SIGINT
    python tools/cluster_db.py failover [--runs 3] [--clients 6]
        each run: a fresh pair, the four processes on it, sagas of every type under load;
        kill -9 the primary; prints the seconds from the kill until the replica takes
        writes and until sagas complete again, and checks nothing was lost."""

import argparse
import getpass
import os
import random
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time

import mysql.connector
import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launcher import (COLLATION, ROOT, PrivateMariaDB, System, find_binary,  # noqa: E402
                      free_port, query_once, wait_for)

DEPLOY = os.path.join(ROOT, "deploy", "mariadb")
# MHA 0.58 needs two fixes to work with MariaDB 10.11 on Perl 5.36: this loads them.
MHA_PERL_ENV = {"PERL5LIB": os.path.join(DEPLOY, "perl"), "PERL5OPT": "-MMHA::MariaDBCompat"}
BACKEND = "mariadb"
# Accounts of the pair itself (the applications' user is made by create_database).
REPL = ("repl", "repl")            # the replica's connection to the primary
ADMIN = ("mha", "mha")             # MHA's: it needs SUPER-like rights on every node
PROBE = ("pair_probe", "probe")    # wait_promoted's writes, in a database of their own
PROBE_DB = "pair_probe"


class ReplicatedMariaDB(PrivateMariaDB):
    """One node of the pair: a PrivateMariaDB whose options come from node.cnf."""

    def __init__(self, basedir, server_id):
        super().__init__(basedir)
        self.server_id = server_id

    def options(self):
        return [f"--defaults-file={os.path.join(DEPLOY, 'node.cnf')}",
                f"--server-id={self.server_id}"]

    def variable(self, name, status=False):
        rows = self.root(f"SHOW GLOBAL {'STATUS' if status else 'VARIABLES'} LIKE '{name}'")
        return rows[0][1] if rows else None


def _render(template, target, **values):
    with open(os.path.join(DEPLOY, template)) as f:
        text = string.Template(f.read()).substitute(values)
    with open(target, "w") as f:
        f.write(text)
    return target


class MariaDBPair:
    """Primary + semi-synchronous replica + MHA + HAProxy, all on loopback, in basedir.
    Duck-types as a PrivateMariaDB for the tests (port, create_database, root)."""

    def __init__(self, basedir, dbname="saga_db", user="saga", password="saga"):
        self.basedir = os.path.abspath(basedir)
        self.dbname, self.user, self.password = dbname, user, password
        self.nodes = [ReplicatedMariaDB(os.path.join(self.basedir, "node1"), 1),
                      ReplicatedMariaDB(os.path.join(self.basedir, "node2"), 2)]
        self.primary, self.replica = self.nodes
        self.port = free_port()            # HAProxy: the applications' address
        self.ssh_port = free_port()
        self.mha_dir = os.path.join(self.basedir, "mha")
        self.ssh_dir = os.path.join(self.basedir, "ssh")
        self.haproxy_socket = os.path.join(self.basedir, "haproxy.sock")
        self.procs = {}                    # "sshd", "haproxy", "mha" -> Popen
        self.killed_at = None
        self.fenced = None                 # the old primary, after a failover

    # -- the interface tools/cluster.py and the tests use

    def start(self):
        for d in (self.mha_dir, os.path.join(self.mha_dir, "remote"), self.ssh_dir):
            os.makedirs(d, exist_ok=True)
        self._start_sshd()
        for node in self.nodes:
            node.install()
            node.start()
        self._start_replication()
        self.create_database(self.dbname)
        self._create_probe()
        self._start_haproxy()
        self._start_mha()
        return self

    def url_env(self):
        return {"SAGA_DB_HOST": "127.0.0.1", "SAGA_DB_PORT": str(self.port),
                "SAGA_DB_USER": self.user, "SAGA_DB_PASSWORD": self.password,
                "SAGA_DB_NAME": self.dbname}

    def kill_primary(self):
        """kill -9 the current primary; wait_promoted() counts from here."""
        self.killed_at = time.monotonic()
        self.primary.kill()

    def wait_promoted(self, timeout=60):
        """Seconds from kill_primary() until a write through HAProxy commits on the
        replica, now the primary."""
        def promoted():
            if self._takes_writes():
                return True
            # MHA exits when it is done; done and still no writes: it gave up.
            if self.procs["mha"].poll() is not None and not self._takes_writes():
                raise RuntimeError(f"MHA gave up:\n{self.mha_log()[-4000:]}")
            return False
        wait_for(promoted, timeout, "the replica to be promoted and take writes", 0.05)
        elapsed = time.monotonic() - self.killed_at
        self.fenced, self.primary, self.replica = self.primary, self.replica, None
        return elapsed

    def stop(self):
        for name in ("mha", "haproxy", "sshd"):
            proc = self.procs.pop(name, None)
            if proc and proc.poll() is None:
                # MHA runs in a session of its own, with its pings and ssh sessions.
                send = (lambda sig: os.killpg(proc.pid, sig)) if name == "mha" \
                    else proc.send_signal
                send(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    send(signal.SIGKILL)
                    proc.wait(10)
        for node in self.nodes:
            node.stop()

    # -- as a PrivateMariaDB, for LiveSystem and tools that make databases

    def create_database(self, name, user=None, password=None, schema=None):
        """A database with schema.sql, made on the primary (and so on the replica)."""
        self.primary.create_database(name, user or self.user, password or self.password,
                                     schema)
        self.wait_replica_caught_up()
        return name

    def root(self, *statements):
        return self.primary.root(*statements)

    def wait_replica_caught_up(self, timeout=60):
        if self.replica is None:
            return
        pos = self.primary.root("SELECT @@gtid_binlog_pos")[0][0]
        got = self.replica.root(f"SELECT MASTER_GTID_WAIT('{pos}', {timeout})")[0][0]
        if got != 0:
            raise TimeoutError(f"replica did not reach {pos} within {timeout}s")

    def connect(self, **options):
        """A session as the applications' user, through HAProxy, in UTC."""
        return mysql.connector.connect(host="127.0.0.1", port=self.port, user=self.user,
                                       password=self.password, database=self.dbname,
                                       time_zone="+00:00", collation=COLLATION, **options)

    def query(self, sql, params=()):
        return query_once(self.connect(autocommit=True), sql, params)

    def mha_log(self):
        try:
            with open(os.path.join(self.mha_dir, "manager.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- the pieces

    def _start_sshd(self):
        key, host_key = os.path.join(self.ssh_dir, "id"), os.path.join(self.ssh_dir, "host")
        for path in (key, host_key):
            if not os.path.exists(path):
                subprocess.run([find_binary("ssh-keygen"), "-q", "-t", "ed25519", "-N", "",
                                "-f", path], check=True)
        with open(key + ".pub") as pub, \
                open(os.path.join(self.ssh_dir, "authorized_keys"), "w") as auth:
            auth.write(pub.read())
        os.chmod(os.path.join(self.ssh_dir, "authorized_keys"), 0o600)
        self.ssh_key = key
        config = _render("sshd_config", os.path.join(self.ssh_dir, "sshd_config"),
                         port=self.ssh_port, host_key=host_key,
                         pidfile=os.path.join(self.ssh_dir, "sshd.pid"),
                         authorized_keys=os.path.join(self.ssh_dir, "authorized_keys"),
                         perl5lib=MHA_PERL_ENV["PERL5LIB"])
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        log = open(os.path.join(self.ssh_dir, "sshd.log"), "ab")
        self.procs["sshd"] = subprocess.Popen(
            [find_binary("sshd"), "-D", "-e", "-f", config], stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._ssh_works, 30, "the private sshd to accept the key", 0.1)

    def _ssh_works(self):
        if self.procs["sshd"].poll() is not None:
            raise RuntimeError(f"sshd exited; see {self.ssh_dir}/sshd.log")
        return subprocess.run(
            ["ssh", "-i", self.ssh_key, "-p", str(self.ssh_port), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", f"{getpass.getuser()}@127.0.0.1", "true"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0

    def _start_replication(self):
        primary, replica = self.primary, self.replica
        primary.root(
            f"CREATE USER '{REPL[0]}'@'127.0.0.1' IDENTIFIED BY '{REPL[1]}'",
            f"GRANT REPLICATION SLAVE ON *.* TO '{REPL[0]}'@'127.0.0.1'",
            f"CREATE USER '{ADMIN[0]}'@'127.0.0.1' IDENTIFIED BY '{ADMIN[1]}'",
            f"GRANT ALL PRIVILEGES ON *.* TO '{ADMIN[0]}'@'127.0.0.1' WITH GRANT OPTION",
            "SET GLOBAL rpl_semi_sync_master_enabled = ON",
            "SET GLOBAL read_only = OFF")
        # From the start of the primary's binary log: the accounts above replicate too.
        replica.root(
            f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={primary.port}, "
            f"MASTER_USER='{REPL[0]}', MASTER_PASSWORD='{REPL[1]}', "
            "MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
            "START SLAVE")
        wait_for(lambda: primary.variable("Rpl_semi_sync_master_clients", status=True) == "1"
                 and primary.variable("Rpl_semi_sync_master_status", status=True) == "ON",
                 30, "the replica to connect as a semi-synchronous replica", 0.1)

    def _create_probe(self):
        self.primary.root(
            f"CREATE DATABASE IF NOT EXISTS `{PROBE_DB}`",
            f"CREATE TABLE IF NOT EXISTS `{PROBE_DB}`.beat (id INT PRIMARY KEY, "
            "at DATETIME(6) NOT NULL)",
            f"CREATE USER IF NOT EXISTS '{PROBE[0]}'@'127.0.0.1' IDENTIFIED BY '{PROBE[1]}'",
            f"GRANT ALL PRIVILEGES ON `{PROBE_DB}`.* TO '{PROBE[0]}'@'127.0.0.1'")
        self.wait_replica_caught_up()

    def _takes_writes(self):
        try:
            conn = mysql.connector.connect(host="127.0.0.1", port=self.port, user=PROBE[0],
                                           password=PROBE[1], database=PROBE_DB,
                                           collation=COLLATION, connection_timeout=1)
        except mysql.connector.Error:
            return False
        try:
            cur = conn.cursor()
            cur.execute("REPLACE INTO beat VALUES (1, NOW(6))")
            conn.commit()
            return True
        except mysql.connector.Error:
            return False
        finally:
            try:
                conn.close()
            except mysql.connector.Error:
                pass

    def _start_haproxy(self):
        config = _render("haproxy.cfg", os.path.join(self.basedir, "haproxy.cfg"),
                         socket=self.haproxy_socket, backend=BACKEND, port=self.port,
                         pidfile=os.path.join(self.basedir, "haproxy.pid"),
                         primary_port=self.primary.port, replica_port=self.replica.port)
        log = open(os.path.join(self.basedir, "haproxy.log"), "ab")
        self.procs["haproxy"] = subprocess.Popen(
            [find_binary("haproxy"), "-db", "-f", config], stdout=log,
            stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._takes_writes_unless_dead("haproxy"), 30,
                 "HAProxy to route to the primary", 0.1)

    def _takes_writes_unless_dead(self, name):
        def check():
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited; see {self.basedir}")
            return self._takes_writes()
        return check

    def _start_mha(self):
        config = _render(
            "mha.cnf", os.path.join(self.mha_dir, "mha.cnf"),
            admin_user=ADMIN[0], admin_password=ADMIN[1], repl_user=REPL[0],
            repl_password=REPL[1], ssh_user=getpass.getuser(), ssh_port=self.ssh_port,
            ssh_key=self.ssh_key, workdir=self.mha_dir, python=sys.executable,
            deploy=DEPLOY, haproxy_socket=self.haproxy_socket, backend=BACKEND,
            haproxy_cfg=os.path.join(self.basedir, "haproxy.cfg"),
            primary_port=self.primary.port, primary_datadir=self.primary.datadir,
            replica_port=self.replica.port, replica_datadir=self.replica.datadir)
        log = open(os.path.join(self.mha_dir, "masterha_manager.out"), "ab")
        # --ignore_last_failover: a basedir reused after a failover starts afresh.
        self.procs["mha"] = subprocess.Popen(
            [find_binary("masterha_manager"), f"--conf={config}", "--ignore_last_failover"],
            env={**os.environ, **MHA_PERL_ENV}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()

        def monitoring():
            if self.procs["mha"].poll() is not None:
                raise RuntimeError(f"MHA exited:\n{self.mha_log()[-3000:]}")
            return "waiting until MySQL doesn't respond" in self.mha_log()
        wait_for(monitoring, 60, "MHA to monitor the primary", 0.2)


class SagaLoad:
    """Clients that start sagas of every registered type (round robin, each input from
    the type's sample) at the orchestrator's /sagas/start until stopped, and keep every
    answer: (type, sent, answered, HTTP status, saga id, saga status), times monotonic."""

    def __init__(self, url, saga_types, clients=6, seed=1):
        self.url, self.types, self.clients, self.seed = url, list(saga_types), clients, seed
        self.answers = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []

    def start(self):
        for k in range(self.clients):
            thread = threading.Thread(target=self._client, args=(k,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout=120):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"a load client still waits for an answer after {timeout}s")

    def completed(self, sent_after=None):
        """Answers 200 COMPLETED (to requests sent after `sent_after`, if given)."""
        with self._lock:
            return [a for a in self.answers if a["code"] == 200 and a["status"] == "COMPLETED"
                    and (sent_after is None or a["sent"] > sent_after)]

    def _client(self, k):
        rng = random.Random(f"{self.seed}-{k}")
        n = 0
        while not self._stop.is_set():
            saga_type = self.types[(k + n) % len(self.types)]
            n += 1
            data = saga_type.sample(rng) if saga_type.sample else dict(saga_type.example)
            answer = {"type": saga_type.name, "sent": time.monotonic(), "code": None,
                      "saga": None, "status": None}
            try:
                resp = requests.post(self.url + "/sagas/start",
                                     json={"saga_type": saga_type.name, **data}, timeout=90)
                answer["code"] = resp.status_code
                body = resp.json() if resp.headers.get("content-type", "").startswith(
                    "application/json") else {}
                answer["saga"], answer["status"] = body.get("saga"), body.get("status")
            except requests.RequestException as exc:
                answer["error"] = repr(exc)
            answer["answered"] = time.monotonic()
            if answer["code"] in (None, 503):
                self._stop.wait(0.2)   # the orchestrator or the database is away: no spinning
            with self._lock:
                self.answers.append(answer)


def measure_failover(workdir, clients=6, warmup=20, after=20, seed=1):
    """One run: a pair, the four processes, load; kill -9 the primary. Returns the
    figures and the problems found (empty when nothing acknowledged was lost)."""
    sys.path.insert(0, ROOT)
    import common  # noqa: F401  (the demo's saga types, the driver first)
    from saga.definitions import SAGA_TYPES

    pair = MariaDBPair(os.path.join(workdir, "db"))
    system = load = None
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    try:
        pair.start()
        system = System(os.path.join(workdir, "logs"),
                        {**pair.url_env(), "SAGA_FAULTS": "off", "RABBITMQ_URL": "off"})
        system.start()
        load = SagaLoad(system.url(), SAGA_TYPES.values(), clients, seed).start()
        wait_for(lambda: len(load.completed()) >= warmup, 120, f"{warmup} sagas to complete")
        pair.kill_primary()
        killed = pair.killed_at
        promoted = pair.wait_promoted(120)
        wait_for(lambda: len(load.completed(sent_after=killed)) >= after, 120,
                 f"{after} sagas sent after the kill to complete")
        load.stop()
        first = min(a["answered"] for a in load.completed(sent_after=killed)) - killed
        wait_for(lambda: pair.query("SELECT COUNT(*) FROM SAGA WHERE status IN "
                                    "('RUNNING', 'COMPENSATING')")[0][0] == 0,
                 120, "every saga to finish")
        problems = []
        statuses = dict(pair.query("SELECT id, status FROM SAGA"))
        for a in load.completed():
            if statuses.get(a["saga"]) != "COMPLETED":
                problems.append(f"{a['type']} saga {a['saga']} answered 200 COMPLETED, "
                                f"now {statuses.get(a['saga'])}")
        conn = pair.connect()
        try:
            for saga_type in SAGA_TYPES.values():
                problems += saga_type.invariant(conn.cursor(dictionary=True))
        finally:
            conn.close()
        return {"promoted_s": round(promoted, 2), "first_completed_s": round(first, 2),
                "sagas": len(statuses), "completed_200": len(load.completed()),
                "answers_503": sum(a["code"] == 503 for a in load.answers)}, problems
    finally:
        if load:
            load._stop.set()
        if system:
            system.stop()
        pair.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="a pair in the foreground")
    run.add_argument("--dir", default=None, help="where the pair keeps its files")
    fail = sub.add_parser("failover", help="measure failovers under load")
    fail.add_argument("--runs", type=int, default=3)
    fail.add_argument("--clients", type=int, default=6)
    fail.add_argument("--dir", default=None, help="keep each run's files here")
    args = parser.parse_args()
    if args.command == "failover":
        failed = False
        for run_no in range(1, args.runs + 1):
            workdir = os.path.join(args.dir, f"run{run_no}") if args.dir else \
                tempfile.mkdtemp(prefix="mariadb-failover-")
            figures, problems = measure_failover(workdir, args.clients, seed=run_no)
            print(f"run {run_no}: kill -9 primary -> replica takes writes "
                  f"{figures['promoted_s']} s, -> first saga completed "
                  f"{figures['first_completed_s']} s; {figures['sagas']} sagas, "
                  f"{figures['completed_200']} answered 200 COMPLETED, "
                  f"{figures['answers_503']} answered 503; problems: {len(problems)}",
                  flush=True)
            for problem in problems:
                print("  ", problem)
            failed |= bool(problems)
        sys.exit(1 if failed else 0)
    basedir = args.dir or os.path.join(tempfile.gettempdir(), f"mariadb-pair-{os.getpid()}")
    pair = MariaDBPair(basedir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        pair.start()
        print(" ".join(f"{k}={v}" for k, v in pair.url_env().items()), flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        pair.stop()


if __name__ == "__main__":
    main()
