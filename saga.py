"""The saga engine: its states and transitions, the persisted state, the driver that runs
steps forward and compensations in reverse, and the leases that let any orchestrator
resume what a dead one left."""

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import mysql.connector
import urllib3

from common import backoff_delay

log = logging.getLogger("saga")

RUNNING, COMPLETED = "RUNNING", "COMPLETED"
COMPENSATING, COMPENSATED, FAILED = "COMPENSATING", "COMPENSATED", "FAILED"
STATES = (RUNNING, COMPLETED, COMPENSATING, COMPENSATED, FAILED)
ACTIVE = (RUNNING, COMPENSATING)

# Every write of a saga's status goes through SagaStore.save, which allows only these.
# COMPLETED -> COMPENSATING and FAILED -> COMPENSATING are operator actions.
TRANSITIONS = {
    RUNNING: {RUNNING, COMPLETED, COMPENSATING},
    COMPENSATING: {COMPENSATING, COMPENSATED, FAILED},
    COMPLETED: {COMPENSATING},
    FAILED: {COMPENSATING},
    COMPENSATED: set(),
}


@dataclass(frozen=True)
class Step:
    service: str
    url: str
    # Builds the /invoke body from the saga's input and the earlier steps' results.
    build_request: Callable[[dict, dict], dict]


@dataclass
class Saga:
    id: str
    status: str
    step: int
    attempt: int
    input: dict
    fence: int
    results: dict = field(default_factory=dict)
    failed_step: str | None = None
    reason: str | None = None
    rejected: bool = False
    wait: float = 0.0                 # seconds until the next call is due
    compensate_deadline: float | None = None  # time.monotonic() when compensation gives up
    saved_status: str | None = None   # the status the database holds


class LostLease(Exception):
    """Another orchestrator has taken this saga (its fence moved on): stop driving it."""


class IllegalTransition(Exception):
    pass


@dataclass(frozen=True)
class Outcome:
    ok: bool
    retryable: bool
    http_status: int | None
    elapsed_ms: int
    message: str
    body: dict | None = None


# --- persisted state ------------------------------------------------------------------------

SAGA_COLUMNS = ("id, status, step, attempt, username, address, payment, results, failed_step, "
                "reason, rejected, fence, "
                "GREATEST(0, TIMESTAMPDIFF(MICROSECOND, NOW(3), next_attempt_at)), "
                "TIMESTAMPDIFF(MICROSECOND, NOW(3), compensate_until)")

LOG_INSERT = ("INSERT INTO SAGA_LOG (saga_id, service, status, message, step, action, attempt, "
              "http_status, elapsed_ms) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)")


def saga_from_row(row):
    (sid, status, step, attempt, username, address, payment, results, failed_step, reason,
     rejected, fence, wait_us, left_us) = row
    return Saga(id=sid, status=status, step=step, attempt=attempt,
                input={"username": username, "address": address, "payment": payment},
                fence=fence, results=json.loads(results), failed_step=failed_step,
                reason=reason, rejected=bool(rejected), wait=wait_us / 1e6,
                compensate_deadline=None if left_us is None else time.monotonic() + left_us / 1e6,
                saved_status=status)


def saga_event(saga, status, message):
    """A SAGA_LOG row for the saga's own transitions (service 'SAGA')."""
    return (saga.id, "SAGA", status, message, None, None, None, None, None)


class SagaStore:
    """All SQL on the SAGA table. Every write is fenced: it only lands while the row's
    fence is the one this orchestrator claimed, so a paused owner that wakes up late
    cannot overwrite the progress of the orchestrator that took over."""

    def __init__(self, db, settings, owner):
        self.db, self.settings, self.owner = db, settings, owner

    def _lease_us(self):
        return int(self.settings.lease_seconds * 1e6)

    def create(self, saga_id, data):
        saga = Saga(id=saga_id, status=RUNNING, step=0, attempt=1, input=dict(data), fence=1,
                    saved_status=RUNNING)
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO SAGA (id, status, step, attempt, username, address, payment, "
                "results, lease_owner, lease_until, fence) VALUES (%s, 'RUNNING', 0, 1, "
                "%s, %s, %s, '{}', %s, NOW(3) + INTERVAL %s MICROSECOND, 1)",
                (saga_id, data["username"], data["address"], data["payment"],
                 self.owner, self._lease_us()))
            cur.execute(LOG_INSERT, saga_event(saga, "STARTED", "saga started"))
        return saga

    def save(self, saga, log_rows, delay=0.0, new_compensation=False):
        """Persist the saga's next state and its log rows in one transaction."""
        if saga.status not in TRANSITIONS[saga.saved_status]:
            raise IllegalTransition(f"{saga.id}: {saga.saved_status} -> {saga.status}")
        done = saga.status not in ACTIVE
        with self.db.transaction() as cur:
            cur.execute(
                "UPDATE SAGA SET status = %s, step = %s, attempt = %s, results = %s, "
                "failed_step = %s, reason = %s, rejected = %s, "
                "next_attempt_at = NOW(3) + INTERVAL %s MICROSECOND, "
                "compensate_until = IF(%s, NOW(3) + INTERVAL %s MICROSECOND, compensate_until), "
                "lease_owner = IF(%s, NULL, lease_owner), "
                "lease_until = IF(%s, NOW(3), NOW(3) + INTERVAL %s MICROSECOND) "
                "WHERE id = %s AND fence = %s",
                (saga.status, saga.step, saga.attempt, json.dumps(saga.results),
                 saga.failed_step, (saga.reason or "")[:1000] or None, saga.rejected,
                 int(delay * 1e6), new_compensation, int(self.settings.compensate_for * 1e6),
                 done, done, self._lease_us(), saga.id, saga.fence))
            if cur.rowcount != 1:
                raise LostLease(saga.id)
            if log_rows:
                cur.executemany(LOG_INSERT, log_rows)
        saga.saved_status = saga.status

    def load(self, saga_id):
        with self.db.transaction() as cur:
            cur.execute(f"SELECT {SAGA_COLUMNS} FROM SAGA WHERE id = %s", (saga_id,))
            row = cur.fetchone()
        return saga_from_row(row) if row else None

    def claim_expired(self, limit, busy=()):
        """Take unfinished sagas whose owner stopped renewing its lease (but not `busy`
        ones, which this process is still driving). SKIP LOCKED lets several
        orchestrators scan at once without waiting on or double-taking a row; READ
        COMMITTED takes no gap locks, which would deadlock with /start's inserts."""
        if limit <= 0:
            return []
        skip = "".join(" AND id <> %s" for _ in busy)
        with self.db.transaction(read_committed=True) as cur:
            cur.execute(
                "SELECT id FROM SAGA WHERE status IN ('RUNNING', 'COMPENSATING') "
                f"AND lease_until < NOW(3){skip} ORDER BY lease_until LIMIT %s "
                "FOR UPDATE SKIP LOCKED", (*busy, limit))
            ids = [row[0] for row in cur.fetchall()]
            if not ids:
                return []
            return self._take(cur, ids)

    def _take(self, cur, ids):
        marks = ", ".join(["%s"] * len(ids))
        cur.execute(f"UPDATE SAGA SET fence = fence + 1, lease_owner = %s, "
                    f"lease_until = NOW(3) + INTERVAL %s MICROSECOND WHERE id IN ({marks})",
                    (self.owner, self._lease_us(), *ids))
        cur.execute(f"SELECT {SAGA_COLUMNS} FROM SAGA WHERE id IN ({marks})", ids)
        return [saga_from_row(row) for row in cur.fetchall()]

    def renew(self, ids):
        if not ids:
            return
        marks = ", ".join(["%s"] * len(ids))
        with self.db.transaction() as cur:
            cur.execute(f"UPDATE SAGA SET lease_until = NOW(3) + INTERVAL %s MICROSECOND "
                        f"WHERE lease_owner = %s AND status IN ('RUNNING', 'COMPENSATING') "
                        f"AND id IN ({marks})", (self._lease_us(), self.owner, *ids))

    def take_for_operator(self, saga_id, decide):
        """Lock one saga, let `decide(saga, lease_live)` change it (or raise), and take
        ownership of it with a new fence. Returns (saga, taken); saga is None if unknown."""
        with self.db.transaction() as cur:
            cur.execute(f"SELECT {SAGA_COLUMNS}, lease_until > NOW(3) FROM SAGA "
                        "WHERE id = %s FOR UPDATE", (saga_id,))
            row = cur.fetchone()
            if row is None:
                return None, False
            saga, lease_live = saga_from_row(row[:-1]), bool(row[-1])
            events = decide(saga, lease_live)
            if not events:
                return saga, False
            if saga.status not in TRANSITIONS[saga.saved_status] | {saga.saved_status}:
                raise IllegalTransition(f"{saga.id}: {saga.saved_status} -> {saga.status}")
            cur.execute(
                "UPDATE SAGA SET status = %s, step = %s, attempt = %s, reason = %s, "
                "next_attempt_at = NOW(3), fence = fence + 1, lease_owner = %s, "
                "lease_until = NOW(3) + INTERVAL %s MICROSECOND, "
                "compensate_until = IF(%s = 'COMPENSATING', "
                "NOW(3) + INTERVAL %s MICROSECOND, compensate_until) WHERE id = %s",
                (saga.status, saga.step, saga.attempt, saga.reason, self.owner,
                 self._lease_us(), saga.status, int(self.settings.compensate_for * 1e6),
                 saga.id))
            cur.executemany(LOG_INSERT, events)
            saga.fence += 1
            saga.saved_status = saga.status
            saga.wait = 0.0
            if saga.status == COMPENSATING:
                saga.compensate_deadline = time.monotonic() + self.settings.compensate_for
            return saga, True


# --- the engine --------------------------------------------------------------------------------

class Engine:
    """Drives sagas: one thread per saga at a time, leases renewed while it works, and
    a recovery loop that claims the sagas nobody is driving."""

    def __init__(self, settings, db, steps):
        self.settings, self.db, self.steps = settings, db, tuple(steps)
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.store = SagaStore(db, settings, self.owner)
        self.http = ServiceClient(settings, maxsize=settings.drivers + 4)
        self.executor = ThreadPoolExecutor(settings.drivers, thread_name_prefix="saga")
        # Saga id -> drivers holding it here. A count, not a set: an operator action can
        # start a new driver while the one it fenced off is still winding down.
        self._active = Counter()
        self._active_lock = threading.Lock()
        self._stop = threading.Event()

    # -- running sagas

    def submit(self, saga, resumed=False):
        """Drive `saga` on a driver thread; the future gives the saga when it stops."""
        with self._active_lock:
            self._active[saga.id] += 1
        return self.executor.submit(self._drive, saga, resumed)

    def drive_until(self, saga, seconds):
        """Drive `saga` on the calling thread (a /start request needs no hop to another
        thread) for up to `seconds`, then hand what is left to a driver thread."""
        with self._active_lock:
            self._active[saga.id] += 1
        return self._drive(saga, False, time.monotonic() + seconds)

    def active_count(self):
        with self._active_lock:
            return len(self._active)

    def _drive(self, saga, resumed, deadline=None):
        try:
            if resumed:
                self._resume(saga)
            while saga.status in ACTIVE:
                if deadline is not None and time.monotonic() + saga.wait >= deadline:
                    self.submit(saga)  # the lease stays ours: carry on in the background
                    break
                if saga.wait > 0:
                    time.sleep(saga.wait)
                if saga.status == RUNNING:
                    self._invoke_step(saga)
                else:
                    self._compensate_step(saga)
        except LostLease:
            log.info("saga %s: taken over by another orchestrator; stopping here", saga.id)
        except mysql.connector.Error as exc:
            # The lease lapses without renewal and recovery resumes from the last state.
            log.warning("saga %s: database error, leaving it to recovery: %s", saga.id, exc)
        except Exception:
            log.exception("saga %s: unexpected error, leaving it to recovery", saga.id)
        finally:
            with self._active_lock:
                self._active[saga.id] -= 1
                if self._active[saga.id] <= 0:
                    del self._active[saga.id]
        return saga

    def _invoke_step(self, saga):
        step = self.steps[saga.step]
        body = {"saga_id": saga.id, **step.build_request(saga.input, saga.results)}
        outcome = self._call(step, "invoke", body)
        row = self._log_row(saga, step, "invoke", outcome)
        if not outcome.ok:
            return self._after_failure(saga, outcome, [row])
        saga.results[step.service] = {k: v for k, v in outcome.body.items()
                                      if k not in ("status", "saga_id")}
        rows = [row]
        if saga.step + 1 == len(self.steps):
            saga.status = COMPLETED
            rows.append(saga_event(saga, COMPLETED, "all steps committed"))
        else:
            saga.step, saga.attempt = saga.step + 1, 1
        saga.wait = 0.0
        self.store.save(saga, rows)

    def _compensate_step(self, saga):
        step = self.steps[saga.step]
        outcome = self._call(step, "compensate", {"saga_id": saga.id})
        row = self._log_row(saga, step, "compensate", outcome)
        if not outcome.ok:
            return self._after_failure(saga, outcome, [row])
        rows = [row]
        if saga.step == 0:
            saga.status = COMPENSATED
            rows.append(saga_event(saga, COMPENSATED, "every step undone"))
        else:
            saga.step, saga.attempt = saga.step - 1, 1
        saga.wait = 0.0
        self.store.save(saga, rows)

    def _after_failure(self, saga, outcome, rows, check_deadline=True):
        """Retry what may succeed; otherwise undo from this step (its outcome may be
        unknown) back to the first; a compensation past its time budget is FAILED."""
        step = self.steps[saga.step]
        if saga.status == RUNNING:
            if outcome.retryable and saga.attempt < self.settings.max_attempts:
                return self._retry_later(saga, rows)
            saga.status, saga.attempt = COMPENSATING, 1
            saga.failed_step, saga.rejected = step.service, not outcome.retryable
            saga.reason = f"{step.service} {'rejected' if saga.rejected else 'failed'}: {outcome.message}"
            saga.compensate_deadline = time.monotonic() + self.settings.compensate_for
            saga.wait = 0.0
            rows.append(saga_event(saga, COMPENSATING, f"undoing from {step.service}: {saga.reason}"))
            return self.store.save(saga, rows, new_compensation=True)
        if check_deadline and time.monotonic() >= (saga.compensate_deadline or 0):
            saga.status = FAILED
            saga.reason = f"compensation of {step.service} kept failing: {outcome.message}"
            rows.append(saga_event(saga, FAILED, f"{saga.reason}; needs an operator"))
            return self.store.save(saga, rows)
        return self._retry_later(saga, rows)

    def _retry_later(self, saga, rows):
        delay = backoff_delay(self.settings, saga.attempt)
        saga.attempt += 1
        saga.wait = delay
        self.store.save(saga, rows, delay=delay)

    def _resume(self, saga):
        """Carry on with a saga claimed from an owner that stopped renewing its lease."""
        step = self.steps[saga.step]
        if saga.wait > 0:
            # The next call is scheduled for later, so it has not been made yet.
            note = (f"resumed by {self.owner}; {step.service} attempt {saga.attempt} "
                    "not yet made")
            return self.store.save(saga, [saga_event(saga, "RESUMED", note)], delay=saga.wait)
        self._after_unknown(saga, step)

    def _after_unknown(self, saga, step):
        """The call the saga was about to make may or may not have been made: count it
        as made, with an unknown outcome, so a crash never resets a retry budget."""
        action = "invoke" if saga.status == RUNNING else "compensate"
        outcome = Outcome(ok=False, retryable=True, http_status=None, elapsed_ms=0,
                          message=f"outcome unknown: resumed by {self.owner}")
        rows = [self._log_row(saga, step, action, outcome, status="unknown")]
        # A compensation resumed past its budget still gets one more try before FAILED.
        self._after_failure(saga, outcome, rows, check_deadline=False)

    def _call(self, step, action, body):
        started = time.monotonic()
        try:
            status, payload, reason = self.http.call("POST", f"{step.url}/{action}", body)
        except urllib3.exceptions.ConnectTimeoutError:
            return self._outcome(started, None, False, True, "connect timeout")
        except urllib3.exceptions.ReadTimeoutError:
            return self._outcome(started, None, False, True,
                                 f"read timeout after {self.settings.read_timeout:g} s")
        except urllib3.exceptions.HTTPError as exc:
            return self._outcome(started, None, False, True, f"connection failed: {short(exc)}")
        detail = payload.get("error") if isinstance(payload, dict) else None
        if status >= 500 or status in (408, 429):
            return self._outcome(started, status, False, True, f"HTTP {status}: {detail or reason}")
        if status >= 400:
            return self._outcome(started, status, False, False, f"HTTP {status}: {detail or reason}")
        if not isinstance(payload, dict):
            return self._outcome(started, status, False, True, "answer was not a JSON object")
        return self._outcome(started, status, True, False, describe(action, payload), payload)

    @staticmethod
    def _outcome(started, http_status, ok, retryable, message, body=None):
        elapsed = int((time.monotonic() - started) * 1000)
        return Outcome(ok, retryable, http_status, elapsed, message, body)

    def _log_row(self, saga, step, action, outcome, status=None):
        if status is None:
            status = "success" if outcome.ok else ("failed" if outcome.retryable else "rejected")
        return (saga.id, step.service, status, outcome.message, saga.step + 1, action,
                saga.attempt, outcome.http_status, outcome.elapsed_ms)

    # -- leases and recovery

    def start_background(self):
        for target, name in ((self._recovery_loop, "recovery"), (self._heartbeat_loop, "lease")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self):
        self._stop.set()

    def _heartbeat_loop(self):
        while not self._stop.wait(self.settings.lease_seconds / 4):
            with self._active_lock:
                ids = list(self._active)
            try:
                self.store.renew(ids)
            except mysql.connector.Error as exc:
                log.warning("lease renewal failed: %s", exc)

    def _recovery_loop(self):
        while True:
            try:
                self.recover_once()
            except mysql.connector.Error as exc:
                log.warning("recovery scan failed: %s", exc)
            except Exception:
                log.exception("recovery scan failed")
            if self._stop.wait(self.settings.recovery_interval):
                return

    def recover_once(self):
        with self._active_lock:
            busy = list(self._active)
        sagas = self.store.claim_expired(min(50, self.settings.drivers - len(busy)), busy)
        for saga in sagas:
            log.info("saga %s: resuming %s at step %d attempt %d", saga.id, saga.status,
                     saga.step + 1, saga.attempt)
            self.submit(saga, resumed=True)
        return len(sagas)


class ServiceClient:
    """JSON over HTTP to the services: urllib3's keep-alive connection pools (requests'
    own engine, without its per-call work on proxies, cookies and hooks), no retries of
    its own (retrying is the saga's decision), a connect and a read timeout per call."""

    def __init__(self, settings, maxsize):
        self.pools = urllib3.PoolManager(num_pools=16, maxsize=maxsize, retries=False)
        self.headers = {"Content-Type": "application/json"}
        if settings.api_token:
            self.headers["Authorization"] = f"Bearer {settings.api_token}"
        self.timeout = urllib3.Timeout(connect=settings.connect_timeout,
                                       read=settings.read_timeout)

    def call(self, method, url, body=None, timeout=None):
        """(HTTP status, the JSON answer or None, reason); raises urllib3's HTTPError
        when no answer came (refused, reset, timed out)."""
        resp = self.pools.request(method, url, headers=self.headers, timeout=timeout or self.timeout,
                                  body=None if body is None else json.dumps(body).encode())
        try:
            payload = json.loads(resp.data)
        except ValueError:
            payload = None
        return resp.status, payload, resp.reason


def describe(action, payload):
    if action == "compensate":
        return f"compensated (rows removed: {payload.get('removed', '?')})"
    ids = ", ".join(f"{k}={v}" for k, v in payload.items() if k not in ("status", "saga_id"))
    return f"committed ({ids})" if ids else "committed"


def short(exc):
    text = str(exc)
    return text if len(text) <= 300 else text[:297] + "..."
