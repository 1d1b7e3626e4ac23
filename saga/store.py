"""SagaStore: every statement on the engine's tables (SAGA, SAGA_LOG, START_KEY), the
reads of the API included. Rows are read by column name. Every write of a saga an
orchestrator drives is fenced: it lands only while the row's fence is the one this
orchestrator claimed, so a paused owner that wakes up late cannot overwrite the progress
of the orchestrator that took over."""

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import mysql.connector
from mysql.connector import errorcode

from saga.common import Database, commit_with, drain_results
from saga.definitions import SAGA_TYPES
from saga.errors import IllegalTransition, KnownStart, LostLease
from saga.model import ACTIVE, TRANSITIONS, Saga, SagaType, Status
from saga import metrics, tracing


@dataclass(frozen=True)
class LogEntry:
    """One SAGA_LOG row. service is A, B or C for a call or an event, SAGA for the
    saga's own transitions."""
    saga_id: str
    service: str
    status: str
    message: str
    step: int | None = None
    op: str | None = None
    action: str | None = None
    event: str | None = None
    attempt: int | None = None
    http_status: int | None = None
    elapsed_ms: int | None = None


@dataclass(frozen=True)
class Settled:
    """A choreographed saga moved on (always true): what its metrics need once the
    transaction that moved it has committed (metrics.saga_settled)."""
    type: str
    status: Status
    started_at: float


def saga_event(saga_id: str, status: str, message: str) -> LogEntry:
    return LogEntry(saga_id, "SAGA", str(status), message)


LOG_INSERT = ("INSERT INTO SAGA_LOG (saga_id, service, status, message, step, op, action, "
              "event, attempt, http_status, elapsed_ms) ")


def number(value) -> str:
    """An int of our own (never user input) written into the SQL: each parameter costs
    the driver a conversion and an escape in Python on the engine's hottest path."""
    return "NULL" if value is None else str(int(value))


def log_values(entries) -> tuple[list[str], list]:
    rows, params = [], []
    for e in entries:
        rows.append(f"(%s, %s, %s, %s, {number(e.step)}, %s, %s, %s, {number(e.attempt)}, "
                    f"{number(e.http_status)}, {number(e.elapsed_ms)})")
        params += [e.saga_id, e.service, e.status, e.message, e.op, e.action, e.event]
    return rows, params


def insert_log(cur, entries) -> None:
    """Write log rows inside the caller's transaction (the log row of a call commits with
    the state it led to, or not at all)."""
    if entries:
        sql, params = log_insert(entries)
        cur.execute(sql, params)


def log_insert(entries) -> tuple[str, list]:
    """One INSERT for all the rows, built here: the driver's executemany re-parses its
    statement with regular expressions on every call."""
    rows, params = log_values(entries)
    return LOG_INSERT + "VALUES " + ", ".join(rows), params


def log_insert_if_updated(entries) -> tuple[str, list]:
    """The same rows, inserted only if the statement just before changed a row (the
    fenced UPDATE of a save): they then travel in one round trip with it and COMMIT."""
    rows, params = log_values(entries)
    return LOG_INSERT + " UNION ALL ".join(
        f"SELECT {row[1:-1]} FROM DUAL WHERE ROW_COUNT() = 1" for row in rows), params


SAGA_COLUMNS = (
    "id, type, mode, transport, status, step, attempt, input, results, failed_step, "
    "reason, rejected, touched, fence, revision, trace, "
    "UNIX_TIMESTAMP(created_at) AS started_ts, "
    "GREATEST(0, TIMESTAMPDIFF(MICROSECOND, NOW(3), next_attempt_at)) AS wait_us, "
    "TIMESTAMPDIFF(MICROSECOND, NOW(3), compensate_until) AS left_us")
ITEM_COLUMNS = ("id, type, mode, transport, status, step, attempt, label, input, "
                "failed_step, reason, rejected, created_at, updated_at")
LOG_COLUMNS = ("id, saga_id, service, status, message, created_at, step, op, action, event, "
               "attempt, http_status, elapsed_ms")


def saga_from_row(row: dict, types=SAGA_TYPES) -> Saga:
    left_us = row["left_us"]
    return Saga(
        id=row["id"], type=types[row["type"]], status=Status(row["status"]),
        step=row["step"], attempt=row["attempt"], input=json.loads(row["input"]),
        fence=row["fence"], revision=row["revision"], mode=row["mode"],
        transport=row["transport"], results=json.loads(row["results"]),
        failed_step=row["failed_step"], reason=row["reason"], rejected=bool(row["rejected"]),
        touched=bool(row["touched"]), wait=row["wait_us"] / 1e6,
        compensate_deadline=None if left_us is None else time.monotonic() + left_us / 1e6,
        saved_status=Status(row["status"]), trace=row["trace"],
        started_at=float(row["started_ts"]))


def iso(ts: datetime | None) -> str | None:
    """A stored UTC time as ISO 8601 with its offset."""
    if ts is None:
        return None
    return ts.replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def us(seconds: float) -> int:
    return int(seconds * 1e6)


class SagaStore:
    # A gap in SAGA_LOG ids younger than this may still be filled by a transaction that
    # has not committed yet; older gaps are rolled-back inserts that never will be.
    LOG_GAP_GRACE = 60.0
    MAX_LOG_GAPS = 64

    def __init__(self, db: Database, owner: str, lease_seconds: float, compensate_for: float):
        self.db, self.owner = db, owner
        self.lease_us, self.compensate_us = us(lease_seconds), us(compensate_for)

    # -- creating sagas -------------------------------------------------------------

    def create(self, saga_type: SagaType, data: dict, mode: str = "orchestration",
               transport: str = "http", key: str | None = None,
               request_hash: str | None = None) -> Saga:
        """A new RUNNING saga, leased to this orchestrator, with its STARTED row; with an
        Idempotency-Key, KnownStart if that key already made a saga."""
        saga = self.new_saga(str(uuid.uuid4()), saga_type, data, mode, transport)

        def insert(cur):
            try:
                if key is not None:
                    self.insert_start_key(cur, key, request_hash, saga.id)
                sql, params = self.saga_insert(saga, self.owner)
                commit_with(cur, sql, params)
            except mysql.connector.IntegrityError as exc:
                # Tried again after a commit cut off on the way: did that one land?
                if exc.errno == errorcode.ER_DUP_ENTRY and self.exists(cur, saga.id):
                    return
                raise

        try:
            self.db.run(insert, idempotent=True)
        except mysql.connector.IntegrityError as exc:
            if key is None or exc.errno != errorcode.ER_DUP_ENTRY:
                raise
            known = self.find_start_key(key)
            if known is None:  # purged between the two statements: a fresh start is fine
                return self.create(saga_type, data, mode, transport, key, request_hash)
            raise KnownStart(known["saga_id"], known["request_hash"] == request_hash) from None
        metrics.saga_started(saga_type.name, mode, transport)
        return saga

    @staticmethod
    def new_saga(saga_id: str, saga_type: SagaType, data: dict, mode: str,
                 transport: str) -> Saga:
        # Its trace is the span it is started in (the start request's).
        return Saga(id=saga_id, type=saga_type, status=Status.RUNNING, step=0, attempt=1,
                    input=dict(data), fence=1, revision=1, mode=mode, transport=transport,
                    saved_status=Status.RUNNING, trace=tracing.traceparent(),
                    started_at=time.time())

    @staticmethod
    def insert_start_key(cur, key: str, request_hash: str, saga_id: str) -> None:
        """IntegrityError (duplicate key) if the key was used before."""
        cur.execute("INSERT INTO START_KEY (idem_key, request_hash, saga_id) "
                    "VALUES (%s, %s, %s)", (key.encode(), request_hash, saga_id))

    def insert_saga(self, cur, saga: Saga, owner: str | None) -> None:
        """The SAGA row and its STARTED row, inside the caller's transaction."""
        sql, params = self.saga_insert(saga, owner)
        cur.execute(sql, params)
        drain_results(cur)

    def saga_insert(self, saga: Saga, owner: str | None) -> tuple[str, list]:
        logged, log_params = log_insert([saga_event(
            saga.id, "STARTED", f"{saga.type.name} started ({saga.mode}, {saga.transport})")])
        return ("INSERT INTO SAGA (id, type, mode, transport, status, step, attempt, input, "
                "label, results, lease_owner, lease_until, fence, revision, trace) VALUES "
                "(%s, %s, %s, %s, 'RUNNING', 0, 1, %s, %s, '{}', %s, NOW(3) + INTERVAL %s "
                f"MICROSECOND, 1, 1, %s); {logged}",
                [saga.id, saga.type.name, saga.mode, saga.transport,
                 json.dumps(saga.input, ensure_ascii=False), saga.type.label(saga.input)[:255],
                 owner, self.lease_us if owner else 0, saga.trace, *log_params])

    @staticmethod
    def exists(cur, saga_id: str) -> bool:
        cur.execute("SELECT 1 AS found FROM SAGA WHERE id = %s", (saga_id,))
        return cur.fetchone() is not None

    def find_start_key(self, key: str) -> dict | None:
        with self.db.transaction() as cur:
            cur.execute("SELECT request_hash, saga_id FROM START_KEY WHERE idem_key = %s",
                        (key.encode(),))
            return cur.fetchone()

    # -- driving sagas ----------------------------------------------------------------

    def save(self, saga: Saga, entries, delay: float = 0.0,
             new_compensation: bool = False) -> None:
        """Persist the saga's next state and its log rows in one transaction. Safe to call
        again after an error: a save whose COMMIT was cut off and did land is recognized
        by its revision and not applied twice. LostLease if the saga is no longer ours."""
        if saga.status not in TRANSITIONS[saga.saved_status]:
            raise IllegalTransition(f"{saga.id}: {saga.saved_status} -> {saga.status}")
        done = saga.status not in ACTIVE
        finishes = done and saga.saved_status in ACTIVE
        gives_up = new_compensation and saga.type.compensation_gives_up

        def update(cur):
            logged, log_params = log_insert_if_updated(entries) if entries else ("", [])
            changed, _ = commit_with(
                cur,
                f"UPDATE SAGA SET status = %s, step = {number(saga.step)}, "
                f"attempt = {number(saga.attempt)}, results = %s, failed_step = %s, "
                f"reason = %s, rejected = {number(saga.rejected)}, "
                f"touched = {number(saga.touched)}, revision = revision + 1, "
                f"next_attempt_at = NOW(3) + INTERVAL {us(delay)} MICROSECOND, "
                + (f"compensate_until = NOW(3) + INTERVAL {self.compensate_us} MICROSECOND, "
                   if gives_up else "compensate_until = NULL, " if new_compensation else "")
                # A saga that waits for its next call keeps its lease through the wait
                # and one lease period after, unrenewed: see Engine._park.
                + ("lease_owner = NULL, lease_until = NOW(3) " if done else
                   f"lease_until = NOW(3) + INTERVAL {us(delay) + self.lease_us} MICROSECOND ")
                + f"WHERE id = %s AND fence = {number(saga.fence)} "
                f"AND revision = {number(saga.revision)}" + (f"; {logged}" if logged else ""),
                (saga.status.value, json.dumps(saga.results, ensure_ascii=False),
                 saga.failed_step, (saga.reason or "")[:1000] or None, saga.id, *log_params))
            if changed == 1:
                return
            cur.execute("SELECT fence, revision FROM SAGA WHERE id = %s", (saga.id,))
            row = cur.fetchone()
            if row is None or row["fence"] != saga.fence or row["revision"] != saga.revision + 1:
                raise LostLease(saga.id)
            # Our earlier attempt of this very save committed; nothing more to write.

        self.db.run(update, idempotent=True)
        if finishes:
            metrics.saga_finished(saga.type.name, saga.mode, saga.status,
                                  metrics.saga_age(saga.started_at))
        saga.revision += 1
        saga.saved_status = saga.status

    def load(self, saga_id: str) -> Saga | None:
        with self.db.transaction() as cur:
            cur.execute(f"SELECT {SAGA_COLUMNS} FROM SAGA WHERE id = %s", (saga_id,))
            row = cur.fetchone()
        return saga_from_row(row) if row else None

    def claim_expired(self, limit: int, busy=()) -> list[Saga]:
        """Take orchestrated sagas whose owner stopped renewing its lease and whose next
        call is due (but not `busy` ones, which this process is still driving). SKIP
        LOCKED lets several orchestrators scan at once without waiting on or
        double-taking a row; READ COMMITTED takes no gap locks, which would deadlock with
        the inserts of /start."""
        if limit <= 0:
            return []
        skip = "".join(" AND id <> %s" for _ in busy)

        def claim(cur):
            cur.execute(
                "SELECT id FROM SAGA WHERE mode = 'orchestration' AND status IN "
                f"('RUNNING', 'COMPENSATING') AND lease_until < NOW(3) "
                f"AND next_attempt_at <= NOW(3){skip} "
                "ORDER BY lease_until LIMIT %s FOR UPDATE SKIP LOCKED", (*busy, limit))
            ids = [row["id"] for row in cur.fetchall()]
            if not ids:
                return []
            marks = ", ".join(["%s"] * len(ids))
            cur.execute(f"UPDATE SAGA SET fence = fence + 1, lease_owner = %s, "
                        f"lease_until = NOW(3) + INTERVAL %s MICROSECOND WHERE id IN ({marks})",
                        (self.owner, self.lease_us, *ids))
            cur.execute(f"SELECT {SAGA_COLUMNS} FROM SAGA WHERE id IN ({marks})", ids)
            return [saga_from_row(row) for row in cur.fetchall()]

        claimed = self.db.run(claim, attempts=1, read_committed=True)
        metrics.sagas_taken_over(len(claimed))
        return claimed

    def take_back(self, saga: Saga) -> bool:
        """Renew the lease of a saga this orchestrator left waiting, now that its next
        call is due: False if another orchestrator (or an operator) took it meanwhile."""
        def renew(cur):
            cur.execute("UPDATE SAGA SET lease_until = NOW(3) + INTERVAL %s MICROSECOND "
                        "WHERE id = %s AND fence = %s AND lease_owner = %s "
                        "AND status IN ('RUNNING', 'COMPENSATING')",
                        (self.lease_us, saga.id, saga.fence, self.owner))
            return cur.rowcount == 1

        return self.db.run(renew)

    def renew(self, ids) -> None:
        """Extend the leases of the sagas this process drives. SKIP LOCKED: a saga row
        another session holds locked (its own save in flight, an operator) must not
        stall the renewal of every other lease behind it."""
        if not ids:
            return
        marks = ", ".join(["%s"] * len(ids))

        def renew(cur):
            cur.execute(f"SELECT id FROM SAGA WHERE id IN ({marks}) AND lease_owner = %s "
                        "AND status IN ('RUNNING', 'COMPENSATING') FOR UPDATE SKIP LOCKED",
                        (*ids, self.owner))
            mine = [row["id"] for row in cur.fetchall()]
            if mine:
                cur.execute(f"UPDATE SAGA SET lease_until = NOW(3) + INTERVAL %s MICROSECOND "
                            f"WHERE id IN ({', '.join(['%s'] * len(mine))})",
                            (self.lease_us, *mine))

        self.db.run(renew, attempts=2, read_committed=True)

    def take_for_operator(self, saga_id: str, decide):
        """Lock one saga, let `decide(saga, lease_live)` change it and return log rows (or
        raise), then own it under a new fence. (saga, taken); saga is None if unknown."""
        with self.db.transaction() as cur:
            cur.execute(f"SELECT {SAGA_COLUMNS}, lease_until > NOW(3) AS lease_live "
                        "FROM SAGA WHERE id = %s FOR UPDATE", (saga_id,))
            row = cur.fetchone()
            if row is None:
                return None, False
            saga = saga_from_row(row)
            entries = decide(saga, bool(row["lease_live"]))
            if not entries:
                return saga, False
            if saga.status not in TRANSITIONS[saga.saved_status] | {saga.saved_status}:
                raise IllegalTransition(f"{saga.id}: {saga.saved_status} -> {saga.status}")
            gives_up = saga.status == Status.COMPENSATING and saga.type.compensation_gives_up
            cur.execute(
                "UPDATE SAGA SET status = %s, step = %s, attempt = %s, reason = %s, "
                "touched = %s, next_attempt_at = NOW(3), fence = fence + 1, "
                "revision = revision + 1, lease_owner = %s, "
                "lease_until = NOW(3) + INTERVAL %s MICROSECOND, "
                "compensate_until = IF(%s, NOW(3) + INTERVAL %s MICROSECOND, NULL) "
                "WHERE id = %s",
                (saga.status.value, saga.step, saga.attempt, saga.reason, saga.touched,
                 self.owner, self.lease_us, gives_up, self.compensate_us, saga.id))
            insert_log(cur, entries)
        saga.fence += 1
        saga.revision += 1
        saga.saved_status = saga.status
        saga.wait = 0.0
        saga.compensate_deadline = (time.monotonic() + self.compensate_us / 1e6
                                    if gives_up else None)
        return saga, True

    # -- sagas choreographed by the services ----------------------------------------

    def settle_choreographed(self, cur, saga_id: str, status: Status, step: int,
                             failed_step: str | None = None, reason: str | None = None,
                             rejected: bool = False) -> Settled | None:
        """Move a choreographed saga on, inside the caller's transaction (the service
        that learned the news). None if the move is not allowed from where it is, e.g. a
        redelivered event that was already taken into account. Entering COMPENSATING
        starts its compensation's time budget (SAGA_COMPENSATE_FOR), as in orchestration."""
        cur.execute("SELECT status, type, UNIX_TIMESTAMP(created_at) AS started_ts FROM SAGA "
                    "WHERE id = %s FOR UPDATE", (saga_id,))
        row = cur.fetchone()
        if row is None or status not in TRANSITIONS[Status(row["status"])] \
                or Status(row["status"]) == status:
            return None
        gives_up = status == Status.COMPENSATING and \
            SAGA_TYPES[row["type"]].compensation_gives_up
        cur.execute("UPDATE SAGA SET status = %s, step = %s, revision = revision + 1, "
                    "failed_step = COALESCE(%s, failed_step), reason = COALESCE(%s, reason), "
                    "rejected = rejected OR %s, compensate_until = "
                    "IF(%s, NOW(3) + INTERVAL %s MICROSECOND, compensate_until) WHERE id = %s",
                    (status.value, step, failed_step, reason, rejected, gives_up,
                     self.compensate_us, saga_id))
        return Settled(row["type"], status, float(row["started_ts"]))

    def fail_overdue_choreographed(self, cur, saga_id: str, step: int,
                                   reason: str) -> Settled | None:
        """Park a choreographed saga whose undo kept failing past its time budget: FAILED,
        for an operator. None while it still has time (or is not compensating)."""
        cur.execute("UPDATE SAGA SET status = 'FAILED', step = %s, reason = %s, "
                    "revision = revision + 1 WHERE id = %s AND status = 'COMPENSATING' "
                    "AND compensate_until < NOW(3)", (step, reason[:1000], saga_id))
        if cur.rowcount != 1:
            return None
        cur.execute("SELECT type, UNIX_TIMESTAMP(created_at) AS started_ts FROM SAGA "
                    "WHERE id = %s", (saga_id,))
        row = cur.fetchone()
        return Settled(row["type"], Status.FAILED, float(row["started_ts"]))

    def retry_choreographed(self, cur, saga_id: str, reason: str) -> dict | None:
        """A FAILED choreographed saga back to COMPENSATING with a new time budget, for an
        operator: its row (type, step, input, results) to re-send the undo from, or None
        if it is not a FAILED choreographed saga."""
        cur.execute("SELECT id, type, step, input, results FROM SAGA WHERE id = %s AND "
                    "mode = 'choreography' AND status = 'FAILED' FOR UPDATE", (saga_id,))
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute("UPDATE SAGA SET status = 'COMPENSATING', reason = %s, "
                    "revision = revision + 1, "
                    "compensate_until = NOW(3) + INTERVAL %s MICROSECOND WHERE id = %s",
                    (reason[:1000], self.compensate_us, saga_id))
        return {**row, "input": json.loads(row["input"]), "results": json.loads(row["results"])}

    @staticmethod
    def save_results(cur, saga_id: str, results: dict) -> None:
        cur.execute("UPDATE SAGA SET results = %s WHERE id = %s",
                    (json.dumps(results, ensure_ascii=False), saga_id))

    def note_step(self, cur, saga_id: str, step: int) -> None:
        cur.execute("UPDATE SAGA SET step = %s WHERE id = %s AND step < %s "
                    "AND status = 'RUNNING'", (step, saga_id, step))

    # -- reads for the API ----------------------------------------------------------

    def list_sagas(self, status=None, saga_type=None, label=None, mode=None,
                   limit=50, offset=0) -> tuple[list[dict], bool]:
        """A page of sagas, newest first, and whether there are more."""
        where, params = [], []
        for column, value in (("status", status), ("type", saga_type), ("label", label),
                              ("mode", mode)):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        # Unfiltered, MariaDB would rather scan and sort than walk saga_created for a
        # deep offset; walking the index is what keeps pages fast on a big table.
        scope = " WHERE " + " AND ".join(where) if where else " FORCE INDEX (saga_created)"
        with self.db.transaction() as cur:
            cur.execute(f"SELECT {ITEM_COLUMNS} FROM SAGA{scope} "
                        "ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s",
                        (*params, limit + 1, offset))
            rows = cur.fetchall()
        return rows[:limit], len(rows) > limit

    def get_saga(self, saga_id: str) -> tuple[dict | None, list[dict]]:
        """The saga's row (with its results) and its SAGA_LOG rows in order."""
        with self.db.transaction() as cur:
            cur.execute(f"SELECT {ITEM_COLUMNS}, results FROM SAGA WHERE id = %s", (saga_id,))
            row = cur.fetchone()
            if row is None:
                return None, []
            cur.execute(f"SELECT {LOG_COLUMNS} FROM SAGA_LOG WHERE saga_id = %s ORDER BY id",
                        (saga_id,))
            return row, cur.fetchall()

    def get_item(self, saga_id: str) -> dict | None:
        with self.db.transaction() as cur:
            cur.execute(f"SELECT {ITEM_COLUMNS} FROM SAGA WHERE id = %s", (saga_id,))
            return cur.fetchone()

    def count_by_status(self) -> tuple[dict[str, int], float]:
        """How many sagas are in each status, and the age in seconds of the oldest
        RUNNING or COMPENSATING one (0 if none is): for /metrics, at every scrape, so one
        statement, read from the (status, created_at) index alone."""
        with self.db.transaction() as cur:
            cur.execute("SELECT status, COUNT(*) AS n, "
                        "TIMESTAMPDIFF(MICROSECOND, MIN(created_at), NOW(3)) AS age_us "
                        "FROM SAGA GROUP BY status")
            rows = cur.fetchall()
        counts = {row["status"]: row["n"] for row in rows}
        oldest = max((row["age_us"] for row in rows
                      if row["status"] in (Status.RUNNING.value, Status.COMPENSATING.value)),
                     default=0)
        return counts, max(0, oldest) / 1e6

    def inputs_in_flight(self, saga_type: str) -> list[dict]:
        """The input of each saga of the type whose first step may have landed while
        the rest or its undo has not (RUNNING past it, or COMPENSATING): for a transfer,
        the money between its debit and its credit or refund."""
        with self.db.transaction() as cur:
            cur.execute("SELECT input FROM SAGA WHERE type = %s AND "
                        "((status = 'RUNNING' AND step >= 1) OR status = 'COMPENSATING')",
                        (saga_type,))
            return [json.loads(row["input"]) for row in cur.fetchall()]

    def tail_log(self, after: int | None, gaps: dict | None = None, limit: int = 100):
        """SAGA_LOG for a live tail: (rows, next_after, gaps). Ids are handed out at
        insert, not at commit, so a row may become visible after a higher id did: every
        id skipped below the newest row returned is a gap, kept (with the epoch second
        it was first seen) while it is young enough to still commit, and returned as soon
        as it has. The caller sends `after` and `gaps` back with its next request. A gap
        older than LOG_GAP_GRACE was a rolled-back insert and is dropped. Without
        `after`, the newest `limit` rows."""
        gaps = dict(gaps or {})
        with self.db.transaction() as cur:
            if after is None:
                cur.execute(f"SELECT {LOG_COLUMNS} FROM SAGA_LOG ORDER BY id DESC LIMIT %s",
                            (limit,))
                rows = list(reversed(cur.fetchall()))
                after = rows[0]["id"] - 1 if rows else 0
            else:
                cur.execute(f"SELECT {LOG_COLUMNS} FROM SAGA_LOG WHERE id > %s "
                            "ORDER BY id LIMIT %s", (after, limit))
                rows = cur.fetchall()
            filled = []
            if gaps:
                marks = ", ".join(["%s"] * len(gaps))
                cur.execute(f"SELECT {LOG_COLUMNS} FROM SAGA_LOG WHERE id IN ({marks})",
                            tuple(gaps))
                filled = cur.fetchall()
            cur.execute("SELECT @@auto_increment_increment AS step, "
                        "@@auto_increment_offset AS start, UNIX_TIMESTAMP(NOW(3)) AS now")
            ids = cur.fetchone()
        now = float(ids["now"])
        for row in filled:
            gaps.pop(row["id"], None)
        previous = after
        for row in rows:
            born = row["created_at"].replace(tzinfo=timezone.utc).timestamp()
            if now - born < self.LOG_GAP_GRACE:
                for missing in range(previous + 1, row["id"]):
                    if (missing - ids["start"]) % ids["step"] == 0:
                        gaps.setdefault(missing, born)
            previous = row["id"]
        gaps = {g: born for g, born in gaps.items() if now - born < self.LOG_GAP_GRACE}
        kept = dict(sorted(gaps.items())[-self.MAX_LOG_GAPS:])
        return sorted(filled + rows, key=lambda r: r["id"]), previous, kept

    # -- retention ------------------------------------------------------------------

    # A client may retry with its Idempotency-Key for at least this long.
    START_KEY_DAYS = 1.0

    def purge_finished(self, older_than_days: float, batch: int = 500) -> int:
        """Delete up to `batch` sagas that finished (COMPLETED or COMPENSATED) more than
        `older_than_days` ago, with their log rows, and start keys older than that and
        at least a day. Never an active saga, never a FAILED one (it waits for an
        operator)."""
        def purge(cur):
            cur.execute("SELECT id FROM SAGA WHERE status IN ('COMPLETED', 'COMPENSATED') "
                        "AND updated_at < NOW(3) - INTERVAL %s MICROSECOND "
                        "ORDER BY updated_at LIMIT %s FOR UPDATE SKIP LOCKED",
                        (int(older_than_days * 86400e6), batch))
            ids = [row["id"] for row in cur.fetchall()]
            if ids:
                marks = ", ".join(["%s"] * len(ids))
                cur.execute(f"DELETE FROM SAGA_LOG WHERE saga_id IN ({marks})", ids)
                cur.execute(f"DELETE FROM SAGA WHERE id IN ({marks})", ids)
            key_days = max(older_than_days, self.START_KEY_DAYS)
            cur.execute("DELETE FROM START_KEY WHERE created_at < NOW(3) - INTERVAL %s "
                        "MICROSECOND LIMIT %s", (int(key_days * 86400e6), batch))
            return len(ids) + cur.rowcount

        return self.db.run(purge, read_committed=True)
