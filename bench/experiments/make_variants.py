"""Build copies of the project with the performance changes measured for issue 7, one on
top of the other, OUTSIDE the repo, so bench.py can run them side by side:

    git archive HEAD | (mkdir -p /tmp/exp/v0 && tar -x -C /tmp/exp/v0)
    .venv/bin/python bench/experiments/make_variants.py /tmp/exp/v0 /tmp/exp
    .venv/bin/python bench.py --with-naive --faults off --concurrency 8 --repeat 3 \
        --variant 'v0;dir=/tmp/exp/v0' --variant 'v1;dir=/tmp/exp/v1' ... --variant 'v5;dir=/tmp/exp/v5'

  v1  own connection pool: mysql-connector's pool pings each checkout while holding a
      lock global to the process, and conn.cursor() pings again; here one ping per
      checkout without the lock (none with BENCH_IDLE_PING=1 if used in the last
      second) and one kept buffered cursor per connection: 7 pings less per saga (14)
  v2  + the C extension of mysql-connector (import _mysql_connector before anything
      loads the system's OpenSSL, which is older than the one the extension bundles)
  v3  + the orchestrator's service calls over kept-alive http.client connections instead
      of requests (requests spends more CPU than the rest of the call)
  v4  + /start drives the saga on its own request thread (no hop to a driver thread and
      back) and SAGA_LOG rows go in one multi-row INSERT instead of executemany
  v5  + services preload their app in gunicorn's master, so a worker that crashes (the
      seed's B) is replaced by a fork, not a fresh import

Each step replaces exact text of the code it was written against and stops with an
error if that text has changed, rather than guess.
"""

import os
import shutil
import sys


def replace(path, old, new, count=1):
    with open(path) as f:
        text = f.read()
    if text.count(old) < 1:
        sys.exit(f"{path}: expected text not found (the code changed?):\n{old[:300]}")
    text = text.replace(old, new, count)
    with open(path, "w") as f:
        f.write(text)


def between(path, start, end, new):
    """Replace text[start: end) (end exclusive) with new."""
    with open(path) as f:
        text = f.read()
    i = text.find(start)
    j = text.find(end, i + 1)
    if i < 0 or j < 0:
        sys.exit(f"{path}: markers not found: {start[:60]!r} .. {end[:60]!r}")
    with open(path, "w") as f:
        f.write(text[:i] + new + text[j:])


# --- v1: pool without pings -------------------------------------------------------------------

POOL = '''class Database:
    """A pool of connections. Not mysql-connector's pool: it pings each connection as
    it hands it out while holding a lock global to the process, so every checkout costs
    a round trip and checkouts queue behind each other. Here a connection used in the
    last second is handed out as is, an idle one is pinged (and replaced if dead) first,
    and one that failed mid-use is closed, not reused. The semaphore makes a busy pool
    wait instead of raising."""

    # Ping a pooled connection before use when it has been idle this long (seconds).
    # 0 pings every checkout (a killed or restarted server then costs no failed request,
    # as tests/test_recovery.py demands); BENCH_IDLE_PING=1 measures skipping it.
    IDLE_PING = float(os.environ.get("BENCH_IDLE_PING", "0"))

    def __init__(self, settings):
        self._settings = settings
        self._slots = threading.BoundedSemaphore(settings.db_pool_size)
        self._idle = []                      # (connection, cursor, last used), LIFO
        self._lock = threading.Lock()

    def _connect(self):
        s = self._settings
        conn = mysql.connector.connect(
            host=s.db_host, port=s.db_port, user=s.db_user,
            password=s.db_password, database=s.db_name,
            charset="utf8mb4", collation="utf8mb4_unicode_ci",
            autocommit=False, connection_timeout=5,
            # UPDATE's rowcount counts matched rows, which the fencing check needs.
            client_flags=[ClientFlag.FOUND_ROWS])
        # conn.cursor() pings the server each time: make one cursor and keep it.
        return conn, conn.cursor(buffered=True)

    def _checkout(self):
        with self._lock:
            item = self._idle.pop() if self._idle else None
        if item is None:
            return self._connect()
        conn, cur, used = item
        if time.monotonic() - used >= self.IDLE_PING:
            try:
                conn.ping(reconnect=False)
            except mysql.connector.Error:
                _close_quietly(conn)
                return self._connect()
        return conn, cur

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
                healthy = not (isinstance(exc, mysql.connector.Error) and is_unavailable(exc))
                raise
            finally:
                if healthy:
                    with self._lock:
                        self._idle.append((conn, cur, time.monotonic()))
                else:
                    # The server went away or restarted: the idle connections are most
                    # likely dead too, so drop them all rather than fail on each in turn.
                    with self._lock:
                        dead, self._idle = self._idle, []
                    for other, _, _ in dead + [(conn, None, None)]:
                        _close_quietly(other)
        finally:
            self._slots.release()

    @contextmanager
    def connection(self):
        with self._checked_out() as (conn, _):
            yield conn

    @contextmanager
    def transaction(self):
        with self._checked_out() as (conn, cur):
            try:
                yield cur
                _commit(conn)
            except BaseException:
                try:
                    conn.rollback()
                except Exception:  # the C extension raises its own, unwrapped, errors here
                    pass
                raise

'''

CLOSE = '''

def _commit(conn):
    """conn.commit(), with the C extension's raw MySQLInterfaceError (it does not wrap the
    errors of commit and rollback) turned into the connector's OperationalError, so a
    lost connection is 'unavailable' (503, retried) and not a bug (500)."""
    try:
        conn.commit()
    except mysql.connector.Error:
        raise
    except Exception as exc:
        if type(exc).__module__ != "_mysql_connector":
            raise
        raise mysql.connector.errors.OperationalError(msg=str(exc)) from exc


def _close_quietly(conn):
    try:
        conn.close()
    except Exception:
        pass


class Database:'''


def v1(d):
    between(f"{d}/common.py", "class Database:", "    def ping(self):", POOL)
    replace(f"{d}/common.py", "\n\nclass Database:", CLOSE)


# --- v2: C extension -------------------------------------------------------------------------

CEXT = '''# Load mysql-connector's C extension before anything else loads OpenSSL: it links the
# newer OpenSSL it bundles, which cannot load once hashlib or ssl has loaded the
# system's (then mysql.connector silently falls back to pure Python).
try:
    import _mysql_connector  # noqa: F401
except ImportError:
    pass

'''


def v2(d):
    for name in ("common.py", "orchestrator.py"):
        path = f"{d}/{name}"
        with open(path) as f:
            text = f.read()
        # after the module docstring
        end = text.index('"""', 3) + 3
        with open(path, "w") as f:
            f.write(text[:end] + "\n\n" + CEXT.rstrip("\n") + text[end:])


# --- v3: kept-alive http.client for service calls -------------------------------------------

CLIENT = '''class CallTimeout(Exception):
    def __init__(self, kind):
        super().__init__(f"{kind} timeout")
        self.kind = kind


class ServiceClient:
    """POSTs JSON over one kept-alive http.client connection per thread and service.
    requests costs more CPU per call than everything else the call does (environment
    and netrc lookups, hooks, cookie jars, header merging), three times a saga."""

    def __init__(self, settings):
        self.settings = settings
        self.headers = {"Content-Type": "application/json"}
        if settings.api_token:
            self.headers["Authorization"] = f"Bearer {settings.api_token}"
        self.local = threading.local()

    def post(self, url, body):
        """(status, reason, body bytes); raises CallTimeout, OSError or HTTPException.
        Never sends twice: a lost answer must show as a failed attempt."""
        parts = urllib.parse.urlsplit(url)
        data = json.dumps(body).encode()
        conns = self.local.__dict__.setdefault("conns", {})
        conn = conns.get(parts.netloc)
        if conn is not None and conn.sock is not None and _dropped(conn.sock):
            conn.close()  # the service closed it while idle (its keep-alive ran out)
        if conn is None:
            conn = conns[parts.netloc] = http.client.HTTPConnection(
                parts.netloc, timeout=self.settings.connect_timeout)
        try:
            if conn.sock is None:
                try:
                    conn.connect()
                except TimeoutError:
                    raise CallTimeout("connect") from None
            conn.sock.settimeout(self.settings.read_timeout)
            conn.request("POST", parts.path, body=data, headers=self.headers)
            resp = conn.getresponse()
            raw = resp.read()
        except TimeoutError:
            conns.pop(parts.netloc).close()
            raise CallTimeout("read") from None
        except BaseException:
            conns.pop(parts.netloc).close()
            raise
        if resp.will_close:
            conns.pop(parts.netloc).close()
        return resp.status, resp.reason, raw


def _dropped(sock):
    """An idle kept-alive socket that is readable has been closed by the other end."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


# --- the engine'''

CALL = '''    def _call(self, step, action, body):
        started = time.monotonic()
        try:
            status, reason, raw = self.calls.post(f"{step.url}/{action}", body)
        except CallTimeout as exc:
            return self._outcome(started, None, False, True, str(exc))
        except (OSError, http.client.HTTPException) as exc:
            return self._outcome(started, None, False, True, f"connection failed: {short(exc)}")
        resp = types.SimpleNamespace(status_code=status, reason=reason,
                                     json=lambda: json.loads(raw))
'''


def v3(d):
    p = f"{d}/saga.py"
    replace(p, "import json\n", "import http.client\nimport json\nimport select\nimport types\n"
            "import urllib.parse\n")
    replace(p, "# --- the engine", CLIENT)
    replace(p, "        self.executor = ThreadPoolExecutor(",
            "        self.calls = ServiceClient(settings)\n        self.executor = ThreadPoolExecutor(")
    between(p, "    def _call(self, step, action, body):", "        try:\n            payload = resp.json()", CALL)


# --- v4: drive on the request thread, one INSERT for the log rows ------------------------------

INSERT_LOG = '''def insert_log(cur, rows):
    """SAGA_LOG rows in one multi-row INSERT: executemany parses the statement with
    regular expressions on every call."""
    values = LOG_INSERT[LOG_INSERT.index("VALUES") + len("VALUES "):]
    cur.execute(LOG_INSERT + (", " + values) * (len(rows) - 1),
                [v for row in rows for v in row])


def saga_from_row(row):'''

RUN_HERE = '''    def run_here(self, saga, wait):
        """Drive a new saga on the calling (request) thread for up to `wait` seconds, then
        hand the rest to a driver thread. Returns (saga as it stands, handed_off)."""
        with self._active_lock:
            self._active[saga.id] += 1
        state = {}
        saga = self._drive(saga, False, deadline=time.monotonic() + wait, state=state)
        return saga, state.get("handed_off", False)

    def _drive(self, saga, resumed, deadline=None, state=None):
        handed_off = False
        try:'''


def v4(d):
    p = f"{d}/saga.py"
    replace(p, "def saga_from_row(row):", INSERT_LOG)
    replace(p, "                cur.executemany(LOG_INSERT, log_rows)",
            "                insert_log(cur, log_rows)")
    replace(p, "            cur.executemany(LOG_INSERT, events)", "            insert_log(cur, events)")
    replace(p, "    def _drive(self, saga, resumed):\n        try:", RUN_HERE)
    replace(p, '''            while saga.status in ACTIVE:
                if saga.wait > 0:''', '''            while saga.status in ACTIVE:
                if deadline is not None and time.monotonic() + saga.wait > deadline:
                    answer = copy.copy(saga)
                    handed_off = state["handed_off"] = True
                    self.executor.submit(self._drive, saga, False)
                    return answer
                if saga.wait > 0:''')
    replace(p, '''        finally:
            with self._active_lock:
                self._active[saga.id] -= 1
                if self._active[saga.id] <= 0:
                    del self._active[saga.id]
        return saga''', '''        finally:
            if not handed_off:  # else the driver thread that took over holds the count
                with self._active_lock:
                    self._active[saga.id] -= 1
                    if self._active[saga.id] <= 0:
                        del self._active[saga.id]
        return saga''')
    replace(p, "import json\n", "import copy\nimport json\n")
    o = f"{d}/orchestrator.py"
    replace(o, '''        saga = engine.store.create(str(uuid.uuid4()), data)
        saga = wait_for_outcome(engine.submit(saga), saga)''', '''        saga = engine.store.create(str(uuid.uuid4()), data)
        saga, handed_off = engine.run_here(saga, settings.start_wait)
        if not handed_off and saga.status in ACTIVE:
            # The driver stopped early (taken over, database gone): ask the database.
            try:
                saga = engine.store.load(saga.id) or saga
            except mysql.connector.Error:
                pass''')


def v5(d):
    replace(f"{d}/common.py", '''            self.cfg.set("proc_name", name)''', '''            self.cfg.set("proc_name", name)
            # A service has no background threads: load it once in the master, so a
            # worker that dies (the crash fault) is replaced by a fork in milliseconds
            # instead of a fresh import of Flask and mysql-connector.
            self.cfg.set("preload_app", name != "orchestrator")''')


STEPS = (v1, v2, v3, v4, v5)


def main():
    src, out = sys.argv[1], sys.argv[2]
    prev = src
    for i, step in enumerate(STEPS, 1):
        d = os.path.join(out, f"v{i}")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(prev, d, ignore=shutil.ignore_patterns("__pycache__", ".venv", ".git"))
        step(d)
        print(f"{d}: {step.__name__} applied")
        prev = d


if __name__ == "__main__":
    main()
