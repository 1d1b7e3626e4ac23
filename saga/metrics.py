"""Prometheus metrics: what each process counts, and GET /metrics.

Every process runs under gunicorn with several workers, each counting on its own, so
the counters and histograms use prometheus_client's multiprocess mode: each worker
writes its values to memory-mapped files in a directory private to the process (made
in SAGA_METRICS_DIR, the system's temp directory by default, removed when the process
ends), and /metrics, whichever worker serves it, adds up every worker's files, those
of workers that died too, so a counter never goes back when gunicorn replaces one.
What is a state rather than an event (sagas by status, the oldest active saga, an
outbox's backlog) is read from the database at scrape time, so it is the same
whichever worker answers and whichever orchestrator or service process is scraped.

The hooks are one call each at the place the event happens; on a step call they cost a
counter and a histogram (a few microseconds), never a database round trip."""

import atexit
import glob
import logging
import os
import shutil
import tempfile
import time
from functools import wraps


def _private_directory() -> str:
    """A fresh directory for this process's metric files. Inherited settings are not
    trusted: a parent that imported this module (a test runner, a launcher) would hand
    its own directory to every process it starts, and they would add up each other's
    counts. Directories of processes that are gone (killed -9) are removed."""
    parent = os.environ.get("SAGA_METRICS_DIR") or None
    if parent and not os.path.isdir(parent):
        parent = None   # load_settings() stops the process with a clear message
    for stale in glob.glob(os.path.join(parent or tempfile.gettempdir(), "saga-metrics-*-*")):
        try:
            os.kill(int(os.path.basename(stale).split("-")[2]), 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass
    owner = os.getpid()
    path = tempfile.mkdtemp(prefix=f"saga-metrics-{owner}-", dir=parent)
    # Forked workers run atexit too: only the process that made it removes it.
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    return path


# Before prometheus_client is imported: it picks its multiprocess mode at import.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _private_directory()

import mysql.connector  # noqa: E402
from flask import Flask, Response  # noqa: E402
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter,  # noqa: E402
                               Histogram, generate_latest, values)
from prometheus_client.core import GaugeMetricFamily  # noqa: E402
from prometheus_client.multiprocess import (MultiProcessCollector,  # noqa: E402
                                            mark_process_dead)

from saga.common import UnsupportedServer  # noqa: E402
from saga.logs import SAGA_ID  # noqa: E402
from saga.model import ACTIVE, STATES, Outcome  # noqa: E402

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


def _process_id() -> int:
    return _pid


# Each value checks the process id on every change, to notice a fork. os.getpid() is a
# system call, dearer than the rest of an increment in a sandbox: the id is kept here
# instead, and renewed in every forked child. (This also switches metrics made from
# here on to the multiprocess files if someone imported prometheus_client first.)
os.register_at_fork(after_in_child=_forked)
values.ValueClass = values.MultiProcessValue(_process_id)

log = logging.getLogger("saga")

# --- what is counted -------------------------------------------------------------------

SAGA_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
                1800, 3600)
CALL_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

STARTED = Counter("saga_started_total", "Sagas started", ["type", "mode", "transport"],
                  registry=None)
FINISHED = Counter("saga_finished_total", "Sagas that reached COMPLETED, COMPENSATED or "
                   "FAILED (again after an operator's retry)", ["type", "mode", "status"],
                   registry=None)
DURATION = Histogram("saga_duration_seconds", "From a saga's start to its end",
                     ["type", "status"], buckets=SAGA_SECONDS, registry=None)
STEP_CALLS = Counter("saga_step_calls_total", "The orchestrator's calls to the services, "
                     "by outcome (success, rejected: a final refusal, failed: an error, a "
                     "timeout or no answer)", ["service", "op", "action", "outcome"],
                     registry=None)
STEP_SECONDS = Histogram("saga_step_duration_seconds", "How long the orchestrator waited "
                         "for a call's answer", ["service", "op", "action"],
                         buckets=CALL_SECONDS, registry=None)
TAKEOVERS = Counter("saga_takeovers_total", "Sagas this orchestrator claimed after their "
                    "owner's lease lapsed", registry=None)
REFUSED = Counter("saga_starts_refused_total", "Start requests turned away with a 503 "
                  "before anything was written (reason=busy: every request thread that may "
                  "wait for a saga was taken)", ["reason"], registry=None)
PARTICIPANT_CALLS = Counter("saga_participant_calls_total", "Step calls and undos a service "
                            "handled (over HTTP, Kafka or events), by outcome",
                            ["service", "op", "action", "outcome"], registry=None)

# Each label set's children, looked up once: labels() validates and locks every time.
_step_children: dict = {}
_participant_children: dict = {}


def saga_started(saga_type: str, mode: str, transport: str) -> None:
    STARTED.labels(saga_type, mode, transport).inc()


def saga_finished(saga_type: str, mode: str, status, seconds: float | None) -> None:
    """A saga reached a final status (once its save committed)."""
    FINISHED.labels(saga_type, mode, str(status)).inc()
    if seconds is not None:
        DURATION.labels(saga_type, str(status)).observe(max(0.0, seconds))


def saga_settled(settled) -> None:
    """A choreographed saga moved on (a store.Settled, or None if it did not), once the
    move committed: counted if it ended there."""
    if settled is not None and settled.status not in ACTIVE:
        saga_finished(settled.type, "choreography", settled.status,
                      saga_age(settled.started_at))


def saga_age(started_at: float | None) -> float | None:
    """Seconds since `started_at` (a Unix time), None if unknown."""
    return None if started_at is None else time.time() - started_at


def step_called(service: str, op: str, action: str, outcome: Outcome) -> None:
    """One call of the orchestrator to a service, as SAGA_LOG records its status."""
    label = "success" if outcome.ok else "rejected" if outcome.refused else "failed"
    key = (service, op, action, label)
    children = _step_children.get(key)
    if children is None:
        children = _step_children[key] = (STEP_CALLS.labels(*key),
                                          STEP_SECONDS.labels(service, op, action))
    children[0].inc()
    children[1].observe(outcome.elapsed_ms / 1000)


def sagas_taken_over(count: int) -> None:
    if count:
        TAKEOVERS.inc(count)


def start_refused(reason: str) -> None:
    REFUSED.labels(reason).inc()


def participant_call(action: str):
    """Decorates Participant.invoke / .compensate: counts each call by its outcome
    (success: 200; rejected: a refusal or a conflict, 4xx; failed: 5xx or an error) and
    names its saga in the log lines written while it runs."""
    def decorate(method):
        @wraps(method)
        def counted(self, fields, *args, **kwargs):
            given = fields if isinstance(fields, dict) else {}
            op = given.get("op", self.default_op)
            op = op if isinstance(op, str) and op in self.operations else "unknown"
            saga_id = given.get("saga_id")
            named = SAGA_ID.set(saga_id if isinstance(saga_id, str) else None)
            outcome = "failed"
            try:
                answer = method(self, fields, *args, **kwargs)
                outcome = "success" if answer.status < 400 else \
                    "rejected" if answer.status < 500 else "failed"
                return answer
            except Exception as exc:
                status = getattr(exc, "status", 500)
                outcome = "rejected" if isinstance(status, int) and status < 500 else "failed"
                raise
            finally:
                SAGA_ID.reset(named)
                key = (self.service, op, action, outcome)
                child = _participant_children.get(key)
                if child is None:
                    child = _participant_children[key] = PARTICIPANT_CALLS.labels(*key)
                child.inc()
        return counted
    return decorate


# --- what is read from the database at scrape time -----------------------------------

def saga_budget(saga_types, settings) -> float:
    """Seconds a saga of the slowest type may take when everything that can fail does
    but nothing is stuck: every forward attempt timing out and backing off, then its
    compensation for SAGA_COMPENSATE_FOR and one last try. Far past it, something waits
    that should not (a dead service behind a pivot, a refund that cannot land)."""
    def of(saga_type) -> float:
        calls = [(s.attempts or settings.max_attempts) * ((s.timeout or settings.read_timeout)
                                                          + settings.backoff_max)
                 for s in saga_type.steps]
        return sum(calls) + settings.compensate_for + max(calls, default=0.0)
    return max((of(t) for t in saga_types), default=0.0)


class SagaCounts:
    """sagas{status}, saga_oldest_active_seconds and saga_budget_seconds, from one query
    (SagaStore.count_by_status) per scrape."""

    def __init__(self, store, budget: float):
        self.store, self.budget = store, budget

    def collect(self):
        yield GaugeMetricFamily("saga_budget_seconds", "How long a saga of the slowest type "
                                "may take with every attempt failing (alerts compare the "
                                "oldest active saga with it)", value=self.budget)
        try:
            counts, oldest = self.store.count_by_status()
        except (mysql.connector.Error, UnsupportedServer) as exc:
            log.warning("metrics: sagas not counted, database unavailable: %s", exc)
            return
        sagas = GaugeMetricFamily("sagas", "Sagas by status, in the database",
                                  labels=["status"])
        for status in STATES:
            sagas.add_metric([status], counts.get(status, 0))
        yield sagas
        yield GaugeMetricFamily("saga_oldest_active_seconds", "Age of the oldest RUNNING or "
                                "COMPENSATING saga (0 when none is)", value=oldest)


class OutboxBacklog:
    """saga_outbox_pending: this service's events committed but not yet published."""

    def __init__(self, db, service: str):
        self.db, self.service = db, service

    def collect(self):
        from saga.participant.events import Outbox
        try:
            with self.db.transaction() as cur:
                pending = Outbox.count_pending(cur, self.service)
        except (mysql.connector.Error, UnsupportedServer) as exc:
            log.warning("metrics: outbox not counted, database unavailable: %s", exc)
            return
        gauge = GaugeMetricFamily("saga_outbox_pending", "Events in this service's outbox "
                                  "not yet published to the broker", labels=["service"])
        gauge.add_metric([self.service], pending)
        yield gauge


# --- serving ---------------------------------------------------------------------------

def init_app(app: Flask, *collectors) -> None:
    """GET /metrics: every worker's counts (the multiprocess files) and `collectors`,
    in Prometheus' text format. Not behind the API token, like /health."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, os.environ["PROMETHEUS_MULTIPROC_DIR"])
    for collector in collectors:
        registry.register(collector)

    def metrics():
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])


def worker_exited(pid: int) -> None:
    """gunicorn's child_exit: drop the gone worker's live gauges (its counters stay)."""
    mark_process_dead(pid, os.environ["PROMETHEUS_MULTIPROC_DIR"])
