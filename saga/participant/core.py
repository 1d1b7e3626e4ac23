"""The participant: how a service runs one invoke or compensation of a saga step,
whatever carried the call (HTTP, a Kafka command, a RabbitMQ event). Every call is
idempotent by (saga, operation) and a compensation is final, both decided by the
database's ledger key, not by Python; a repeated call is answered from the ledger before
any business rule or injected fault, so a refusal can never follow a commit."""

import logging
import threading
from dataclasses import dataclass

import mysql.connector
from mysql.connector import errorcode

from saga import metrics, tracing
from saga.common import Database, Settings
from saga.faults import FAIL, OFF, REFUSE, FaultMode, FaultStore
from saga.participant.ledger import COMPENSATED, INVOKED, REFUSED, Ledger
from saga.participant.operations import Operation, Refusal
from saga.validation import ApiError, reject_unknown_fields, saga_id_field

log = logging.getLogger("saga")


@dataclass(frozen=True)
class Answer:
    """What to answer, and the fault to strike once it is decided (its after_commit:
    a crash or a dropped answer, so the caller never hears it)."""
    status: int
    body: dict
    after: FaultMode = OFF


class Participant:
    def __init__(self, service: str, operations, db: Database, faults: FaultStore,
                 settings: Settings):
        self.service, self.db, self.faults, self.settings = service, db, faults, settings
        self.operations = {op.name: op for op in operations}
        self.default_op = operations[0].name   # the seed's /invoke names no operation
        self.ledger = Ledger(service)
        self.in_flight = InFlight()
        self.status = {}   # name -> callable: what /health adds (e.g. the Kafka worker's)

    def serving(self, parent: str | None, action: str, fields: dict, kind=tracing.SERVER,
                **more):
        """The span of one call or event this service serves: a child of its caller's."""
        op = fields.get("op", self.default_op)
        # A span's name is what a tracing backend groups by: never a request's junk.
        known = isinstance(op, str) and op in self.operations
        name = f"{action} {self.service} {op if known else 'unknown-op'}"
        return tracing.span(name, parent, kind,
                            **{"saga.id": str(fields.get("saga_id"))[:64],
                               "saga.service": self.service, "saga.op": str(op)[:64],
                               "saga.action": action, **more})

    def operation(self, fields: dict) -> Operation:
        name = fields.get("op", self.default_op)
        if not isinstance(name, str) or name not in self.operations:
            raise ApiError(f"op must be one of {', '.join(self.operations)} at service "
                           f"{self.service}, not {name!r}", "op")
        return self.operations[name]

    # -- invoke ------------------------------------------------------------------------

    @metrics.participant_call("invoke")
    def invoke(self, fields: dict, on_commit=None, on_refusal=None) -> Answer:
        """Run the step once. `on_commit(cur, answer)` and `on_refusal(cur, answer)` run
        inside the transaction that records the outcome (a choreography writes its next
        event there); a repeated call is answered from the ledger and runs neither."""
        saga_id = saga_id_field(fields)
        op = self.operation(fields)
        values = op.read(fields)
        reject_unknown_fields(fields, {"saga_id", "op", *op.fields})
        if self.faults.armed("invoke"):
            # A repeat is answered before an injected fault can strike it. Without one,
            # the transaction below finds the repeat by its ledger key just the same.
            known = self._replay(saga_id, op, values)
            if known is not None:
                return known
        mode, fault = self.faults.next_fault("invoke")
        verdict = mode.before(fault, self.settings.read_timeout)
        if verdict == FAIL or (verdict == REFUSE and not op.refuses):
            return injected_failure(fault)
        if verdict == REFUSE:
            return self._refuse(saga_id, op, values,
                                Refusal("rejected: injected business rejection"), on_refusal)

        def work(cur):
            # The business write first, then its ledger entry with the answer. A repeat
            # collides on a unique key (the ledger's, or the business table's) once the
            # first call has committed, and is answered from the ledger after this
            # transaction is rolled back.
            answer = {"status": "success", "saga_id": saga_id, "op": op.name}
            try:
                if op.insert and on_commit is None:
                    # One INSERT answered by its row id: all of it in one round trip.
                    answer[op.id_name] = self.ledger.record_with_insert(
                        cur, op.insert(saga_id, values), saga_id, op.name, values, answer,
                        op.id_name)
                    return Answer(200, answer)
                answer.update(op.apply(cur, saga_id, values))
                # Without more to write, the entry and the COMMIT go in one round trip.
                self.ledger.record(cur, saga_id, op.name, values, answer,
                                   commit=on_commit is None)
            except mysql.connector.IntegrityError as exc:
                refused = op.refusal(exc, values)
                if refused:
                    raise refused from None
                if exc.errno != errorcode.ER_DUP_ENTRY:
                    raise
                raise Repeat() from None
            if on_commit:
                on_commit(cur, answer)
            return Answer(200, answer)

        try:
            # A retry after a COMMIT that was cut off finds its own ledger entry and
            # replays it, so even that is safe to run again.
            answer = self.db.run(work, idempotent=True)
        except Repeat:
            answer = self._replay(saga_id, op, values) or Answer(
                503, {"error": "the step's first call left no ledger entry; try again"})
        except Refusal as refusal:
            return self._refuse(saga_id, op, values, refusal, on_refusal)
        if answer.status == 200:
            return Answer(answer.status, answer.body, mode)
        return answer

    def _refuse(self, saga_id: str, op: Operation, values: dict, refusal: Refusal,
                on_refusal=None) -> Answer:
        """Record the refusal, so that a repeat of the call is refused again and a late
        copy of it can never write."""
        body = {"status": "refused", "saga_id": saga_id, "op": op.name,
                "error": refusal.message, "ledger": REFUSED}
        if refusal.field:
            body["field"] = refusal.field

        def work(cur):
            try:
                self.ledger.record_refusal(cur, saga_id, op.name, values, body)
            except mysql.connector.IntegrityError as exc:
                if exc.errno != errorcode.ER_DUP_ENTRY:
                    raise
                return self._replay(saga_id, op, values, cur)
            if on_refusal:
                on_refusal(cur, body)
            return Answer(422, body)

        return self.db.run(work, idempotent=True)

    def _replay(self, saga_id: str, op: Operation, values: dict, cur=None) -> Answer | None:
        """The answer to a call this service has seen before (None if it has not)."""
        if cur is None:
            with self.db.transaction() as cur:
                entry = self.ledger.find(cur, saga_id, op.name)
        else:
            entry = self.ledger.find(cur, saga_id, op.name, "LOCK IN SHARE MODE")
        if entry is None:
            return None
        if entry["state"] == COMPENSATED:
            return Answer(409, {"status": "compensated", "saga_id": saga_id, "op": op.name,
                                "ledger": COMPENSATED,
                                "error": f"saga {saga_id} was already compensated at "
                                         f"{self.service} ({op.name}); a late invoke writes "
                                         "nothing"})
        first = entry["request"] or {}
        differs = sorted(k for k in set(first) | set(values) if first.get(k) != values.get(k))
        if differs:
            return Answer(409, {"status": "conflict", "saga_id": saga_id, "op": op.name,
                                "field": differs[0],
                                "error": f"saga {saga_id} already called {op.name} at "
                                         f"{self.service} with other values: "
                                         f"{', '.join(differs)} differ from the first call"})
        if entry["answer"] is None:  # claimed by a transaction that has not finished
            return Answer(503, {"error": "the first call for this step is still running"})
        if entry["state"] == INVOKED:
            return Answer(200, entry["answer"])
        return Answer(422, {**entry["answer"], "ledger": REFUSED})

    # -- compensate --------------------------------------------------------------------

    @metrics.participant_call("compensate")
    def compensate(self, fields: dict, on_commit=None) -> Answer:
        """Undo the step (or make sure it never happens). `on_commit(cur, answer)` runs
        inside the transaction that records it, not for a repeat."""
        saga_id = saga_id_field(fields)
        op = self.operation(fields)
        reject_unknown_fields(fields, {"saga_id", "op"})
        if op.undo is None:
            return Answer(409, {"status": "refused", "saga_id": saga_id, "op": op.name,
                                "error": f"{op.name} is final and is never undone"})
        if self.faults.armed("compensate"):
            done = self._compensated(saga_id, op)
            if done is not None:
                return done
        mode, fault = self.faults.next_fault("compensate")
        verdict = mode.before(fault, self.settings.read_timeout)
        if verdict == FAIL:
            return injected_failure(fault)
        if verdict == REFUSE:
            return Answer(422, {"error": "rejected: injected rejection of a compensation",
                                "fault": fault})

        def work(cur):
            nothing = {"status": "compensated", "saga_id": saga_id, "op": op.name,
                       "removed": 0, "undone": "nothing to undo"}
            if self.ledger.place_tombstone(cur, saga_id, op.name, nothing):
                answer = nothing
            else:
                entry = self.ledger.find(cur, saga_id, op.name, "FOR UPDATE")
                if entry["state"] == COMPENSATED:
                    return Answer(200, entry["answer"] or nothing)
                answer = nothing
                if entry["state"] == INVOKED:
                    answer = {**nothing,
                              **op.undo(cur, saga_id, entry["request"], entry["answer"])}
                self.ledger.mark_compensated(cur, saga_id, op.name, answer)
            if on_commit:
                on_commit(cur, answer)
            return Answer(200, answer)

        answer = self.db.run(work, idempotent=True)
        return Answer(answer.status, answer.body, mode)

    def give_up(self, saga_id: str, op_name: str, on_commit) -> bool:
        """A step that kept failing before it could commit: make sure it never will (a
        tombstone), and run `on_commit(cur)` in that transaction. False if the step has
        an outcome already (it committed, was refused or was undone meanwhile)."""
        def work(cur):
            gave_up = {"status": "compensated", "saga_id": saga_id, "op": op_name,
                       "removed": 0, "undone": "gave up before it ran"}
            if not self.ledger.place_tombstone(cur, saga_id, op_name, gave_up):
                return False
            on_commit(cur)
            return True

        return self.db.run(work, idempotent=False)

    def _compensated(self, saga_id: str, op: Operation) -> Answer | None:
        with self.db.transaction() as cur:
            entry = self.ledger.find(cur, saga_id, op.name)
        if entry is not None and entry["state"] == COMPENSATED:
            return Answer(200, entry["answer"])
        return None


def injected_failure(fault: dict) -> Answer:
    return Answer(500, {"error": "injected failure before the transaction", "fault": fault})


class Repeat(Exception):
    """The call collided with an earlier one of the same step: answer from the ledger."""


class InFlight:
    """How many calls this process is serving: lets a test or an operator see that a
    hung call has finished (and so whether a late write could still land)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def __enter__(self):
        with self._lock:
            self.count += 1

    def __exit__(self, *exc):
        with self._lock:
            self.count -= 1
