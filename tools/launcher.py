"""Start, kill, freeze and restart the real processes: a private MariaDB server and the
four saga processes. Used by the tests, chaos.py and bench.py (not by the demo, which
uses the machine's MariaDB and honcho)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import mysql.connector
import requests

from brokers import pick_free_port as free_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the project: its processes and schema.sql
# Named, so a server reporting a made-up version still gets a collation it knows.
COLLATION = "utf8mb4_unicode_ci"
PROCESSES = ("orchestrator", "service_a", "service_b", "service_c")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/bin", "/usr/local/bin",
        "/opt/homebrew/sbin")


def find_binary(*names):
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    for name in names:
        found = shutil.which(name, path=path)
        if found:
            return found
    raise FileNotFoundError(f"none of {names} found; run ./run.sh test to install MariaDB")


def wait_for(condition, timeout, what, interval=0.05):
    """Poll `condition` until it returns a truthy value or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def query_once(conn, sql, params=()):
    """One statement on a connection of its own, which it closes: the rows, or the
    count of rows changed."""
    try:
        cur = conn.cursor()
        cur.execute(sql, params)
        return cur.fetchall() if cur.with_rows else cur.rowcount
    finally:
        conn.close()


class PrivateMariaDB:
    """A throwaway MariaDB server in its own data directory, on its own port, so tests
    can restart or kill the database without touching the machine's own server."""

    def __init__(self, basedir, port=None, tz=None, version=None):
        self.basedir = basedir
        self.tz = tz              # the server's local time zone (TZ), e.g. one with DST
        self.version = version    # a version string for the server to report
        self.datadir = os.path.join(basedir, "data")
        self.socket = os.path.join(basedir, "mariadb.sock")
        self.port = port or free_port()
        self.proc = None

    def install(self):
        os.makedirs(self.datadir, exist_ok=True)
        user = ["--user=root"] if os.geteuid() == 0 else []
        try:
            subprocess.run([find_binary("mariadb-install-db", "mysql_install_db"),
                            "--no-defaults", f"--datadir={self.datadir}",
                            "--auth-root-authentication-method=normal", "--skip-test-db", *user],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"mariadb-install-db failed in {self.datadir}:\n"
                               f"{(exc.stderr or b'').decode(errors='replace')}") from exc

    def options(self) -> list[str]:
        """How the server runs, beyond where it keeps its files. The first is where its
        defaults come from (--no-defaults): mariadbd reads that only as its first option."""
        return ["--no-defaults", "--bind-address=127.0.0.1", "--skip-name-resolve",
                "--innodb-buffer-pool-size=256M", "--innodb-flush-log-at-trx-commit=1",
                "--max-connections=500",
                *([f"--version={self.version}"] if self.version else [])]

    def start(self):
        user = ["--user=root"] if os.geteuid() == 0 else []
        self.log_path = os.path.join(self.basedir, "mariadb.log")
        defaults, *options = self.options()
        self.proc = subprocess.Popen(
            [find_binary("mariadbd", "mysqld"), defaults, f"--datadir={self.datadir}",
             f"--socket={self.socket}", f"--port={self.port}",
             f"--pid-file={os.path.join(self.basedir, 'mariadb.pid')}",
             f"--log-error={self.log_path}", *options, *user],
            env={**os.environ, **({"TZ": self.tz} if self.tz else {})},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._accepts, 60, "MariaDB to accept connections", 0.1)

    def _accepts(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"mariadbd exited; see {self.log_path}")
        try:
            mysql.connector.connect(unix_socket=self.socket, user="root",
                                    collation=COLLATION).close()
            return True
        except mysql.connector.Error:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def root(self, *statements):
        """Run statements as the server's root; returns the last one's rows, if any."""
        conn = mysql.connector.connect(unix_socket=self.socket, user="root", autocommit=True,
                                       collation=COLLATION)
        try:
            cur = conn.cursor()
            rows = []
            for sql in statements:
                cur.execute(sql)
                rows = cur.fetchall() if cur.with_rows else []
            return rows
        finally:
            conn.close()

    def create_database(self, name, user="saga", password="saga", schema=None):
        """A fresh database with schema.sql (or `schema`) applied, and `user` holding
        rights on it only."""
        self.root(f"DROP DATABASE IF EXISTS `{name}`", f"CREATE DATABASE `{name}` "
                  "CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci",
                  f"CREATE USER IF NOT EXISTS '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'",
                  f"CREATE USER IF NOT EXISTS '{user}'@'localhost' IDENTIFIED BY '{password}'",
                  f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{user}'@'127.0.0.1'",
                  f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{user}'@'localhost'")
        self.apply(name, schema or os.path.join(ROOT, "schema.sql"), user, password)
        return name

    def apply(self, name, sql_file, user="saga", password="saga"):
        """Run an SQL file in database `name` with the mariadb client, as `user`."""
        with open(sql_file, "rb") as sql:
            subprocess.run([find_binary("mariadb", "mysql"), "--no-defaults", "-h127.0.0.1",
                            f"-P{self.port}", f"-u{user}", f"-p{password}", name],
                           stdin=sql, check=True)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class System:
    """The four saga processes, each `python <file>.py` in its own process group with
    its log in `logdir`, configured only through the environment."""

    def __init__(self, logdir, env, orchestrators=1, second_instances=()):
        self.logdir = logdir
        # Extra orchestrators ("orchestrator2", ...) share the database and the services;
        # a second instance of a service ("service_b2") shares its work (over Kafka).
        self.names = PROCESSES + tuple(f"orchestrator{n}" for n in range(2, orchestrators + 1)) \
            + tuple(f"service_{s.lower()}2" for s in second_instances)
        self.ports = {name: free_port() for name in self.names}
        # Ports and URLs of this system first; what the caller gave wins (a test may
        # point a service URL somewhere else on purpose).
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "ORCHESTRATOR_PORT": str(self.ports["orchestrator"]),
                    "SERVICE_A_PORT": str(self.ports["service_a"]),
                    "SERVICE_B_PORT": str(self.ports["service_b"]),
                    "SERVICE_C_PORT": str(self.ports["service_c"]),
                    "SERVICE_A_URL": f"http://127.0.0.1:{self.ports['service_a']}",
                    "SERVICE_B_URL": f"http://127.0.0.1:{self.ports['service_b']}",
                    "SERVICE_C_URL": f"http://127.0.0.1:{self.ports['service_c']}", **env}
        self.procs = {}
        self.frozen = set()

    def url(self, name="orchestrator"):
        return f"http://127.0.0.1:{self.ports[name]}"

    def start(self, *names):
        names = names or self.names
        for name in names:
            log = open(os.path.join(self.logdir, f"{name}.log"), "ab")
            script = name.rstrip("0123456789") + ".py"
            port_of = "ORCHESTRATOR_PORT" if name.startswith("orchestrator") \
                else f"SERVICE_{name.rstrip('0123456789')[-1].upper()}_PORT"
            env = {**self.env, port_of: str(self.ports[name])}
            self.procs[name] = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, script)], cwd=ROOT, env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
        for name in names:
            self.wait_healthy(name)

    def wait_healthy(self, name, timeout=30):
        def healthy():
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}; "
                                   f"see {self.logdir}/{name}.log")
            try:
                return requests.get(self.url(name) + "/health", timeout=1).status_code == 200
            except requests.RequestException:
                return False
        wait_for(healthy, timeout, f"{name} to be healthy")

    def alive(self, name):
        return name in self.procs and self.procs[name].poll() is None

    def signal(self, name, sig):
        os.killpg(self.procs[name].pid, sig)

    def kill(self, name):
        """kill -9 the process and every worker it forked, and return once all of them
        are gone (their sockets closed), not just the one we started."""
        if self.alive(name):
            self.signal(name, signal.SIGKILL)
            self.procs[name].wait(10)
            wait_for(lambda: not group_alive(self.procs[name].pid), 10,
                     f"every process of {name} to be gone")
        self.frozen.discard(name)

    def freeze(self, name):
        self.signal(name, signal.SIGSTOP)
        self.frozen.add(name)

    def thaw(self, name):
        self.signal(name, signal.SIGCONT)
        self.frozen.discard(name)

    def restart(self, name):
        self.kill(name)
        self.start(name)

    def stop(self):
        for name in list(self.procs):
            if name in self.frozen:
                self.thaw(name)
            if self.alive(name):
                self.signal(name, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill(name)
