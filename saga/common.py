"""The foundation every process shares: its settings (all from the environment) and its
database (a small connection pool with visible transactions, UTC sessions, retries that
are safe, and a check that the server can do what the engine needs).

Each process imports this module before anything else: the database driver's C
extension carries its own OpenSSL, newer than Debian 12's, and loads only if it comes
before the first module that loads the system's (Python's ssl, which http.client,
urllib3 and Flask import). Where it cannot load, the same driver runs in pure Python."""

try:
    import _mysql_connector  # noqa: F401  (see above: it must come first)
    from _mysql_connector import MySQLInterfaceError
    C_DRIVER = True
except ImportError:
    C_DRIVER = False

    class MySQLInterfaceError(Exception):
        """Stands in for the C extension's raw error when it is not loaded."""

import logging
import os
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import mysql.connector
from mysql.connector import errorcode, errors
from mysql.connector.constants import ClientFlag

log = logging.getLogger("saga")



def _service_names(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,39}", n)]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"SAGA_SERVICES={raw!r}: expected distinct names of letters, digits "
                         "and '_' (at most 40 characters), e.g. A,B,C")
    return names


# The participants, by name (SAGA_SERVICES): each owns its tables; the saga types'
# steps name them; SERVICE_<NAME>_URL and SERVICE_<NAME>_PORT place each one. The demo's
# are A, B and C (each also holds one account).
SERVICES = _service_names(os.environ.get("SAGA_SERVICES", "A,B,C"))


# --- settings -----------------------------------------------------------------------

class ConfigError(ValueError):
    """A setting that cannot be used; the process stops with this message."""


def _env(name, default, kind=str, low=None, high=None):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if low is not None and value < low or high is not None and value > high:
        raise ConfigError(f"{name}={raw!r} must be from {low} to {high}")
    return value


@dataclass(frozen=True)
class Settings:
    db_host: str = "127.0.0.1"
    db_port: int = 3306
    db_user: str = "saga"
    db_password: str = field(default="saga", repr=False)
    db_name: str = "saga_db"
    ports: dict = field(default_factory=dict)          # "orchestrator", each service -> port
    service_urls: dict = field(default_factory=dict)   # each service -> base URL
    connect_timeout: float = 1.0
    read_timeout: float = 5.0
    max_attempts: int = 3
    compensate_for: float = 60.0
    start_wait: float = 30.0
    faults: str = "seed"
    api_token: str | None = field(default=None, repr=False)
    transport: str = "http"
    kafka_bootstrap: str = "127.0.0.1:9092"
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    rabbitmq_queue_type: str = ""                       # "": by the number of nodes (events.py)
    # Beyond the interface contract: recovery, retention and server tuning (README).
    lease_seconds: float = 2.0
    recovery_interval: float = 0.5
    backoff_base: float = 0.1
    backoff_max: float = 2.0
    retention_days: float = 0.0
    web_workers: int = 1
    web_threads: int = 128
    drivers: int = 32
    consumers: int = 4                                  # event consumers per service process
    db_pool_size: int = 0                               # 0: sized from the thread counts
    # Observability (README "Metrics and tracing").
    log_format: str = "text"                            # or "json": one JSON object a line
    metrics_dir: str = ""                               # "": the system's temp directory


def load_settings() -> Settings:
    ports = {"orchestrator": _env("ORCHESTRATOR_PORT", 5000, int, 1, 65535)}
    urls = {}
    for n, name in enumerate(SERVICES, start=1):
        ports[name] = _env(f"SERVICE_{name.upper()}_PORT", 5000 + n, int, 1, 65535)
        urls[name] = _env(f"SERVICE_{name.upper()}_URL",
                          f"http://127.0.0.1:{ports[name]}").rstrip("/")
    s = Settings(
        db_host=_env("SAGA_DB_HOST", "127.0.0.1"),
        db_port=_env("SAGA_DB_PORT", 3306, int, 1, 65535),
        db_user=_env("SAGA_DB_USER", "saga"),
        db_password=os.environ.get("SAGA_DB_PASSWORD", "saga"),
        db_name=_env("SAGA_DB_NAME", "saga_db"),
        ports=ports,
        service_urls=urls,
        connect_timeout=_env("SAGA_CONNECT_TIMEOUT", 1.0, float, 0.01, 600),
        read_timeout=_env("SAGA_READ_TIMEOUT", 5.0, float, 0.01, 3600),
        max_attempts=_env("SAGA_MAX_ATTEMPTS", 3, int, 1, 1000),
        compensate_for=_env("SAGA_COMPENSATE_FOR", 60.0, float, 0, 10 ** 7),
        start_wait=_env("SAGA_START_WAIT", 30.0, float, 0, 3600),
        faults=_env("SAGA_FAULTS", "seed"),
        api_token=os.environ.get("SAGA_API_TOKEN") or None,
        transport=_env("SAGA_TRANSPORT", "http"),
        kafka_bootstrap=_env("KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        # "off": no choreography (no relay, no consumers, /register answers 503).
        rabbitmq_url=_env("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        rabbitmq_queue_type=_env("RABBITMQ_QUEUE_TYPE", "").strip().lower(),
        lease_seconds=_env("SAGA_LEASE_SECONDS", 2.0, float, 0.1, 3600),
        recovery_interval=_env("SAGA_RECOVERY_INTERVAL", 0.5, float, 0.01, 3600),
        backoff_base=_env("SAGA_BACKOFF_BASE", 0.1, float, 0, 3600),
        backoff_max=_env("SAGA_BACKOFF_MAX", 2.0, float, 0, 3600),
        retention_days=_env("SAGA_RETENTION_DAYS", 0.0, float, 0, 100_000),
        web_workers=_env("SAGA_WEB_WORKERS", 1, int, 1, 64),
        web_threads=_env("SAGA_WEB_THREADS", 128, int, 9, 1000),
        drivers=_env("SAGA_DRIVERS", 32, int, 1, 1000),
        consumers=_env("SAGA_CONSUMERS", 4, int, 1, 64),
        db_pool_size=_env("SAGA_DB_POOL_SIZE", 0, int, 0, 1000),
        log_format=_env("SAGA_LOG_FORMAT", "text"),
        metrics_dir=_env("SAGA_METRICS_DIR", ""),
    )
    if s.faults not in ("seed", "off"):
        raise ConfigError(f"SAGA_FAULTS={s.faults!r}: expected 'seed' or 'off'")
    if s.transport not in ("http", "kafka"):
        raise ConfigError(f"SAGA_TRANSPORT={s.transport!r}: expected 'http' or 'kafka'")
    if s.rabbitmq_queue_type not in ("", "classic", "quorum"):
        raise ConfigError(f"RABBITMQ_QUEUE_TYPE={s.rabbitmq_queue_type!r}: expected "
                          "'classic' or 'quorum'")
    if s.log_format not in ("text", "json"):
        raise ConfigError(f"SAGA_LOG_FORMAT={s.log_format!r}: expected 'text' or 'json'")
    if s.metrics_dir and not os.path.isdir(s.metrics_dir):
        raise ConfigError(f"SAGA_METRICS_DIR={s.metrics_dir!r} is not a directory")
    return s


def backoff_delay(base: float, cap: float, attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (1, 2, ...): the ceiling doubles
    with each attempt up to `cap`, and the delay is drawn from its upper half, so sagas
    that failed together do not all retry together."""
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def purge_interval(retention_days: float) -> float:
    """Seconds between retention passes: a minute, or less for a very short retention."""
    return min(60.0, max(0.5, retention_days * 86400 / 10))


# --- the database server ---------------------------------------------------------------

# FOR UPDATE SKIP LOCKED, which recovery needs, arrived in these versions.
MINIMUM_SERVER = {"MariaDB": (10, 6), "MySQL": (8, 0, 1)}


class UnsupportedServer(RuntimeError):
    pass


def check_server_version(info: str) -> None:
    """Raise UnsupportedServer unless the server string names a version recent enough."""
    kind = "MariaDB" if "mariadb" in info.lower() else "MySQL"
    # MariaDB may present itself as "5.5.5-10.11.6-MariaDB" to old clients.
    numbers = re.findall(r"(\d+)\.(\d+)\.(\d+)", info.replace("5.5.5-", "", 1))
    found = tuple(int(n) for n in numbers[0]) if numbers else (0,)
    if found < MINIMUM_SERVER[kind]:
        need = " or ".join(f"{k} {'.'.join(map(str, v))}" for k, v in MINIMUM_SERVER.items())
        raise UnsupportedServer(
            f"database server {kind} {'.'.join(map(str, found))} ({info}) is too old: the "
            f"saga engine needs FOR UPDATE SKIP LOCKED, which needs {need} or newer")


# Errors that mean "the database could not be reached or gave up on this transaction",
# as opposed to a bug in our SQL: the transaction did not commit, and trying it again
# (now, or by the caller after a 503) is the right answer.
TRANSIENT_ERRNOS = {
    errorcode.CR_CONNECTION_ERROR, errorcode.CR_CONN_HOST_ERROR,
    errorcode.CR_SERVER_GONE_ERROR, errorcode.CR_SERVER_LOST,
    errorcode.ER_LOCK_DEADLOCK, errorcode.ER_LOCK_WAIT_TIMEOUT,
    errorcode.ER_SERVER_SHUTDOWN, errorcode.ER_CON_COUNT_ERROR,
    errorcode.ER_QUERY_INTERRUPTED, 1927,  # 1927: MariaDB's "connection was killed"
}
LOCK_ERRNOS = {errorcode.ER_LOCK_DEADLOCK, errorcode.ER_LOCK_WAIT_TIMEOUT}


def is_unavailable(exc: BaseException | None) -> bool:
    """True for a database error worth retrying (lost connection, deadlock, pool
    exhausted, ...). mysql-connector may wrap a lost connection in another error, so the
    causes are looked at too."""
    while exc is not None:
        if isinstance(exc, (mysql.connector.errors.InterfaceError,
                            mysql.connector.errors.OperationalError,
                            mysql.connector.errors.PoolError, UnsupportedServer)):
            return True
        if isinstance(exc, mysql.connector.Error) and exc.errno in TRANSIENT_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class CommitUnknown(mysql.connector.errors.OperationalError):
    """The connection broke while COMMIT was on its way: the transaction may or may not
    have committed. Only work that can tell (or does not care) may be run again."""


T = TypeVar("T")


class Database:
    """A pool of connections, each kept with one buffered dictionary cursor (rows are
    read by column name). Not mysql-connector's own pool: that pings every connection it
    hands out under a process-wide lock, and each new cursor pings again. Here a
    connection idle for less than PING_AFTER seconds is used without a ping; if it turns
    out dead, `run` retries the work on a fresh one (nothing was committed)."""

    PING_AFTER = 2.0

    def __init__(self, settings: Settings, pool_size: int):
        self._settings = settings
        self.pool_size = settings.db_pool_size or pool_size
        self._slots = threading.BoundedSemaphore(self.pool_size)
        self._idle = []  # (connection, cursor, last used), most recently used last
        self._lock = threading.Lock()
        self._version_checked = False

    def _connect(self):
        s = self._settings
        conn = mysql.connector.connect(
            host=s.db_host, port=s.db_port, user=s.db_user, password=s.db_password,
            database=s.db_name, charset="utf8mb4", collation="utf8mb4_unicode_ci",
            autocommit=False, connection_timeout=5, use_pure=not C_DRIVER,
            # Every time the engine stores or compares is UTC: a lease must not stretch
            # or vanish when the server's local clock changes for daylight saving.
            init_command="SET time_zone = '+00:00'",
            # UPDATE's rowcount counts matched rows, which the fencing check needs.
            client_flags=[ClientFlag.FOUND_ROWS])
        # The driver would add the current span's traceparent to every statement as a
        # query attribute (MariaDB ignores them): work on each statement, for nothing.
        conn.otel_context_propagation = False
        if not self._version_checked:
            try:
                check_server_version(conn.server_info or "")
            except UnsupportedServer:
                _close_quietly(conn)
                raise
            self._version_checked = True
        return conn, conn.cursor(buffered=True, dictionary=True)

    def check_server(self) -> bool:
        """Connect once: True if the server is up, False if it cannot be reached now;
        UnsupportedServer (which stops the process) if it is too old."""
        try:
            with self.transaction() as cur:
                cur.execute("SELECT 1 AS up")
            return True
        except UnsupportedServer:
            raise
        except mysql.connector.Error as exc:
            log.warning("database not reachable yet: %s", exc)
            return False

    def _checkout(self):
        with self._lock:
            item = self._idle.pop() if self._idle else None
        if item is None:
            return self._connect()
        conn, cur, last_used = item
        if time.monotonic() - last_used < self.PING_AFTER:
            return conn, cur
        try:
            conn.ping(reconnect=False)
            return conn, cur
        except mysql.connector.Error:
            _close_quietly(conn)
            return self._connect()

    @contextmanager
    def _checked_out(self):
        if not self._slots.acquire(timeout=10):
            raise mysql.connector.errors.PoolError(
                f"all {self.pool_size} database connections busy for 10 s")
        try:
            conn, cur = self._checkout()
            healthy = False
            try:
                yield conn, cur
                healthy = True
            except BaseException as exc:
                healthy = not is_unavailable(exc) or getattr(exc, "errno", None) in LOCK_ERRNOS
                raise
            finally:
                if healthy:
                    with self._lock:
                        self._idle.append((conn, cur, time.monotonic()))
                else:
                    # The server went away: the idle connections are most likely dead
                    # too, so drop them all rather than find out one by one.
                    with self._lock:
                        dead, self._idle = self._idle, []
                    for other, _, _ in dead + [(conn, None, None)]:
                        _close_quietly(other)
        finally:
            self._slots.release()

    @contextmanager
    def transaction(self, read_committed: bool = False):
        """One transaction: committed when the block ends, rolled back if it raises.
        A connection lost during COMMIT raises CommitUnknown."""
        with self._checked_out() as (conn, cur):
            try:
                if read_committed:  # applies to this transaction only
                    cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                yield cur
            except BaseException:
                try:
                    conn.rollback()
                except (mysql.connector.Error, MySQLInterfaceError):
                    pass
                raise
            if not conn.in_transaction:
                return  # the work committed in its last round trip (commit_with)
            try:
                commit(conn)
            except mysql.connector.Error as exc:
                if is_unavailable(exc) and exc.errno not in LOCK_ERRNOS:
                    raise CommitUnknown(msg=f"connection lost during COMMIT: {exc}") from exc
                raise

    def run(self, work: Callable, *, attempts: int = 4, idempotent: bool = False,
            read_committed: bool = False) -> T:
        """work(cursor) in a transaction, run again (up to `attempts` times, with a short
        backoff) when the database gave up on it before it committed: a deadlock, a lock
        wait timeout, a connection that died. A commit whose outcome is unknown is run
        again only for `idempotent` work, which must find out for itself what landed."""
        for attempt in range(1, attempts + 1):
            try:
                with self.transaction(read_committed) as cur:
                    return work(cur)
            except CommitUnknown:
                if not idempotent or attempt == attempts:
                    raise
            except mysql.connector.Error as exc:
                if not is_unavailable(exc) or attempt == attempts:
                    raise
            time.sleep(backoff_delay(0.01, 0.2, attempt))
        raise AssertionError("unreachable")

    def ping(self) -> bool:
        try:
            with self.transaction() as cur:
                cur.execute("SELECT 1 AS up")
            return True
        except mysql.connector.Error:
            return False
        except UnsupportedServer:
            return False


def driver_error(exc: MySQLInterfaceError) -> mysql.connector.Error:
    """The C extension raises its raw error from a few calls (COMMIT, the next result of
    a multi-statement): the driver's own error class for it, as everywhere else."""
    return errors.get_mysql_exception(
        getattr(exc, "errno", None) or errorcode.CR_SERVER_LOST,
        msg=getattr(exc, "msg", None) or str(exc), sqlstate=getattr(exc, "sqlstate", None))


def commit(conn) -> None:
    try:
        conn.commit()
    except MySQLInterfaceError as exc:
        raise driver_error(exc) from exc


def drain_results(cur) -> None:
    """Read the remaining results of a multi-statement (its later statements' errors
    arrive here)."""
    try:
        while cur.nextset():
            pass
    except MySQLInterfaceError as exc:
        raise driver_error(exc) from exc


def commit_with(cur, sql: str, params=()) -> tuple[int, int]:
    """Run `sql` (one statement or several, separated by ';') and COMMIT, in one round
    trip to the server; returns the first statement's row count and new row id. A
    transaction's last statements are sent this way on the hot paths: a round trip is
    most of what a statement costs here. A connection lost on the way raises
    CommitUnknown."""
    try:
        cur.execute(f"{sql}; COMMIT", params)
        first = cur.rowcount, cur.lastrowid
        drain_results(cur)
        return first
    except mysql.connector.Error as exc:
        if is_unavailable(exc) and exc.errno not in LOCK_ERRNOS:
            raise CommitUnknown(msg=f"connection lost during a commit: {exc}") from exc
        raise


def _close_quietly(conn):
    try:
        conn.close()
    except Exception:  # closing a dead connection may fail in any way; it is gone anyway
        pass
