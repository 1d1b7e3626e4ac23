"""The engine: drives each saga forward step by step and, on a failure, back through its
compensations in reverse; persists every decision before acting on it; keeps the lease
of every saga it drives alive. A saga whose next call is due later holds no thread: it
waits in a schedule and is driven again when due. Recovery of other orchestrators'
sagas is in saga/recovery.py."""

import dataclasses
import heapq
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

import mysql.connector

from saga import metrics, tracing
from saga.common import Database, Settings, UnsupportedServer, backoff_delay, is_unavailable
from saga.errors import HandOver, LostLease
from saga.logs import SAGA_ID
from saga.model import ACTIVE, Outcome, Saga, SagaType, Status, StepKind
from saga.store import LogEntry, SagaStore, saga_event

log = logging.getLogger("saga")


class Engine:
    """One thread per saga at a time (a pool of `drivers`), leases renewed while it works."""

    def __init__(self, settings: Settings, db: Database, transports: dict):
        self.settings, self.db, self.transports = settings, db, transports
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.store = SagaStore(db, self.owner, settings.lease_seconds, settings.compensate_for)
        self.executor = ThreadPoolExecutor(settings.drivers, thread_name_prefix="saga")
        # Saga id -> drivers holding it here (its lease is renewed while it is here). A
        # count, not a set: an operator action can start a new driver while the one it
        # fenced off is still winding down.
        self._active = Counter()
        self._active_lock = threading.Lock()
        self._submitted = 0                 # sagas on or queued for a driver thread
        # Sagas waiting for their next call: (due, tie-breaker, saga), soonest first.
        self._schedule: list = []
        self._order = itertools.count()
        self._schedule_changed = threading.Condition()
        self.stopping = threading.Event()

    # -- starting and running sagas ----------------------------------------------------

    def create(self, saga_type: SagaType, data: dict, key=None, request_hash=None) -> Saga:
        return self.store.create(saga_type, data, "orchestration", self.settings.transport,
                                 key, request_hash)

    def run(self, saga: Saga, resumed: bool = False, due: bool = False) -> Future:
        """Drive `saga` on a driver thread; the future gives the saga when it stops (or
        waits in the schedule). `due`: it comes back from the schedule."""
        with self._active_lock:
            self._active[saga.id] += 1
        return self._submit(saga, resumed, due)

    def _submit(self, saga: Saga, resumed: bool = False, due: bool = False) -> Future:
        with self._active_lock:
            self._submitted += 1
        future = self.executor.submit(self._drive, saga, resumed, due)
        future.add_done_callback(self._driver_done)
        return future

    def _driver_done(self, future: Future) -> None:
        with self._active_lock:
            self._submitted -= 1

    def free_drivers(self) -> int:
        """Driver threads with nothing to do or queued: what recovery may take on."""
        with self._active_lock:
            return self.settings.drivers - self._submitted

    def drive_for(self, saga: Saga, seconds: float) -> Saga:
        """Drive `saga` on the calling thread, a request waiting for it (no hop to a
        driver thread), for up to `seconds`; then a driver thread carries on with what
        is left. Returns the saga where this thread left it."""
        with self._active_lock:
            self._active[saga.id] += 1
        saga.hand_over_at = time.monotonic() + seconds
        return self._drive(saga, False)

    def active_ids(self) -> list[str]:
        with self._active_lock:
            return list(self._active)

    def _drive(self, saga: Saga, resumed: bool, due: bool = False) -> Saga:
        handed_over = False
        named = SAGA_ID.set(saga.id)   # in this thread's log lines until it lets go
        try:
            if due and not self._take_back(saga):
                return saga
            if saga.unsaved:
                self._persist(saga, *saga.unsaved)
            if resumed:
                self._resume(saga)
            while saga.status in ACTIVE and not self.stopping.is_set():
                if saga.hand_over_at is not None and time.monotonic() >= saga.hand_over_at:
                    raise HandOver(saga.id)
                if saga.wait > 0:
                    # A request's own thread may wait out a delay that ends before its
                    # hand-over; a driver thread never sleeps on a saga.
                    if saga.hand_over_at is None or \
                            time.monotonic() + saga.wait >= saga.hand_over_at:
                        self._park(saga)
                        break
                    if self.stopping.wait(saga.wait):
                        break
                    saga.wait = 0.0
                if saga.status == Status.RUNNING:
                    self._invoke_step(saga)
                else:
                    self._compensate_step(saga)
        except HandOver:
            # The lease stays ours (the saga stays in _active): carry on elsewhere.
            saga.hand_over_at = None
            self._submit(saga)
            handed_over = True
        except LostLease:
            log.info("saga %s: taken over (its fence moved on); stopping here", saga.id)
        except Exception:
            # The lease lapses without renewal and recovery resumes from the saved state.
            log.exception("saga %s: unexpected error, leaving it to recovery", saga.id)
        finally:
            SAGA_ID.reset(named)
            if not handed_over:
                with self._active_lock:
                    self._active[saga.id] -= 1
                    if self._active[saga.id] <= 0:
                        del self._active[saga.id]
        return saga

    # -- waiting ---------------------------------------------------------------------

    def _park(self, saga: Saga) -> None:
        """Put a saga whose next call is due later in the schedule. Its saved lease
        covers the wait (plus a lease period), so no other orchestrator takes it unless
        this one is gone by then; it is not renewed meanwhile."""
        saga.hand_over_at = None
        with self._schedule_changed:
            heapq.heappush(self._schedule,
                           (time.monotonic() + saga.wait, next(self._order), saga))
            self._schedule_changed.notify()

    def _take_back(self, saga: Saga) -> bool:
        """Renew a due saga's lease before driving it. False if another owner took it
        meanwhile, or if the database cannot be reached: the saga then waits a little
        longer in the schedule (its lease still covers it; should the outage outlast
        the lease, a peer takes it over and this one finds it gone)."""
        try:
            if self.store.take_back(saga):
                return True
        except (mysql.connector.Error, UnsupportedServer) as exc:
            if not is_unavailable(exc):
                raise
            log.warning("saga %s: due, but its lease cannot be renewed (%s); trying again "
                        "shortly", saga.id, exc)
            saga.wait = backoff_delay(0.25, 1.0, 1)
            self._park(saga)
            return False
        log.info("saga %s: taken over while it waited; dropped here", saga.id)
        return False

    def waiting_count(self) -> int:
        with self._schedule_changed:
            return len(self._schedule)

    def start_schedule(self) -> None:
        threading.Thread(target=self._schedule_loop, name="schedule", daemon=True).start()

    def _schedule_loop(self) -> None:
        """Hand each waiting saga to a driver thread when its next call is due."""
        while not self.stopping.is_set():
            with self._schedule_changed:
                now = time.monotonic()
                if not self._schedule or self._schedule[0][0] > now:
                    timeout = self._schedule[0][0] - now if self._schedule else 1.0
                    self._schedule_changed.wait(min(timeout, 1.0))
                    continue
                _, _, saga = heapq.heappop(self._schedule)
            saga.wait = 0.0
            self.run(saga, due=True)

    # -- one step forward or back ------------------------------------------------------

    def _invoke_step(self, saga: Saga) -> None:
        step = saga.current
        outcome = self._call(saga, "invoke", {"op": step.op, **saga.call_fields()})
        entry = self._call_entry(saga, "invoke", outcome)
        if not outcome.ok:
            if outcome.reached and not outcome.refused:
                saga.touched = True
            return self._after_failure(saga, outcome, [entry])
        saga.results[step.name] = {k: v for k, v in outcome.body.items()
                                   if k not in ("status", "saga_id", "op")}
        entries = [entry]
        if saga.step + 1 == len(saga.type.steps):
            saga.status = Status.COMPLETED
            entries.append(saga_event(saga.id, Status.COMPLETED, "all steps committed"))
        else:
            saga.step, saga.attempt, saga.touched = saga.step + 1, 1, False
        saga.wait = 0.0
        self._persist(saga, entries)

    def _compensate_step(self, saga: Saga) -> None:
        outcome = self._call(saga, "compensate", {"op": saga.current.op})
        entry = self._call_entry(saga, "compensate", outcome)
        if not outcome.ok:
            return self._after_failure(saga, outcome, [entry])
        entries = [entry]
        if saga.step == 0:
            saga.status = Status.COMPENSATED
            entries.append(saga_event(saga.id, Status.COMPENSATED, "every step undone"))
        else:
            saga.step, saga.attempt = saga.step - 1, 1
        saga.wait = 0.0
        self._persist(saga, entries)

    def _after_failure(self, saga: Saga, outcome: Outcome, entries: list,
                       check_deadline: bool = True) -> None:
        """Retry what may succeed; a compensatable step out of attempts, or any refusal,
        undoes the saga from this step (if it may have written anything) back to the
        first; a retriable step is retried until it succeeds or is refused; a
        compensation past its time budget is FAILED."""
        step = saga.current
        if saga.status == Status.RUNNING:
            if step.kind == StepKind.RETRIABLE and not outcome.refused:
                return self._retry_later(saga, entries)
            if outcome.retryable and saga.attempt < (step.attempts or self.settings.max_attempts):
                return self._retry_later(saga, entries)
            return self._begin_compensation(saga, outcome, entries)
        deadline = saga.compensate_deadline
        if check_deadline and saga.type.compensation_gives_up and deadline is not None \
                and time.monotonic() >= deadline:
            saga.status = Status.FAILED
            saga.reason = f"compensation of {title(saga)} kept failing: {outcome.message}"
            entries.append(saga_event(saga.id, Status.FAILED, f"{saga.reason}; needs an operator"))
            self._persist(saga, entries)
            log.error("saga %s FAILED, needs an operator: %s", saga.id, saga.reason)
            return None
        return self._retry_later(saga, entries)

    def _begin_compensation(self, saga: Saga, outcome: Outcome, entries: list) -> None:
        failed = title(saga)
        saga.failed_step, saga.rejected = saga.current.name, outcome.refused
        saga.reason = f"{failed} {'rejected' if outcome.refused else 'failed'}: {outcome.message}"
        # A step that provably wrote nothing (refused, or never reached) needs no undo;
        # a retriable step is never undone.
        first = saga.step if saga.touched and saga.current.kind != StepKind.RETRIABLE \
            else saga.step - 1
        saga.attempt, saga.wait = 1, 0.0
        entries.append(saga_event(saga.id, Status.COMPENSATING, f"undoing: {saga.reason}"))
        if first < 0:
            saga.status = Status.COMPENSATED
            entries.append(saga_event(saga.id, Status.COMPENSATED,
                                      f"nothing to undo: {failed} wrote nothing"))
        else:
            saga.status, saga.step = Status.COMPENSATING, first
            if saga.type.compensation_gives_up:
                saga.compensate_deadline = time.monotonic() + self.settings.compensate_for
        self._persist(saga, entries, new_compensation=True)
        log.info("saga %s %s: %s", saga.id, saga.status, saga.reason)

    def _retry_later(self, saga: Saga, entries: list) -> None:
        cap = self.settings.backoff_max
        delay = backoff_delay(self.settings.backoff_base, cap, saga.attempt)
        entries[-1] = dataclasses.replace(
            entries[-1], message=f"{entries[-1].message}; next attempt in {delay:.3f} s")
        saga.attempt += 1
        saga.wait = delay
        self._persist(saga, entries, delay=delay)

    def _resume(self, saga: Saga) -> None:
        """Carry on with a saga claimed from an owner that stopped renewing its lease."""
        if saga.wait > 0:
            # The next call is scheduled for later, so it has not been made yet.
            note = (f"resumed by {self.owner}; {title(saga)} attempt {saga.attempt} "
                    "not yet made")
            return self._persist(saga, [saga_event(saga.id, "RESUMED", note)], delay=saga.wait)
        # The call the saga was about to make may or may not have been made: count it as
        # made, with an unknown outcome, so a crash never resets a retry budget.
        action = "invoke" if saga.status == Status.RUNNING else "compensate"
        unknown = Outcome(ok=False, refused=False, reached=True, status_code=None,
                          elapsed_ms=0, message=f"outcome unknown: resumed by {self.owner}")
        if action == "invoke":
            saga.touched = True
        entries = [self._call_entry(saga, action, unknown, status="unknown")]
        # A compensation resumed past its budget still gets one more try before FAILED.
        self._after_failure(saga, unknown, entries, check_deadline=False)

    # -- calls and saves ---------------------------------------------------------------

    def _call(self, saga: Saga, action: str, fields: dict) -> Outcome:
        # A saga keeps the transport it started with, if this orchestrator has it.
        transport = self.transports.get(saga.transport) or \
            self.transports[self.settings.transport]
        service, op = saga.service, saga.current.op
        # A child of the saga's own span, whichever orchestrator makes the call.
        with tracing.span(f"{action} {service} {op}", saga.trace, tracing.CLIENT,
                          **tracing.saga_attributes(saga.id, saga.type.name, saga.step + 1,
                                                    saga.attempt, **{
                                                        "saga.action": action,
                                                        "saga.service": service,
                                                        "saga.op": op})) as span:
            outcome = transport.call(service, action, {"saga_id": saga.id, **fields},
                                     saga.current.timeout, tracing.traceparent(span))
            tracing.outcome(span, "success" if outcome.ok else
                            "rejected" if outcome.refused else "failed", not outcome.ok)
        metrics.step_called(service, op, action, outcome)
        return outcome

    def _call_entry(self, saga: Saga, action: str, outcome: Outcome, status=None) -> LogEntry:
        if status is None:
            status = ("success" if outcome.ok else "rejected" if outcome.refused else "failed")
        return LogEntry(saga.id, saga.service, status, outcome.message, saga.step + 1,
                        saga.current.op, action, None, saga.attempt, outcome.status_code,
                        outcome.elapsed_ms)

    def _persist(self, saga: Saga, entries: list, delay: float = 0.0,
                 new_compensation: bool = False) -> None:
        """Save the saga's next state. What a service did is known now and must not be
        lost to a database hiccup (a deadlock, a lost connection, a full pool): keep
        trying, with backoff, for as long as the saga is ours. Only LostLease (another
        owner took it) or shutdown ends this."""
        failures = 0
        while True:
            try:
                self.store.save(saga, entries, delay, new_compensation)
                saga.unsaved = None
                return
            except (mysql.connector.Error, UnsupportedServer) as exc:
                if not is_unavailable(exc):
                    raise
                failures += 1
                log.warning("saga %s: saving its state failed (%s); retry %d", saga.id, exc,
                            failures)
                if saga.hand_over_at is not None and time.monotonic() >= saga.hand_over_at:
                    saga.unsaved = (entries, delay, new_compensation)
                    raise HandOver(saga.id) from exc
                if self.stopping.wait(backoff_delay(0.05, 2.0, failures)):
                    raise

    # -- leases ----------------------------------------------------------------------------

    def start_background(self) -> None:
        """The lease heartbeat and the schedule of waiting sagas."""
        threading.Thread(target=self._heartbeat_loop, name="lease", daemon=True).start()
        self.start_schedule()

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.settings.lease_seconds / 4):
            try:
                self.store.renew(self.active_ids())
            except (mysql.connector.Error, UnsupportedServer) as exc:
                log.warning("lease renewal failed: %s", exc)
            except Exception:
                log.exception("lease renewal failed")

    def stop(self) -> None:
        self.stopping.set()


def title(saga: Saga) -> str:
    """How a step is named in reasons: 'B' for a registration, 'debit at A' otherwise."""
    step, service = saga.current.name, saga.service
    return step if step == service else f"{step} at {service}"
