"""Choreographed sagas: the same saga definitions, run by the services reacting to each
other's events, with no orchestrator in the path. Any saga type that declares
`choreography` (its start path at the first step's service) runs this way; each
step's service must not depend on the input, since queues are bound in advance.

Events are named <saga type>.<operation>.<done|failed|undone>, unless the type renames
them (the order uses the seed's order.created, order.fulfilled, order.rejected). For
the registration: A's POST /register stores the user and publishes
registration.user.done; B reacts with the address and registration.address.done; C
with the payment and registration.payment.done; A, hearing that, marks the saga
COMPLETED. A refusal at C, or a handler that still fails after SAGA_MAX_ATTEMPTS
deliveries, publishes registration.payment.failed: B undoes the address and publishes
registration.address.undone, and A undoes the user and marks the saga COMPENSATED. A
pivot (a retriable step) is redelivered until it succeeds; only its refusal fails it.

Each reaction commits its business change, its SAGA_LOG row and its next event in one
transaction (the event goes to OUTBOX, see saga/participant/events.py); the participant's
ledger makes every reaction idempotent and every undo final, as in orchestration. The
SAGA row of a choreographed saga is kept by the services that learn its news: the
first step's service creates and finishes it, the service that gives up marks it
COMPENSATING."""

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import mysql.connector
from mysql.connector import errorcode

from saga import tracing
from saga import metrics
from saga.common import Settings, backoff_delay
from saga.logs import saga_context
from saga.participant.core import Participant
from saga.participant.events import (Consumer, DeadLetters, Outbox, Relay, RetryMover,
                                     Unreadable, queue_type)
from saga.answers import answer_from_store
from saga.definitions import SAGA_TYPES
from saga.errors import KnownStart
from saga.model import ACTIVE, SagaType, Status, StepKind
from saga.store import LogEntry, SagaStore, insert_log, saga_event
from saga.validation import ApiError

log = logging.getLogger("saga")

DONE, FAILED, UNDONE = "done", "failed", "undone"


def event_name(saga_type: SagaType, step: int, outcome: str) -> str:
    """<type>.<op>.<outcome>, or the name the type's protocol gives that event."""
    name = f"{saga_type.name}.{saga_type.steps[step].op}.{outcome}"
    return saga_type.choreography.events.get(name, name)


@dataclass(frozen=True)
class Reaction:
    kind: str      # "invoke" (run my step), "compensate" (undo it) or "finish" (complete)
    step: int


def step_service(saga_type: SagaType, step: int) -> str:
    # A choreography's routes are fixed when the queues are bound, so each step's
    # service must not depend on the input (true of the registration and the order).
    return saga_type.steps[step].service({})


def reactions(saga_type: SagaType, service: str) -> dict[str, Reaction]:
    """Which events `service` reacts to, and how, derived from the definition."""
    last = len(saga_type.steps) - 1
    out = {}
    for k in range(len(saga_type.steps)):
        if step_service(saga_type, k) != service:
            continue
        if k > 0:
            out[event_name(saga_type, k - 1, DONE)] = Reaction("invoke", k)
        if k < last and saga_type.steps[k].kind != StepKind.RETRIABLE:
            out[event_name(saga_type, k + 1, FAILED)] = Reaction("compensate", k)
            out[event_name(saga_type, k + 1, UNDONE)] = Reaction("compensate", k)
    if step_service(saga_type, 0) == service:
        out[event_name(saga_type, last, DONE)] = Reaction("finish", last)
    return out


def bindings(saga_types) -> dict[str, list[str]]:
    """Each service's routing keys: the events it reacts to, of every type."""
    out: dict[str, set] = {}
    for saga_type in saga_types:
        for k in range(len(saga_type.steps)):
            service = step_service(saga_type, k)
            out.setdefault(service, set()).update(reactions(saga_type, service))
    return {service: sorted(keys) for service, keys in sorted(out.items())}


def check_event(payload) -> None:
    """Unreadable unless the payload has the shape every event of ours has."""
    if not isinstance(payload, dict):
        raise Unreadable(f"an event is a JSON object, not {type(payload).__name__}")
    for name, kind in (("saga_id", str), ("type", str), ("input", dict), ("results", dict)):
        if not isinstance(payload.get(name), kind):
            raise Unreadable(f"{name} is missing or not a {kind.__name__}")
    if not 0 < len(payload["saga_id"]) <= 36:
        raise Unreadable("saga_id must be 1-36 characters")


def result_of(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("status", "saga_id", "op")}


class Choreography:
    """One service's part in the choreographed sagas of every type that has one:
    starting them (as the first step's service), and reacting to the events it is
    bound to."""

    def __init__(self, service: str, participant: Participant, settings: Settings,
                 saga_types):
        self.service, self.participant, self.settings = service, participant, settings
        self.types = {t.name: t for t in saga_types if t.choreography}
        self.db = participant.db
        self.store = SagaStore(self.db, f"service-{service}", settings.lease_seconds,
                               settings.compensate_for)
        self.reactions = {event: (t, reaction) for t in self.types.values()
                          for event, reaction in reactions(t, service).items()}
        self.bindings = bindings(self.types.values())
        self.settled: dict[str, threading.Event] = {}   # sagas a request here waits for
        self.stopping = threading.Event()
        self.relay = Relay(service, self.db, settings, self.bindings, self.stopping)
        self.dead = DeadLetters()
        participant.status["rabbitmq"] = lambda: {"dead_lettered": self.dead.count}

    def start_threads(self) -> None:
        self.relay.start()
        for n in range(self.settings.consumers):
            Consumer(self.service, self.settings, self.bindings, self.handle,
                     self.stopping, n, self.dead).start()
        if queue_type(self.settings) == "quorum":
            # quorum retry queues have no TTL: this process's mover empties them
            RetryMover(self.service, self.settings, self.bindings, self.stopping).start()

    def published(self, cur=None) -> None:
        """Wake the relay once the transaction holding a new event has committed."""
        self.relay.wake.set()

    # -- starting a saga ---------------------------------------------------------------

    def start(self, saga_type: SagaType, data: dict, key: str | None,
              request_hash: str | None) -> tuple:
        """Run the first step and publish its event, all in one transaction with the
        SAGA row. Returns (saga, Answer of the step)."""
        step = saga_type.steps[0]
        if key is not None:
            known = self.store.find_start_key(key)
            if known is not None:
                raise KnownStart(known["saga_id"], known["request_hash"] == request_hash)
        saga_id = str(uuid.uuid4())
        saga = self.store.new_saga(saga_id, saga_type, data, "choreography", "rabbitmq")
        payload = {"saga_id": saga_id, "type": saga_type.name, "input": data, "results": {}}

        def begin(cur):
            if key is not None:
                self.store.insert_start_key(cur, key, request_hash, saga_id)
            self.store.insert_saga(cur, saga, owner=None)

        def on_commit(cur, answer):
            begin(cur)
            self.emit_done(saga_type, cur, payload, 0, answer, None, 1)

        ended = []   # the saga's end, when its first step is refused

        def on_refusal(cur, answer):
            begin(cur)
            self.log_call(saga_type, cur, saga_id, 0, "invoke", "rejected", answer["error"],
                          None, 1)
            reason = f"{step.name} rejected: {answer['error']}"
            ended[:] = [self.store.settle_choreographed(cur, saga_id, Status.COMPENSATED, 0,
                                                        step.name, reason, rejected=True)]
            insert_log(cur, [saga_event(saga_id, Status.COMPENSATING, f"undoing: {reason}"),
                             saga_event(saga_id, Status.COMPENSATED,
                                        f"nothing to undo: {step.name} wrote nothing")])

        fields = {"saga_id": saga_id, "op": step.op, **step.build(data, {})}
        # The first step fails like any handler may: it is tried again here, with
        # backoff, up to SAGA_MAX_ATTEMPTS, before the client is told to retry.
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                answer = self.participant.invoke(fields, on_commit, on_refusal)
            except mysql.connector.IntegrityError as exc:
                if key is None or exc.errno != errorcode.ER_DUP_ENTRY:
                    raise
                known = self.store.find_start_key(key)
                raise KnownStart(known["saga_id"],
                                 known["request_hash"] == request_hash) from None
            if answer.status < 500:
                break
            time.sleep(backoff_delay(self.settings.backoff_base, self.settings.backoff_max,
                                     attempt))
        if answer.status == 200:
            self.published()
        if answer.status in (200, 422):   # the SAGA row committed with the step's outcome
            metrics.saga_started(saga_type.name, saga.mode, saga.transport)
            metrics.saga_settled(ended[0] if ended else None)
        return saga, answer

    def wait(self, saga, seconds: float) -> dict:
        """The saga's outcome, once it is known or `seconds` have passed. The service
        that starts a saga also hears its end (it completes or undoes the first step), so
        the waiting request is woken by this process's consumer; it reads the database
        every half second too, for the end heard by another process of the service."""
        deadline = time.monotonic() + seconds
        settled = self.settled.setdefault(saga.id, threading.Event())
        try:
            while True:
                answer = self.answer_now(saga)
                left = deadline - time.monotonic()
                if answer["status"] not in ACTIVE or left <= 0:
                    return answer
                settled.wait(min(left, 0.5))
        finally:
            self.settled.pop(saga.id, None)

    def heard_end_of(self, saga_id: str) -> None:
        """Wake a request of this process waiting for the saga (once its end is saved)."""
        waiting = self.settled.get(saga_id)
        if waiting is not None:
            waiting.set()

    def answer_now(self, saga) -> dict:
        return answer_from_store(self.store, saga)

    # -- reacting to events ------------------------------------------------------------

    def handle(self, event: str, payload, attempt: int) -> str:
        check_event(payload)
        with self.participant.in_flight, saga_context(payload["saga_id"]):
            return self.react(event, payload, attempt)

    def react(self, event: str, payload: dict, attempt: int) -> str:
        saga_type, reaction = self.reactions.get(event, (None, None))
        if reaction is None or payload["type"] != saga_type.name:
            raise Unreadable(f"service {self.service} has no reaction to a "
                             f"{payload['type']} event {event}")
        tracing.annotate(**{"saga.type": saga_type.name, "saga.step": reaction.step + 1,
                            "saga.action": reaction.kind})
        if reaction.kind == "invoke":
            return self.run_step(saga_type, event, payload, reaction.step, attempt)
        if reaction.kind == "compensate":
            return self.undo_step(saga_type, event, payload, reaction.step, attempt)
        return self.finish(saga_type, event, payload)

    def run_step(self, saga_type: SagaType, event: str, payload: dict, k: int,
                 attempt: int) -> str:
        saga_id, step = payload["saga_id"], saga_type.steps[k]

        def on_commit(cur, answer):
            self.emit_done(saga_type, cur, payload, k, answer, event, attempt)

        def on_refusal(cur, answer):
            self.emit_failed(saga_type, cur, payload, k, answer["error"], True, event, attempt)

        try:
            fields = {"saga_id": saga_id, "op": step.op,
                      **step.build(payload["input"], payload["results"])}
            answer = self.participant.invoke(fields, on_commit, on_refusal)
        except (ApiError, KeyError) as exc:
            # The event cannot be turned into a valid call: that will not change on a
            # retry. Give up at once, as for a refusal.
            message = exc.message if isinstance(exc, ApiError) else f"missing {exc}"
            return self.give_up(saga_type, event, payload, k, f"bad event: {message}", True,
                                attempt)
        if answer.status == 200 or answer.status in (409, 422):
            # Done now, done before (a repeat), refused (its event is out) or given up.
            if answer.status == 200:
                self.published()
            return answer.after   # the fault to strike after the commit (OFF: none)
        message = answer.body.get("error", f"HTTP {answer.status}")
        # A pivot that may have committed is only ever retried, never given up.
        if attempt < (step.attempts or self.settings.max_attempts) \
                or step.kind == StepKind.RETRIABLE:
            self.note_failure(saga_type, saga_id, k, "invoke", message, event, attempt)
            return "retry"
        return self.give_up(saga_type, event, payload, k, f"failed {attempt} times: {message}",
                            False, attempt)

    def give_up(self, saga_type: SagaType, event: str, payload: dict, k: int, reason: str,
                rejected: bool, attempt: int) -> str:
        """Out of attempts: make sure the step never runs, and send the undo back."""
        def on_commit(cur):
            self.emit_failed(saga_type, cur, payload, k, reason, rejected, event, attempt)

        if self.participant.give_up(payload["saga_id"], saga_type.steps[k].op, on_commit):
            self.published()
        return "done"

    def undo_step(self, saga_type: SagaType, event: str, payload: dict, k: int,
                  attempt: int) -> str:
        saga_id, step = payload["saga_id"], saga_type.steps[k]
        ended = []

        def on_commit(cur, answer):
            self.log_call(saga_type, cur, saga_id, k, "compensate", "success",
                          f"compensated ({answer.get('undone')})", event, attempt)
            if k == 0:
                ended[:] = [self.store.settle_choreographed(cur, saga_id,
                                                            Status.COMPENSATED, 0)]
                if ended[0]:
                    insert_log(cur, [saga_event(saga_id, Status.COMPENSATED,
                                                "every step undone")])
            else:
                Outbox.add(cur, self.service, saga_id, event_name(saga_type, k, UNDONE),
                           payload)

        answer = self.participant.compensate({"saga_id": saga_id, "op": step.op}, on_commit)
        if answer.status == 200:
            self.published()
            if k == 0:
                metrics.saga_settled(ended[0] if ended else None)
                self.heard_end_of(saga_id)
            return answer.after   # the fault to strike after the commit (OFF: none)
        # An undo is retried, with backoff, until SAGA_COMPENSATE_FOR has passed since
        # the compensation began; then the saga is parked FAILED for an operator, whose
        # /retry sends this undo's event again (redrive_undo).
        message = answer.body.get("error", f"HTTP {answer.status}")
        if self.park_failed(saga_type, saga_id, k, message, event, attempt):
            return "done"
        self.note_failure(saga_type, saga_id, k, "compensate", message, event, attempt)
        return "retry"

    def park_failed(self, saga_type: SagaType, saga_id: str, k: int, message: str, heard: str,
                    attempt: int) -> bool:
        step = saga_type.steps[k]
        reason = f"compensation of {step.name} kept failing: {message}"

        def park(cur):
            settled = self.store.fail_overdue_choreographed(cur, saga_id, k, reason)
            if not settled:
                return None
            self.log_call(saga_type, cur, saga_id, k, "compensate", "failed", message, heard,
                          attempt)
            insert_log(cur, [saga_event(saga_id, Status.FAILED, f"{reason}; needs an operator")])
            return settled

        parked = self.db.run(park)
        if parked:
            metrics.saga_settled(parked)
            log.error("saga %s FAILED, needs an operator: %s", saga_id, reason)
            self.heard_end_of(saga_id)
        return parked is not None

    def finish(self, saga_type: SagaType, event: str, payload: dict) -> str:
        saga_id = payload["saga_id"]

        def complete(cur):
            settled = self.store.settle_choreographed(cur, saga_id, Status.COMPLETED,
                                                      len(saga_type.steps) - 1)
            if settled:
                self.store.save_results(cur, saga_id, payload["results"])
                insert_log(cur, [saga_event(saga_id, Status.COMPLETED,
                                            f"all steps committed (heard {event})")])
            return settled

        metrics.saga_settled(self.db.run(complete))
        self.heard_end_of(saga_id)
        return "done"

    # -- what each reaction writes -----------------------------------------------------

    def emit_done(self, saga_type: SagaType, cur, payload: dict, k: int, answer: dict, heard: str,
                  attempt: int) -> None:
        saga_id, step = payload["saga_id"], saga_type.steps[k]
        results = {**payload["results"], step.name: result_of(answer)}
        ids = ", ".join(f"{n}={v}" for n, v in result_of(answer).items())
        self.log_call(saga_type, cur, saga_id, k, "invoke", "success", f"committed ({ids})", heard,
                      attempt)
        self.store.note_step(cur, saga_id, min(k + 1, len(saga_type.steps) - 1))
        Outbox.add(cur, self.service, saga_id, event_name(saga_type, k, DONE),
                   {**payload, "results": results})

    def emit_failed(self, saga_type: SagaType, cur, payload: dict, k: int, reason: str,
                    rejected: bool, heard: str, attempt: int) -> None:
        saga_id, step = payload["saga_id"], saga_type.steps[k]
        self.log_call(saga_type, cur, saga_id, k, "invoke", "rejected" if rejected else "failed",
                      reason, heard, attempt)
        why = f"{step.name} {'rejected' if rejected else 'failed'}: {reason}"
        if self.store.settle_choreographed(cur, saga_id, Status.COMPENSATING, k, step.name,
                                           why, rejected):
            insert_log(cur, [saga_event(saga_id, Status.COMPENSATING, f"undoing: {why}")])
        Outbox.add(cur, self.service, saga_id, event_name(saga_type, k, FAILED),
                   {**payload, "failure": {"step": step.name, "reason": why,
                                           "rejected": rejected}})

    def log_call(self, saga_type: SagaType, cur, saga_id: str, k: int, action: str,
                 status: str, message: str, heard: str | None, attempt: int) -> None:
        insert_log(cur, [LogEntry(saga_id, self.service, status, message, k + 1,
                                  saga_type.steps[k].op, action, heard, attempt)])

    def note_failure(self, saga_type: SagaType, saga_id: str, k: int, action: str,
                     message: str, heard: str, attempt: int) -> None:
        """A failed attempt, logged on its own (nothing else was written)."""
        self.db.run(lambda cur: self.log_call(saga_type, 
            cur, saga_id, k, action, "failed", f"{message}; delivered again later", heard,
            attempt))


def redrive_undo(cur, store: SagaStore, saga_id: str) -> bool:
    """An operator's retry of a FAILED choreographed saga, in the caller's transaction:
    back to COMPENSATING, and the event that makes the service whose undo kept failing
    try it again goes to the outbox of the service that would have sent it. False if
    the saga is not a FAILED choreographed one."""
    row = store.retry_choreographed(cur, saga_id, "compensation retried by an operator")
    if row is None:
        return False
    saga_type, k = SAGA_TYPES[row["type"]], row["step"]
    payload = {"saga_id": saga_id, "type": saga_type.name, "input": row["input"],
               "results": row["results"]}
    Outbox.add(cur, step_service(saga_type, k + 1), saga_id,
               event_name(saga_type, k + 1, UNDONE), payload)
    insert_log(cur, [saga_event(saga_id, Status.COMPENSATING,
                                "compensation retried by an operator (its undo event sent again)")])
    return True
