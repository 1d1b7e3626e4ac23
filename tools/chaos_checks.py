"""The chaos harness's checks, read straight from the database at quiet, and the
balance sampler that reads during the run.

Generic, for every saga whatever its type: it is COMPLETED or COMPENSATED (FAILED only
with --allow-failed, and never for a type whose compensation does not give up; RUNNING
or COMPENSATING after the settle timeout is stuck); STEP_LEDGER agrees with it (a
COMPLETED saga has each of its steps 'invoked' at the step's service, with the call its
step builds and the result the saga holds, and nothing else; a COMPENSATED one has
nothing 'invoked'); the last SAGA event in SAGA_LOG is its status; it ran as the run
asked (mode and transport) and was made by one Idempotency-Key of this run; and every
answer a client got was true. In a choreography: every event published, none written
or published twice, no step done or undone twice. Per type: each registered type's own
`invariant(cur)` (all or nothing, money conserved, orders settled: whatever it
promises), run over the database at quiet."""

import json
import re
import threading
import time
import traceback
from collections import Counter, defaultdict
from decimal import Decimal

import mysql.connector

from chaos_system import close_quietly

ACTIVE = ("RUNNING", "COMPENSATING")
CENT = Decimal("0.01")


def money(value) -> Decimal:
    return Decimal(str(value)).quantize(CENT)


def result_of(answer) -> dict:
    """A step's result as the saga keeps it: the service's answer but its envelope."""
    return {k: v for k, v in (answer or {}).items() if k not in ("status", "saga_id", "op")}


def reason_kind(reason: str) -> str:
    """A refusal's reason without its step, status code and figures ("charge rejected:
    HTTP 422: insufficient balance: customer 3 has ..." is "insufficient balance")."""
    text = re.sub(r"^HTTP \d+:? ", "", reason.split(" rejected: ", 1)[-1])
    text = re.sub(r" via \w+ \(.*?\)", "", text)     # "... via kafka (B pid 42)"
    return re.sub(r"\d+(\.\d+)?", "N", text.split(":")[0])[:60]


def balance_tables(db, saga_types) -> list[str]:
    """The tables of the given types that hold money: rows with an opening and a balance."""
    return [t for saga_type in saga_types for t in saga_type.tables
            if {"opening", "balance"} <= {c.lower() for c in db.columns(t)}]


def read_balances(cur, tables) -> dict:
    """{table: {row id: (opening, balance)}} in one statement, so one consistent read."""
    if not tables:
        return {}
    cur.execute(" UNION ALL ".join(f"SELECT '{t}', CAST(id AS CHAR), opening, balance FROM {t}"
                                   for t in tables))
    out = {t: {} for t in tables}
    for table, rid, opening, balance in cur.fetchall():
        out[table][rid] = (money(opening), money(balance))
    return out


class BalanceSampler(threading.Thread):
    """Reads every balance of the run's money tables from the database every `period`
    seconds for the whole run, the way a bank test's reader does: a negative balance is a
    violation however briefly it lasted, and (when the run owns the database) so is a
    table's total above its opening total: money made from nothing. A total below it is
    money in flight or spent (a transfer's debit not yet credited, a paid order)."""

    MAX_REPORTED = 20

    def __init__(self, db, tables, owned, period=0.05):
        super().__init__(name="sampler", daemon=True)
        self.db, self.tables, self.owned, self.period = db, tables, owned, period
        self.stop_event = threading.Event()
        self.reads = 0
        self.failed_reads = 0          # the database was down or restarting
        self.min_balance = defaultdict(dict)
        self.min_total, self.max_total = {}, {}
        self.violations = []
        self.bad_reads = 0
        self.errors = []

    def run(self):
        conn = None
        try:
            while not self.stop_event.is_set():
                began = time.monotonic()
                try:
                    if conn is None:
                        conn = self.db.connect()
                    self.read(conn)
                except mysql.connector.Error:
                    self.failed_reads += 1
                    conn = close_quietly(conn)
                self.stop_event.wait(max(0.0, self.period - (time.monotonic() - began)))
        except Exception:
            self.errors.append(traceback.format_exc())
        finally:
            close_quietly(conn)

    def read(self, conn):
        balances = read_balances(conn.cursor(), self.tables)
        self.reads += 1
        for table, rows in balances.items():
            total = sum(b for _, b in rows.values())
            opening = sum(o for o, _ in rows.values())
            low = self.min_balance[table]
            for rid, (_, balance) in rows.items():
                low[rid] = min(low.get(rid, balance), balance)
            self.min_total[table] = min(self.min_total.get(table, total), total)
            self.max_total[table] = max(self.max_total.get(table, total), total)
            seen = {rid: str(b) for rid, (_, b) in rows.items()}
            if any(b < 0 for _, b in rows.values()):
                self.report(f"sampler read a negative balance in {table}: {seen}")
            if self.owned and total > opening:
                self.report(f"sampler read a total of {total} in {table}, above the opening "
                            f"{opening} (money from nothing): {seen}")

    def report(self, text):
        self.bad_reads += 1
        if len(self.violations) < self.MAX_REPORTED:
            self.violations.append(f"{text} (read #{self.reads})")

    def stop(self):
        self.stop_event.set()
        self.join(10)
        if self.bad_reads > len(self.violations):
            self.violations.append(f"... and {self.bad_reads - len(self.violations)} more "
                                   "bad readings")

    def figures(self, table):
        return {"min_balance_seen": dict(sorted(
                    (rid, str(b)) for rid, b in self.min_balance[table].items())),
                "min_total_seen": str(self.min_total.get(table)),
                "max_total_seen": str(self.max_total.get(table))}


class Checker:
    """Every check at quiet, read straight from the database. `saga_types` are the
    registered types (the invariants of all of them hold at quiet). Shared (a running
    system, --url): the sagas of this run only, found by its Idempotency-Keys; the
    types' invariants only if nothing else is running then."""

    def __init__(self, db, saga_types, key_prefix, shared=False, allow_failed=False,
                 run_as=None):
        self.db, self.types, self.key_prefix = db, saga_types, key_prefix
        self.shared, self.allow_failed = shared, allow_failed
        # (mode, transport) every saga must carry, when the run owns the database.
        self.run_as = run_as
        self.choreography = bool(run_as and run_as[0] == "choreography")
        self.violations = []
        self.suspects = []        # saga ids to dump
        self.notes = []
        self.outcomes_by_type = defaultdict(Counter)
        self.refusals_by_type = defaultdict(Counter)
        self.balances = {}        # table -> figures at quiet
        self.invariants_checked = []   # the types whose invariant was run

    def violation(self, text, saga=None):
        self.violations.append(text)
        if saga and saga not in self.suspects:
            self.suspects.append(saga)

    def scope(self):
        if not self.shared:
            return "", ()
        return (" WHERE id IN (SELECT saga_id FROM START_KEY WHERE idem_key LIKE %s)",
                ((self.key_prefix + "%").encode(),))

    def active_count(self):
        where, params = self.scope()
        where = (where + " AND" if where else " WHERE") + " status IN ('RUNNING', 'COMPENSATING')"
        return self.db.query("SELECT COUNT(*) FROM SAGA" + where, params)[0][0]

    def unpublished_count(self):
        """Events committed to OUTBOX that no relay has published yet."""
        return self.db.query("SELECT COUNT(*) FROM OUTBOX WHERE published_at IS NULL")[0][0]

    def busy_count(self):
        """What the system still has to do: sagas running or compensating, and (in a
        choreography) events not yet published."""
        return self.active_count() + (self.unpublished_count() if self.choreography else 0)

    def key_sagas(self):
        """{Idempotency-Key: the saga it made} for this run's keys."""
        return {bytes(k).decode(): sid for k, sid in self.db.query(
            "SELECT idem_key, saga_id FROM START_KEY WHERE idem_key LIKE %s",
            ((self.key_prefix + "%").encode(),))}

    # -- at quiet

    def check(self, answers, money_tables=()):
        where, params = self.scope()
        sagas = {}
        for sid, status, rejected, label, kind, data, results, reason, mode, transport in \
                self.db.query("SELECT id, status, rejected, label, type, input, results, "
                              "reason, mode, transport FROM SAGA" + where, params):
            sagas[sid] = {"status": status, "rejected": bool(rejected), "label": label,
                          "type": kind, "input": json.loads(data),
                          "results": json.loads(results or "{}"), "reason": reason or "",
                          "run_as": (mode, transport)}
        ledger = defaultdict(list)     # saga id -> [(service, op, state, request, answer)]
        for sid, service, op, state, request, answer in self.db.query(
                "SELECT saga_id, service, op, state, request, answer FROM STEP_LEDGER"):
            if sid in sagas:
                ledger[sid].append((service, op, state, json.loads(request) if request
                                    else None, json.loads(answer) if answer else None))
        last_event = {}
        for sid, status in self.db.query("SELECT saga_id, status FROM SAGA_LOG "
                                         "WHERE service = 'SAGA' ORDER BY id"):
            last_event[sid] = status
        key_sagas = self.key_sagas()

        outcomes = Counter(saga["status"] for saga in sagas.values())
        for saga in sagas.values():
            self.outcomes_by_type[saga["type"]][saga["status"]] += 1
            if saga["status"] == "COMPENSATED" and saga["rejected"]:
                self.refusals_by_type[saga["type"]][reason_kind(saga["reason"])] += 1
        for sid, saga in sagas.items():
            self.check_steps(sid, saga, ledger[sid])
            status = saga["status"]
            if status in ("COMPLETED", "COMPENSATED", "FAILED") and last_event.get(sid) != status:
                self.violation(f"saga {sid} is {status} but its last SAGA_LOG event is "
                               f"{last_event.get(sid)}", sid)
        if not self.shared:
            self.check_orphan_steps()
            self.check_keys(sagas, key_sagas)
        self.check_invariants()
        self.read_balances(money_tables)
        if self.run_as:
            self.check_run_as(sagas)
        if self.choreography:
            self.check_events()
        # What the clients were told.
        told = defaultdict(set)
        for a in answers:
            self.check_answer(a, sagas, key_sagas)
            if a.saga is not None:
                told[(a.kind, a.index)].add(a.saga)
        for (kind, index), named in told.items():
            if len(named) > 1:
                self.violation(f"{kind} request #{index} was answered about {len(named)} "
                               f"sagas under one Idempotency-Key: {sorted(named)}",
                               sorted(named)[0])
        return outcomes

    def check_steps(self, sid, saga, entries):
        """All or nothing, step by step, as the services' ledgers saw it."""
        status, data, results = saga["status"], saga["input"], saga["results"]
        name = f"{saga['type']} {sid} ({saga['label']})"
        saga_type = self.types.get(saga["type"])
        if saga_type is None:
            return self.violation(f"{name} is of no registered type", sid)
        invoked = {(svc, op): (request, answer) for svc, op, state, request, answer in entries
                   if state == "invoked"}
        if status == "COMPLETED":
            steps = {(step.service(data), step.op): step for step in saga_type.steps}
            if set(invoked) != set(steps):
                self.violation(f"{name} COMPLETED but 'invoked' in STEP_LEDGER: "
                               f"{sorted(invoked) or 'nothing'} (its steps: {sorted(steps)})", sid)
            for (svc, op), step in steps.items():
                if (svc, op) not in invoked:
                    continue
                request, answer = invoked[(svc, op)]
                call = self.call_of(saga_type, step, svc, data, results)
                if call is not None and request != call:
                    self.violation(f"{name}: its step {step.name} at {svc} was called with "
                                   f"{request}, not {call}", sid)
                kept = results.get(step.name) or {}
                differs = {k: v for k, v in result_of(answer).items() if kept.get(k) != v}
                if differs:
                    self.violation(f"{name}: its step {step.name} at {svc} answered {differs}, "
                                   f"the saga holds {kept}", sid)
        elif status == "COMPENSATED":
            if invoked:
                self.violation(f"{name} COMPENSATED but STEP_LEDGER still holds "
                               f"{sorted(invoked)} 'invoked'", sid)
        elif status == "FAILED":
            if not saga_type.compensation_gives_up:
                self.violation(f"{name} FAILED, but its compensation is retried until it "
                               "succeeds", sid)
            elif not self.allow_failed:
                self.violation(f"{name} FAILED ('invoked': {sorted(invoked)}); a compensation "
                               "could not be made to succeed", sid)
        else:
            self.violation(f"{name} still {status} after the settle timeout (stuck)", sid)

    @staticmethod
    def call_of(saga_type, step, svc, data, results):
        """The fields the step's service should have recorded for its call (None if
        they cannot be worked out, e.g. a result the saga does not hold)."""
        ops = [o for o in saga_type.operations if o.name == step.op and svc in o.services]
        try:
            return ops[0].read(step.build(data, results))
        except Exception:
            return None

    def check_orphan_steps(self):
        """No service did a step for a saga that does not exist."""
        for svc, sid, op in self.db.query(
                "SELECT l.service, l.saga_id, l.op FROM STEP_LEDGER l LEFT JOIN SAGA s ON "
                "s.id = l.saga_id WHERE s.id IS NULL AND l.state = 'invoked' LIMIT 20"):
            self.violation(f"STEP_LEDGER: {svc} did {op} for saga {sid}, which does not exist")

    def check_keys(self, sagas, key_sagas):
        """Every saga was made by one Idempotency-Key of this run (one request, one saga)."""
        made = set(key_sagas.values())
        for sid, saga in sagas.items():
            if sid not in made:
                self.violation(f"{saga['type']} {sid} ({saga['label']}) was not made by any "
                               "Idempotency-Key of this run (a second saga for one request?)",
                               sid)

    def check_invariants(self):
        """Each registered type's own invariant, over the whole database."""
        if self.shared:
            others = self.db.query("SELECT COUNT(*) FROM SAGA WHERE status IN "
                                   "('RUNNING', 'COMPENSATING')")[0][0]
            if others:
                self.notes.append(f"the types' invariants not checked: {others} saga(s) of "
                                  "others still running (the run does not own the database)")
                return
        conn = self.db.connect()
        try:
            cur = conn.cursor(dictionary=True)
            for saga_type in self.types.values():
                for problem in saga_type.invariant(cur)[:50]:
                    self.violation(f"{saga_type.name} invariant: {problem}")
                self.invariants_checked.append(saga_type.name)
        finally:
            conn.close()

    def read_balances(self, tables):
        conn = self.db.connect()
        try:
            balances = read_balances(conn.cursor(), list(tables))
        finally:
            conn.close()
        for table, rows in balances.items():
            self.balances[table] = {
                "opening": {rid: str(o) for rid, (o, _) in rows.items()},
                "balances": {rid: str(b) for rid, (_, b) in rows.items()},
                "opening_total": str(sum(o for o, _ in rows.values())),
                "total": str(sum(b for _, b in rows.values()))}

    def check_run_as(self, sagas):
        """Every saga ran the way the run asked for (a choreography over RabbitMQ, or
        orchestrated over the transport given)."""
        wrong = Counter(saga["run_as"] for saga in sagas.values()
                        if saga["run_as"] != self.run_as)
        for (mode, transport), n in wrong.items():
            sid = next(s for s, saga in sagas.items() if saga["run_as"] == (mode, transport))
            self.violation(f"{n} saga(s) ran as {mode} over {transport}, not "
                           f"{self.run_as[0]} over {self.run_as[1]} (e.g. {sid})", sid)

    def check_events(self):
        """A choreography's events: every one published by quiet, none written twice,
        and no step done (or undone) twice by the services' reactions."""
        for sid, service, event, created in self.db.query(
                "SELECT saga_id, service, event, created_at FROM OUTBOX "
                "WHERE published_at IS NULL ORDER BY id LIMIT 20"):
            self.violation(f"OUTBOX: {service}'s event {event} of saga {sid} (written "
                           f"{created}) is still unpublished at quiet", sid)
        for sid, service, event, n in self.db.query(
                "SELECT saga_id, service, event, COUNT(*) FROM OUTBOX GROUP BY saga_id, "
                "service, event HAVING COUNT(*) > 1 LIMIT 20"):
            self.violation(f"OUTBOX: {service} wrote event {event} of saga {sid} {n} times", sid)
        for sid, service, step, action, n in self.db.query(
                "SELECT saga_id, service, step, action, COUNT(*) FROM SAGA_LOG WHERE service "
                "<> 'SAGA' AND action IN ('invoke', 'compensate') AND status = 'success' "
                "GROUP BY saga_id, service, step, action HAVING COUNT(*) > 1 LIMIT 20"):
            self.violation(f"SAGA_LOG: saga {sid}'s step {step} at {service} was "
                           f"{'done' if action == 'invoke' else 'undone'} {n} times", sid)
        for sid, service, event, n in self.db.query(
                "SELECT saga_id, service, event, COUNT(*) FROM SAGA_LOG WHERE action = "
                "'publish' GROUP BY saga_id, service, event HAVING COUNT(*) > 1 LIMIT 20"):
            self.violation(f"SAGA_LOG: {service} logged publishing {event} of saga {sid} "
                           f"{n} times (an OUTBOX row claimed twice)", sid)
        for sid, events in self.db.query(
                "SELECT saga_id, GROUP_CONCAT(status ORDER BY id) FROM SAGA_LOG WHERE service "
                "= 'SAGA' AND status IN ('COMPLETED', 'COMPENSATED', 'FAILED') GROUP BY "
                "saga_id HAVING COUNT(*) > 1 LIMIT 20"):
            self.violation(f"SAGA_LOG: saga {sid} settled more than once: {events}", sid)

    def check_answer(self, a, sagas, key_sagas):
        """What a client was told is true: the saga it names was made from what it sent,
        by its key, and its status and HTTP code agree with how the saga ended."""
        said = f"answer {a.code} {a.status} to {a.kind} request #{a.index}"
        if a.code is None or (a.code == 503 and a.saga is None):
            return
        if a.saga is None:
            return self.violation(f"{said} ({a.url}) carried no saga id: {a.error}")
        if a.saga not in sagas:
            return self.violation(f"{said}: saga {a.saga} is not in the database", a.saga)
        saga = sagas[a.saga]
        status, rejected = saga["status"], saga["rejected"]
        saga_type = self.types[a.kind]
        try:
            sent = saga_type.read_input(a.sent)
        except Exception as exc:
            sent = f"{a.sent} (unreadable: {exc})"
        if saga["type"] != a.kind or saga["input"] != sent:
            self.violation(f"{said}: saga {a.saga} is {saga['type']} {saga['input']}, not "
                           f"the {a.kind} {sent} that was sent", a.saga)
        if key_sagas.get(a.key) != a.saga:
            self.violation(f"{said}: its Idempotency-Key made saga "
                           f"{key_sagas.get(a.key)}, not {a.saga}", a.saga)
        if a.code == 200:
            if a.status != "COMPLETED":
                self.violation(f"{said}: 200 with status {a.status}", a.saga)
            if status != "COMPLETED":
                self.violation(f"{said}: the client was told COMPLETED but saga {a.saga} "
                               f"is {status}", a.saga)
            elif a.results is not None and a.results != saga["results"]:
                self.violation(f"{said}: told the results {a.results}, the saga holds "
                               f"{saga['results']}", a.saga)
        elif a.code == 202:
            if a.status not in ACTIVE:
                self.violation(f"{said}: 202 with status {a.status}", a.saga)
        elif a.code == 409:
            if a.status != "COMPENSATED":
                self.violation(f"{said}: 409 with status {a.status}", a.saga)
            if status != "COMPENSATED" or not rejected:
                self.violation(f"{said}: saga {a.saga} is {status} (rejected={rejected})", a.saga)
        elif a.code == 502:
            if a.status not in ("COMPENSATED", "FAILED"):
                self.violation(f"{said}: 502 with status {a.status}", a.saga)
            if status not in ("COMPENSATED", "FAILED"):
                self.violation(f"{said}: saga {a.saga} is {status}", a.saga)
        else:
            self.violation(f"{said}: unexpected HTTP {a.code}: {a.error}", a.saga)

    def dump(self, sid):
        out = []
        rows = self.db.query("SELECT id, type, label, input, status, step, attempt, "
                             "failed_step, reason, rejected, lease_owner, lease_until, fence, "
                             "created_at, updated_at FROM SAGA WHERE id = %s", (sid,))
        out.append(f"  SAGA {rows[0] if rows else None}")
        saga_type = self.types.get(rows[0][1]) if rows else None
        for t in saga_type.tables if saga_type else ():
            if "saga_id" in self.db.columns(t):
                out.append(f"  {t}: {self.db.query(f'SELECT * FROM {t} WHERE saga_id = %s', (sid,))}")
        out.append("  STEP_LEDGER:")
        for r in self.db.query("SELECT service, op, state, request, answer, created_at, "
                               "updated_at FROM STEP_LEDGER WHERE saga_id = %s", (sid,)):
            out.append("    " + " | ".join(str(v) for v in r))
        out.append("  SAGA_LOG:")
        for r in self.db.query("SELECT id, created_at, service, action, step, attempt, status, "
                               "http_status, elapsed_ms, event, message FROM SAGA_LOG "
                               "WHERE saga_id = %s ORDER BY id", (sid,)):
            out.append("    " + " | ".join(str(v) for v in r))
        outbox = self.db.query("SELECT id, service, event, created_at, published_at FROM OUTBOX "
                               "WHERE saga_id = %s ORDER BY id", (sid,))
        if outbox:
            out.append("  OUTBOX:")
            for r in outbox:
                out.append("    " + " | ".join(str(v) for v in r))
        return "\n".join(out)
