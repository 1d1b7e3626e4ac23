"""What a client that started a saga is told: the answer's body and HTTP status, the same
for every way of starting one (/start, /sagas/start, /transfer, a choreographed
/register), always from what the database holds."""

import hashlib
import json
import time

import mysql.connector

from saga.common import UnsupportedServer
from saga.errors import KnownStart
from saga.model import ACTIVE, Saga, Status
from saga.store import SagaStore
from saga.validation import ApiError


def answer_of(saga: Saga) -> dict:
    body = {"saga": saga.id, "type": saga.type.name, "status": str(saga.status)}
    if saga.status != Status.COMPLETED:
        body.update(failed_step=saga.failed_step, reason=saga.reason)
    if saga.results:
        body["results"] = saga.results
    # Undone on purpose, not because something broke: a service said no, or an operator
    # compensated it (no step failed).
    body["_withdrawn"] = saga.rejected or saga.failed_step is None
    return body


def answer_code(answer: dict) -> int:
    """200 only for a completed saga; 202 still running; 409 undone because a service
    said no or an operator asked; 502 undone (or stuck FAILED) because a service kept
    failing."""
    status = answer["status"]
    if status in ACTIVE:
        return 202
    if status == Status.COMPLETED:
        return 200
    if status == Status.COMPENSATED and answer.get("_withdrawn"):
        return 409
    return 502


def request_hash(saga_type_name: str, data: dict) -> str:
    """What an Idempotency-Key is bound to: the saga type and its checked input."""
    return hashlib.sha256(json.dumps({"type": saga_type_name, "input": data},
                                     sort_keys=True).encode()).hexdigest()


def public(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if not k.startswith("_")}


def answer_from_store(store: SagaStore, saga: Saga) -> dict:
    """The saga as saved; if the database cannot be read, only what is known saved."""
    try:
        stored = store.load(saga.id)
    except (mysql.connector.Error, UnsupportedServer):
        stored = None
    if stored is None:
        return {"saga": saga.id, "type": saga.type.name, "status": str(saga.saved_status)}
    return answer_of(stored)


def poll_outcome(store: SagaStore, saga: Saga, deadline: float) -> dict:
    """Read the saga until it settles or the deadline (a saga driven elsewhere: by
    another orchestrator, or by the services' events)."""
    pause = 0.005
    while True:
        answer = answer_from_store(store, saga)
        if answer["status"] not in ACTIVE or time.monotonic() + pause > deadline:
            return answer
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def first_saga_of(known: KnownStart, store: SagaStore) -> Saga:
    """The saga an Idempotency-Key's first request made, for a repeat to answer about;
    422 when the key was used for another request, or its saga was purged since."""
    if not known.same_request:
        raise ApiError("this Idempotency-Key was already used for a different request "
                       f"(saga {known.saga_id})", "Idempotency-Key", status=422)
    first = store.load(known.saga_id)
    if first is None:
        raise ApiError(f"the saga of this Idempotency-Key ({known.saga_id}) was purged",
                       "Idempotency-Key", status=422)
    return first
