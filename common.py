"""What every process shares: settings, the database pool, JSON errors, fault
injection, and the production server that runs each app."""

import hmac
import json
import logging
import mmap
import multiprocessing
import os
import random
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import mysql.connector
from mysql.connector import errorcode
from mysql.connector.constants import ClientFlag
from flask import jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("saga")


# --- settings -----------------------------------------------------------------------

class ConfigError(ValueError):
    pass


def _env(name, default, kind=str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if kind in (int, float) and value < 0:
        raise ConfigError(f"{name}={raw!r} must not be negative")
    return value


@dataclass(frozen=True)
class Settings:
    db_host: str = "127.0.0.1"
    db_port: int = 3306
    db_user: str = "saga"
    db_password: str = field(default="saga", repr=False)
    db_name: str = "saga_db"
    orchestrator_port: int = 5000
    service_a_port: int = 5001
    service_b_port: int = 5002
    service_c_port: int = 5003
    service_a_url: str = "http://127.0.0.1:5001"
    service_b_url: str = "http://127.0.0.1:5002"
    service_c_url: str = "http://127.0.0.1:5003"
    connect_timeout: float = 1.0
    read_timeout: float = 5.0
    max_attempts: int = 3
    compensate_for: float = 60.0
    start_wait: float = 30.0
    faults: str = "seed"
    api_token: str | None = field(default=None, repr=False)
    # Beyond DESIGN.md's contract: recovery and server tuning, documented in the README.
    lease_seconds: float = 2.0
    recovery_interval: float = 0.5
    backoff_base: float = 0.1
    backoff_max: float = 2.0
    web_workers: int = 1
    web_threads: int = 16
    db_pool_size: int = 20
    drivers: int = 32


def load_settings():
    s = Settings(
        db_host=_env("SAGA_DB_HOST", "127.0.0.1"),
        db_port=_env("SAGA_DB_PORT", 3306, int),
        db_user=_env("SAGA_DB_USER", "saga"),
        db_password=os.environ.get("SAGA_DB_PASSWORD", "saga"),
        db_name=_env("SAGA_DB_NAME", "saga_db"),
        orchestrator_port=_env("ORCHESTRATOR_PORT", 5000, int),
        service_a_port=_env("SERVICE_A_PORT", 5001, int),
        service_b_port=_env("SERVICE_B_PORT", 5002, int),
        service_c_port=_env("SERVICE_C_PORT", 5003, int),
        service_a_url=_env("SERVICE_A_URL", "http://127.0.0.1:5001").rstrip("/"),
        service_b_url=_env("SERVICE_B_URL", "http://127.0.0.1:5002").rstrip("/"),
        service_c_url=_env("SERVICE_C_URL", "http://127.0.0.1:5003").rstrip("/"),
        connect_timeout=_env("SAGA_CONNECT_TIMEOUT", 1.0, float),
        read_timeout=_env("SAGA_READ_TIMEOUT", 5.0, float),
        max_attempts=_env("SAGA_MAX_ATTEMPTS", 3, int),
        compensate_for=_env("SAGA_COMPENSATE_FOR", 60.0, float),
        start_wait=_env("SAGA_START_WAIT", 30.0, float),
        faults=_env("SAGA_FAULTS", "seed"),
        api_token=os.environ.get("SAGA_API_TOKEN") or None,
        lease_seconds=_env("SAGA_LEASE_SECONDS", 2.0, float),
        recovery_interval=_env("SAGA_RECOVERY_INTERVAL", 0.5, float),
        backoff_base=_env("SAGA_BACKOFF_BASE", 0.1, float),
        backoff_max=_env("SAGA_BACKOFF_MAX", 2.0, float),
        web_workers=_env("SAGA_WEB_WORKERS", 1, int),
        web_threads=_env("SAGA_WEB_THREADS", 16, int),
        db_pool_size=_env("SAGA_DB_POOL_SIZE", 20, int),
        drivers=_env("SAGA_DRIVERS", 32, int),
    )
    if s.max_attempts < 1:
        raise ConfigError("SAGA_MAX_ATTEMPTS must be at least 1")
    if s.faults not in ("seed", "off"):
        raise ConfigError(f"SAGA_FAULTS={s.faults!r}: expected 'seed' or 'off'")
    if not 1 <= s.db_pool_size <= 200:
        raise ConfigError("SAGA_DB_POOL_SIZE must be 1..200")
    return s


def backoff_delay(settings, attempt):
    """Seconds to wait before attempt `attempt + 1`: exponential, capped, with jitter so
    that sagas failing together do not retry together."""
    ceiling = min(settings.backoff_max, settings.backoff_base * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


# --- database -----------------------------------------------------------------------

# Errors that mean "the database could not be reached or gave up on us", as opposed to
# a bug in our SQL: callers answer 503 and the caller of the caller retries.
UNAVAILABLE_ERRNOS = {
    errorcode.CR_CONNECTION_ERROR, errorcode.CR_CONN_HOST_ERROR,
    errorcode.CR_SERVER_GONE_ERROR, errorcode.CR_SERVER_LOST,
    errorcode.ER_LOCK_DEADLOCK, errorcode.ER_LOCK_WAIT_TIMEOUT,
    errorcode.ER_SERVER_SHUTDOWN, errorcode.ER_CON_COUNT_ERROR,
}


LOCK_ERRNOS = {errorcode.ER_LOCK_DEADLOCK, errorcode.ER_LOCK_WAIT_TIMEOUT}


def is_unavailable(exc):
    # mysql-connector may wrap a lost connection in a ProgrammingError: look at causes too.
    while exc is not None:
        if isinstance(exc, (mysql.connector.errors.InterfaceError,
                            mysql.connector.errors.OperationalError,
                            mysql.connector.errors.PoolError)):
            return True
        if isinstance(exc, mysql.connector.Error) and exc.errno in UNAVAILABLE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class Database:
    """A small pool of connections, each kept with one cursor. Not mysql-connector's own
    pool: that pings every connection it hands out while holding a lock global to the
    process, and each new cursor pings again. Here each checkout pings once, outside any
    lock, and reconnects a dead connection, so a restarted server costs no failed
    request; the semaphore makes a busy pool wait instead of raising."""

    def __init__(self, settings):
        self._settings = settings
        self._slots = threading.BoundedSemaphore(settings.db_pool_size)
        self._idle = []  # (connection, cursor), most recently used last
        self._lock = threading.Lock()

    def _connect(self):
        s = self._settings
        conn = mysql.connector.connect(
            host=s.db_host, port=s.db_port, user=s.db_user, password=s.db_password,
            database=s.db_name, charset="utf8mb4", collation="utf8mb4_unicode_ci",
            # Pure Python: the same behaviour everywhere (the C extension raises its own
            # unwrapped errors from commit, and cannot load beside Debian 12's OpenSSL).
            autocommit=False, connection_timeout=5, use_pure=True,
            # UPDATE's rowcount counts matched rows, which the fencing check needs.
            client_flags=[ClientFlag.FOUND_ROWS])
        return conn, conn.cursor(buffered=True)

    def _checkout(self):
        with self._lock:
            item = self._idle.pop() if self._idle else None
        if item is None:
            return self._connect()
        conn, cur = item
        try:
            conn.ping(reconnect=False)
            return conn, cur
        except mysql.connector.Error:
            _close_quietly(conn)
            return self._connect()

    @contextmanager
    def _checked_out(self):
        if not self._slots.acquire(timeout=10):
            raise mysql.connector.errors.PoolError("no database connection free for 10 s")
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
                        self._idle.append((conn, cur))
                else:
                    # The server went away: the idle connections are most likely dead
                    # too, so drop them all rather than ping each in turn.
                    with self._lock:
                        dead, self._idle = self._idle, []
                    for other, _ in dead + [(conn, None)]:
                        _close_quietly(other)
        finally:
            self._slots.release()

    @contextmanager
    def transaction(self, read_committed=False):
        with self._checked_out() as (conn, cur):
            try:
                if read_committed:  # applies to this transaction only
                    cur.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                yield cur
                conn.commit()
            except BaseException:
                try:
                    conn.rollback()
                except mysql.connector.Error:
                    pass
                raise

    def ping(self):
        try:
            with self.transaction() as cur:
                cur.execute("SELECT 1")
                cur.fetchall()
            return True
        except mysql.connector.Error:
            return False


def _close_quietly(conn):
    try:
        conn.close()
    except Exception:  # closing a dead connection may fail in any way; it is gone anyway
        pass


# --- HTTP helpers ---------------------------------------------------------------------

MAX_BODY_BYTES = 64 * 1024


def error(http_status, message, field=None, **extra):
    body = {"error": message}
    if field is not None:
        body["field"] = field
    body.update(extra)
    return jsonify(body), http_status


class BadRequest(Exception):
    """A client error found while reading a request: becomes a 4xx JSON answer."""

    def __init__(self, message, field=None, status=400):
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


def json_object():
    """The request body as a dict, or BadRequest naming what is wrong with it."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json":
        raise BadRequest(f"Content-Type must be application/json, not {mimetype or 'missing'}",
                         status=415)
    raw = request.get_data(cache=True)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(body).__name__}")
    return body


def text_field(body, name, max_length=255):
    """A required, non-empty string field of at most `max_length` characters."""
    if name not in body or body[name] is None:
        raise BadRequest(f"{name} is required", name)
    value = body[name]
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, not {json_type(value)}", name)
    if not value.strip():
        raise BadRequest(f"{name} must not be empty", name)
    if len(value) > max_length:
        raise BadRequest(f"{name} must be at most {max_length} characters, got {len(value)}", name)
    if "\x00" in value:
        raise BadRequest(f"{name} must not contain NUL characters", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} must be valid Unicode text (no lone surrogates)", name) from None
    return value


SAGA_ID = re.compile(r"[A-Za-z0-9_-]{1,36}")


def saga_id_field(body):
    value = text_field(body, "saga_id", 36)
    if not SAGA_ID.fullmatch(value):
        raise BadRequest("saga_id must be 1 to 36 letters, digits, '-' or '_'", "saga_id")
    return value


def int_field(body, name):
    value = body.get(name)
    if value is None:
        raise BadRequest(f"{name} is required", name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, not {json_type(value)}", name)
    if not 0 < value < 2 ** 31:
        raise BadRequest(f"{name} must be a positive 32-bit integer", name)
    return value


def reject_unknown_fields(body, allowed):
    for name in body:
        if name not in allowed:
            raise BadRequest(f"unknown field {name!r}; expected {', '.join(sorted(allowed))}", name)


def json_type(value):
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}[type(value)]


def token_ok(settings):
    """True when no token is configured or the request carries the right one."""
    if not settings.api_token:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), settings.api_token.encode())


def install_error_handlers(app):
    """Every error leaves as JSON; database outages are 503 so callers retry."""

    @app.errorhandler(BadRequest)
    def _bad_request(exc):
        return error(exc.status, exc.message, exc.field)

    @app.errorhandler(HTTPException)
    def _http(exc):
        if exc.code == 413:
            return error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
        resp, code = error(exc.code, exc.description or exc.name)
        for name, value in exc.get_headers():  # e.g. Allow on a 405
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp, code

    @app.errorhandler(mysql.connector.Error)
    def _database(exc):
        if is_unavailable(exc):
            log.warning("database unavailable: %s", exc)
            return error(503, "database unavailable, try again", detail=str(exc.msg or exc))
        log.exception("database error")
        return error(500, "internal database error")

    @app.errorhandler(Exception)
    def _unexpected(exc):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error(500, "internal error")


# --- fault injection ------------------------------------------------------------------

FAULT_MODES = ("off", "fail", "reject", "drop", "crash", "hang", "slow")
FAULT_TARGETS = ("invoke", "compensate", "both")
SEED_FAULTS = {"A": {"mode": "fail", "every": 2}, "B": {"mode": "crash", "every": 2}}


def parse_fault(body):
    """Validate a fault setting; returns the normalized dict or raises BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("fault setting must be a JSON object")
    reject_unknown_fields(body, {"mode", "every", "rate", "next", "seconds", "on"})
    mode = body.get("mode", "off")
    if mode not in FAULT_MODES:
        raise BadRequest(f"mode must be one of {', '.join(FAULT_MODES)}", "mode")
    on = body.get("on", "invoke")
    if on not in FAULT_TARGETS:
        raise BadRequest(f"on must be one of {', '.join(FAULT_TARGETS)}", "on")
    triggers = [k for k in ("every", "rate", "next") if body.get(k) is not None]
    if len(triggers) > 1:
        raise BadRequest("give at most one of every, rate, next", triggers[1])
    fault = {"mode": mode, "on": on}
    if "rate" in triggers:
        rate = body["rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise BadRequest("rate must be a number from 0 to 1", "rate")
        fault["rate"] = float(rate)
    elif "next" in triggers:
        fault["next"] = _positive_int(body, "next", allow_zero=True)
    else:
        fault["every"] = _positive_int(body, "every") if "every" in triggers else 1
    seconds = body.get("seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 300:
            raise BadRequest("seconds must be a number from 0 to 300", "seconds")
        fault["seconds"] = float(seconds)
    return fault


def _positive_int(body, name, allow_zero=False):
    value = body[name]
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1_000_000:
        raise BadRequest(f"{name} must be an integer from {low} to 1000000", name)
    return value


class FaultStore:
    """The fault setting and its call counter, in memory shared by a server's master and
    its workers: a worker that crashes on purpose is replaced by one that keeps counting
    (so 'every 2nd call' stays true) and keeps what was set at run time."""

    SIZE = 4096

    def __init__(self, initial):
        self._lock = multiprocessing.Lock()
        self._mem = mmap.mmap(-1, self.SIZE)
        self._write({"fault": initial, "calls": 0})

    def _read(self):
        length = int.from_bytes(self._mem[:4], "big")
        return json.loads(self._mem[4:4 + length])

    def _write(self, state):
        data = json.dumps(state).encode()
        self._mem[:4 + len(data)] = len(data).to_bytes(4, "big") + data

    def get(self):
        with self._lock:
            return self._read()

    def set(self, fault):
        with self._lock:
            self._write({"fault": fault, "calls": 0})

    def next_fault(self, action):
        """Count this call and return the fault mode to apply to it ('off' for none)."""
        with self._lock:
            state = self._read()
            fault = state["fault"]
            if fault["mode"] == "off" or fault["on"] not in (action, "both"):
                return "off", fault
            state["calls"] += 1
            if "rate" in fault:
                hit = random.random() < fault["rate"]
            elif "next" in fault:
                hit = fault["next"] > 0
                if hit:
                    fault["next"] -= 1
            else:
                hit = state["calls"] % fault["every"] == 0
            self._write(state)
            return (fault["mode"] if hit else "off"), fault


def initial_fault(settings, service):
    if settings.faults == "seed" and service in SEED_FAULTS:
        return parse_fault(SEED_FAULTS[service])
    return parse_fault({"mode": "off"})


# --- serving ----------------------------------------------------------------------------

def serve(app_factory, port, settings, name, preload=False):
    """Run an app under gunicorn: a production server whose master replaces a worker
    that dies (the 'crash after commit' fault) while the listening socket stays open.
    With `preload` the app is built once in the master, so a replacement worker is a
    fork, ready at once; only for apps that start no threads and open no connections
    when built."""
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"127.0.0.1:{port}")
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("workers", settings.web_workers)
            self.cfg.set("threads", settings.web_threads)
            self.cfg.set("keepalive", 30)
            self.cfg.set("graceful_timeout", 3)
            self.cfg.set("timeout", 60)
            self.cfg.set("proc_name", name)
            self.cfg.set("control_socket_disable", True)  # one shared default path
            self.cfg.set("preload_app", preload)
            self.cfg.set("errorlog", "-")
            self.cfg.set("loglevel", "info")

        def load(self):
            return app_factory()

    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")
    logging.getLogger("mysql.connector").setLevel(logging.WARNING)
    Server().run()
