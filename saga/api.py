"""The orchestrator's web app: starts sagas of every registered type and drives them (over
HTTP or Kafka), serves the operations API, the OpenAPI document and ui.html. The demo's
orchestrator.py runs it with the demo's saga types; `python -m saga.api` runs it with
the types SAGA_TYPE_MODULES names."""

from saga.common import C_DRIVER  # noqa: F401  (first: it loads the database driver)

import base64
import binascii
import json
import os
import sys
import time

import urllib3
from flask import Blueprint, current_app, jsonify, request, send_file
from werkzeug.routing import BaseConverter

from saga.common import SERVICES, Database, load_settings
from saga import faults, metrics, tracing
from saga.faults import parse_fault
from saga.openapi import SPEC
from saga.participant.choreography import redrive_undo
from saga.answers import (answer_from_store, answer_of, first_saga_of, poll_outcome,
                          request_hash)
from saga.definitions import SAGA_TYPES
from saga.engine import Engine
from saga.errors import IllegalTransition, KnownStart
from saga.model import ACTIVE, MODES, STATES, Saga, Status, StepKind
from saga.recovery import start_recovery
from saga.store import iso, saga_event
from saga.transport import HttpTransport
from saga.serving import WaitingRoom, new_app, require_token, respond, serve
from saga.validation import (SAGA_ID, ApiError, idempotency_key, json_object,
                        query_choice, query_int, reject_unknown_fields)

# The page: SAGA_UI, or the one that comes with the library.
UI_FILE = os.environ.get("SAGA_UI") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "ui.html")
# Web threads kept free of requests that wait for a saga, so health checks, reads and
# operator actions are answered however many clients are waiting.
RESERVED_THREADS = 8
WEB_CONNECTIONS = 32


class Orchestrator:
    """What the routes share: the settings, the database, the engine."""

    def __init__(self, settings, start_background: bool):
        self.settings = settings
        # A connection for every driver, and for as many web threads at once as a
        # burst of starts and reads needs (a web thread holds one for a statement or
        # two; beyond that it waits briefly for one); 4 for heartbeat, recovery, retention.
        self.db = Database(settings, pool_size=settings.drivers + WEB_CONNECTIONS + 4)
        self.http = HttpTransport(settings, maxsize=settings.drivers + 8)
        transports = {"http": self.http}
        if settings.transport == "kafka":
            from saga.kafka_transport import KafkaTransport
            transports["kafka"] = KafkaTransport(settings)
        self.engine = Engine(settings, self.db, transports)
        self.waiting = WaitingRoom(settings.web_threads, RESERVED_THREADS)
        if start_background:
            self.engine.start_background()
            start_recovery(self.engine)

    def drive_and_answer(self, saga: Saga) -> dict:
        """Drive the new saga on this request's thread for up to SAGA_START_WAIT and
        answer from what the database holds: never from a state whose save failed or
        that another owner has since overwritten."""
        deadline = time.monotonic() + self.settings.start_wait
        done = self.engine.drive_for(saga, self.settings.start_wait)
        if done.status not in ACTIVE and done.saved_status == done.status:
            return answer_of(done)
        if time.monotonic() >= deadline:
            return self.answer_from_store(saga)
        # Taken over by another orchestrator or an operator: watch it finish.
        return self.poll_outcome(saga, deadline)

    def await_outcome(self, saga: Saga, future) -> dict:
        """Wait up to SAGA_START_WAIT for the saga to finish and answer from what the
        database holds: never from a state whose save failed or that another owner has
        since overwritten."""
        deadline = time.monotonic() + self.settings.start_wait
        try:
            done = future.result(timeout=self.settings.start_wait)
        except TimeoutError:
            return self.answer_from_store(saga)
        if done.status not in ACTIVE and done.saved_status == done.status:
            return answer_of(done)
        return self.poll_outcome(saga, deadline)

    def poll_outcome(self, saga: Saga, deadline: float) -> dict:
        return poll_outcome(self.engine.store, saga, deadline)

    def answer_from_store(self, saga: Saga) -> dict:
        return answer_from_store(self.engine.store, saga)


def orchestrator() -> Orchestrator:
    return current_app.extensions["orchestrator"]


# --- starting sagas --------------------------------------------------------------------

starting = Blueprint("starting", __name__)


def start_saga(saga_type, body: dict):
    """Validate, create (once per Idempotency-Key) and drive a saga; answer its outcome."""
    o = orchestrator()
    reject_unknown_fields(body, {f.name for f in saga_type.fields})
    data = saga_type.read_input(body)
    key = idempotency_key()
    # The saga's span: a caller's traceparent makes the saga part of the caller's trace.
    with o.waiting.seat(), tracing.span(f"saga {saga_type.name}",
                                        request.headers.get("traceparent"), tracing.SERVER,
                                        **{"saga.type": saga_type.name}) as span:
        try:
            saga = o.engine.create(saga_type, data, key, request_hash(saga_type.name, data))
        except KnownStart as known:
            first = first_saga_of(known, o.engine.store)
            span.set_attribute("saga.id", first.id)
            answer = o.poll_outcome(first, time.monotonic() + o.settings.start_wait)
            return respond(answer, repeated=True)
        span.set_attribute("saga.id", saga.id)
        return respond(o.drive_and_answer(saga))


@starting.post("/sagas/start")
def start_any():
    """Any saga type's fields with "saga_type" naming it; without it, the first
    registered type's (the registration's, as the seed's /start body)."""
    body = json_object()
    name = body.pop("saga_type", next(iter(SAGA_TYPES)))
    if not isinstance(name, str) or name not in SAGA_TYPES:
        raise ApiError(f"saga_type must be one of {', '.join(SAGA_TYPES)}", "saga_type")
    return start_saga(SAGA_TYPES[name], body)


def add_start_paths(blueprint: Blueprint) -> None:
    """A type's own start path (the registration's /start, the transfer's /transfer)."""
    for saga_type in SAGA_TYPES.values():
        if saga_type.start_path:
            blueprint.add_url_rule(
                saga_type.start_path, f"start_{saga_type.name}",
                (lambda t: lambda: start_saga(t, json_object()))(saga_type), methods=["POST"])


add_start_paths(starting)


# --- reading sagas ----------------------------------------------------------------------

reading = Blueprint("reading", __name__)


class SagaIdConverter(BaseConverter):
    """Any path segment but 'start', so /sagas/start stays the POST alias instead of also
    reading as the saga named 'start'."""
    regex = r"(?!start(?:/|$))[^/]+"


def check_saga_id(saga_id: str) -> None:
    """Ids are minted here as UUIDs; anything else cannot name a saga."""
    if not SAGA_ID.fullmatch(saga_id):
        raise ApiError(f"no saga with id {saga_id!r}", "saga_id", status=404)


def no_such_saga(saga_id: str) -> ApiError:
    return ApiError(f"no saga with id {saga_id!r}", "saga_id", status=404)


def saga_item(row: dict) -> dict:
    saga_type = SAGA_TYPES[row["type"]]
    steps = saga_type.steps
    current = None if row["status"] == Status.COMPENSATED else \
        steps[min(row["step"], len(steps) - 1)].name
    return {"id": row["id"], "type": row["type"], "mode": row["mode"],
            "transport": row["transport"], "status": row["status"], "current_step": current,
            "attempt": row["attempt"], "label": row["label"],
            "input": json.loads(row["input"]), "failed_step": row["failed_step"],
            "reason": row["reason"], "rejected": bool(row["rejected"]),
            "created_at": iso(row["created_at"]), "updated_at": iso(row["updated_at"])}


def log_item(row: dict) -> dict:
    return {**row, "created_at": iso(row["created_at"])}


@reading.get("/sagas")
def list_sagas():
    status = query_choice("status", STATES)
    saga_type = query_choice("type", tuple(SAGA_TYPES))
    mode = query_choice("mode", MODES)
    label = request.args.get("label")
    for typed in SAGA_TYPES.values():   # ?username=x: the registrations labelled x
        if typed.label_param and request.args.get(typed.label_param) is not None:
            saga_type, label = typed.name, request.args[typed.label_param]
    limit = query_int("limit", 50, 1, 500)
    offset = query_int("offset", 0, 0, 10_000_000)
    rows, more = orchestrator().engine.store.list_sagas(status, saga_type, label, mode,
                                                        limit, offset)
    return jsonify({"sagas": [saga_item(r) for r in rows], "limit": limit, "offset": offset,
                    "next_offset": offset + limit if more else None})


@reading.get("/sagas/<saga_id:saga_id>")
def get_saga(saga_id):
    check_saga_id(saga_id)
    row, log_rows = orchestrator().engine.store.get_saga(saga_id)
    if row is None:
        raise no_such_saga(saga_id)
    item = saga_item(row)
    item["results"] = json.loads(row["results"])
    log = [log_item(r) for r in log_rows]
    item["steps"] = step_stories(SAGA_TYPES[row["type"]], item, log)
    item["log"] = log
    return jsonify(item)


@reading.get("/sagas/<saga_id:saga_id>/status")
def saga_status(saga_id):
    check_saga_id(saga_id)
    row = orchestrator().engine.store.get_item(saga_id)
    if row is None:
        raise no_such_saga(saga_id)
    return jsonify(saga_item(row))


def step_stories(saga_type, item: dict, log: list[dict]) -> list[dict]:
    """Each step's forward and compensation story, folded from its SAGA_LOG rows; for an
    undone saga, why a step that ran was not undone: it was refused (it wrote nothing),
    never reached, or it is a pivot (never undone)."""
    undone = item["status"] in (Status.COMPENSATING, Status.COMPENSATED, Status.FAILED)
    out = []
    for number, step in enumerate(saga_type.steps, start=1):
        entry = {"name": step.name, "service": step.service(item["input"]), "op": step.op,
                 "kind": step.kind.value}
        for action in ("invoke", "compensate"):
            rows = [r for r in log if r["step"] == number and r["action"] == action]
            if rows:
                last = rows[-1]
                entry[action] = {"status": last["status"], "attempts": len(rows),
                                 "http_status": last["http_status"],
                                 "elapsed_ms": last["elapsed_ms"], "message": last["message"]}
        tried = entry.get("invoke")
        if undone and tried and "compensate" not in entry and step.name == item["failed_step"]:
            why = "pivot" if step.kind == StepKind.RETRIABLE else \
                "refused" if tried["status"] == "rejected" else "not_reached"
            entry["compensate"] = {"status": "skipped", "why": why, "attempts": 0}
        out.append(entry)
    return out


def describe_type(saga_type) -> dict:
    """What a client (the UI's forms, a tool) needs to start and show a saga type."""
    def service_of(step):
        try:
            return step.service({})
        except (KeyError, TypeError):
            return None   # it depends on the input (the transfer's accounts)

    return {
        "name": saga_type.name, "summary": saga_type.summary,
        "fields": [{"name": f.name, "required": f.required, **f.schema}
                   for f in saga_type.fields],
        "steps": [{"name": s.name, "service": service_of(s), "op": s.op, "kind": s.kind.value,
                   "attempts": s.attempts, "timeout": s.timeout} for s in saga_type.steps],
        "modes": ["orchestration"] + (["choreography"] if saga_type.choreography else []),
        "start_path": saga_type.start_path,
        "choreography_path": saga_type.choreography and saga_type.choreography.path,
        "colour": saga_type.colour, "example": saga_type.example,
        "views": {name: f"/saga-types/{saga_type.name}/views/{name}"
                  for name in saga_type.views}}


@reading.get("/saga-types")
def saga_types():
    """The registered types, and for each configured service the operations it runs."""
    return jsonify({"saga_types": [describe_type(t) for t in SAGA_TYPES.values()],
                    "services": {s: [{"type": t.name, "op": op.name}
                                     for t in SAGA_TYPES.values() for op in t.operations
                                     if s in op.services] for s in SERVICES}})


@reading.get("/log")
def log_tail():
    """SAGA_LOG for a live tail. First call without parameters (the newest rows), then
    pass back the `cursor` each answer gives: it brings the rows after the last one seen
    and any row that committed late with a lower id. `after=ID` starts after an id."""
    limit = query_int("limit", 100, 1, 1000)
    after, gaps = None, {}
    if request.args.get("cursor") is not None:
        after, gaps = read_cursor(request.args["cursor"])
    elif request.args.get("after") is not None:
        after = query_int("after", 0, 0, 2 ** 62)
    rows, after, gaps = orchestrator().engine.store.tail_log(after, gaps, limit)
    return jsonify({"log": [log_item(r) for r in rows], "cursor": make_cursor(after, gaps)})


def make_cursor(after: int, gaps: dict) -> str:
    raw = json.dumps({"a": after, "g": [[g, int(born)] for g, born in gaps.items()]},
                     separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def read_cursor(text: str):
    try:
        raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        after = int(raw["a"])
        gaps = {int(g): float(born) for g, born in raw["g"]}
        if after < 0 or len(gaps) > 1000:
            raise ValueError(after)
        return after, gaps
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
        raise ApiError("cursor is not one this API gave out", "cursor") from None


# --- operator actions --------------------------------------------------------------------

operating = Blueprint("operating", __name__)


def past_pivot(saga: Saga) -> bool:
    """A saga whose retriable step may have committed can no longer be undone."""
    steps = saga.type.steps
    if saga.status == Status.COMPLETED:
        return any(s.kind == StepKind.RETRIABLE for s in steps)
    return saga.status == Status.RUNNING and saga.current.kind == StepKind.RETRIABLE


@operating.post("/sagas/<saga_id:saga_id>/compensate")
def compensate(saga_id):
    require_token(orchestrator().settings)

    def decide(saga, lease_live):
        if saga.status in (Status.COMPENSATED, Status.COMPENSATING):
            return []
        if past_pivot(saga):
            raise ApiError(f"saga {saga.id} is past its point of no return "
                           f"({saga.current.name} may have committed): it can only go "
                           "forward", status=409)
        if saga.status == Status.COMPLETED:
            saga.step, saga.touched = len(saga.type.steps) - 1, True
        if saga.status == Status.RUNNING:
            saga.touched = True  # its current call may be in flight
        saga.status, saga.attempt = Status.COMPENSATING, 1
        saga.reason = "compensation requested by an operator"
        return [saga_event(saga.id, Status.COMPENSATING, saga.reason)]

    return operator_action(saga_id, decide)


@operating.post("/sagas/<saga_id:saga_id>/retry")
def retry(saga_id):
    require_token(orchestrator().settings)
    check_saga_id(saga_id)
    o = orchestrator()
    if o.db.run(lambda cur: redrive_undo(cur, o.engine.store, saga_id)):
        # A choreographed saga: the services carry its undo on; watch it finish.
        saga = o.engine.store.load(saga_id)
        with o.waiting.seat_if_free() as seated:
            answer = o.poll_outcome(saga, time.monotonic() + (
                o.settings.start_wait if seated else 0))
        return respond(answer, 202 if answer["status"] in ACTIVE else 200)

    def decide(saga, lease_live):
        if saga.status == Status.FAILED:
            saga.status, saga.attempt = Status.COMPENSATING, 1
            saga.reason = (saga.reason or "") + " (retried by an operator)"
            return [saga_event(saga.id, Status.COMPENSATING,
                               "compensation retried by an operator")]
        if saga.status in ACTIVE and not lease_live:
            if saga.status == Status.RUNNING:
                saga.touched = True   # the call its dead owner was making may have landed
            return [saga_event(saga.id, saga.status, "resumed by an operator")]
        if saga.status in ACTIVE:
            raise ApiError(f"saga {saga.id} is {saga.status} and being driven; nothing to "
                           "retry", status=409)
        raise ApiError(f"saga {saga.id} is {saga.status}; only a FAILED or stuck saga can "
                       "be retried", status=409)

    return operator_action(saga_id, decide)


def operator_action(saga_id: str, decide):
    """Take the saga for the operator when `decide` changes it, drive it, and wait for
    its outcome if a seat in the waiting room is free; if none is, answer 202 at once
    (an action on an existing saga piles nothing up, so it is never refused for want of
    a seat). A choreographed saga is refused before anything is written."""
    check_saga_id(saga_id)
    o = orchestrator()

    def decide_orchestrated(saga, lease_live):
        if saga.mode != "orchestration":
            raise ApiError(f"saga {saga_id} is choreographed by the services; the "
                           "orchestrator only reads it, and retries it once it is FAILED",
                           status=409)
        return decide(saga, lease_live)

    with o.waiting.seat_if_free() as seated:
        try:
            saga, taken = o.engine.store.take_for_operator(saga_id, decide_orchestrated)
        except IllegalTransition as exc:
            raise ApiError(str(exc), status=409) from None
        if saga is None:
            raise no_such_saga(saga_id)
        if taken and seated:
            answer = o.await_outcome(saga, o.engine.run(saga))
        else:
            answer = answer_of(saga)   # before a driver thread changes it
            if taken:
                o.engine.run(saga)
    return respond(answer, 202 if answer["status"] in ACTIVE else 200)


# --- services: faults, types' reads ---------------------------------------------------------

services = Blueprint("services", __name__)


def service_call(service: str, method: str, path: str, body=None, timeout=None) -> dict:
    o = orchestrator()
    try:
        _, payload = o.http.request(method, o.settings.service_urls[service] + path, body,
                                    timeout)
        problem = "answer was not JSON"
    except urllib3.exceptions.HTTPError as exc:
        payload, problem = None, exc.__class__.__name__
    if not isinstance(payload, dict):
        return {"service": service, "status": "down",
                "error": f"service {service} unreachable: {problem}"}
    return payload


def known_service(service: str) -> str:
    if service not in SERVICES:
        raise ApiError(f"no service {service!r}; expected {', '.join(SERVICES)}", "service",
                       status=404)
    return service


@services.get("/faults")
def get_faults():
    return jsonify({s: service_call(s, "GET", "/faults") for s in SERVICES})


@services.put("/faults/<service>")
def put_faults(service):
    require_token(orchestrator().settings)
    known_service(service)
    fault = parse_fault(json_object())
    answer = service_call(service, "PUT", "/faults", fault)
    return jsonify(answer), 502 if "error" in answer else 200


@services.get("/saga-types/<name>/views/<view>")
def type_view(name, view):
    """A saga type's read at the service that holds it (the order's customers at B),
    passed on so a page that talks only to the orchestrator can show it."""
    saga_type = SAGA_TYPES.get(name)
    if saga_type is None or view not in saga_type.views:
        raise ApiError(f"no view {view!r} of saga type {name!r}", "view", status=404)
    service, path = saga_type.views[view]
    quick = urllib3.Timeout(connect=orchestrator().settings.connect_timeout, read=2)
    answer = service_call(service, "GET", path, timeout=quick)
    return jsonify(answer), 502 if answer.get("status") == "down" else 200


class OrchestratorReads:
    """What a saga type's own reads at the orchestrator may use (its
    orchestrator_routes): the configured services, a quick GET at one of them (a dict;
    {"status": "down", "error": ...} when it does not answer), the saga store."""
    services = SERVICES

    def get(self, service: str, path: str) -> dict:
        quick = urllib3.Timeout(connect=orchestrator().settings.connect_timeout, read=2)
        return service_call(service, "GET", path, timeout=quick)

    @property
    def store(self):
        return orchestrator().engine.store


for _type in SAGA_TYPES.values():
    if _type.orchestrator_routes:
        services.register_blueprint(_type.orchestrator_routes(OrchestratorReads()))


@services.get("/fault-modes")
def fault_modes():
    """What each fault mode a service can be set to does (the UI's fault panel)."""
    return jsonify({"modes": [{"name": m.name, "description": m.description,
                               "strikes": m.strikes, "commits": m.commits}
                              for m in faults.MODES.values()]})


# --- health, spec, UI --------------------------------------------------------------------

basics = Blueprint("basics", __name__)


@basics.get("/health")
def health():
    o = orchestrator()
    up = o.db.ping()
    body = {"service": "orchestrator", "status": "ok" if up else "degraded",
            "database": "up" if up else "down", "owner": o.engine.owner,
            "active_sagas": len(o.engine.active_ids()),
            "waiting_sagas": o.engine.waiting_count(), "transport": o.settings.transport}
    if request.args.get("all"):
        quick = urllib3.Timeout(connect=o.settings.connect_timeout, read=2)
        body["services"] = {s: service_call(s, "GET", "/health", timeout=quick)
                            for s in SERVICES}
    return jsonify(body), 200 if up else 503


@basics.get("/openapi.json")
def openapi():
    return jsonify(SPEC)


@basics.get("/")
@basics.get("/ui.html")
def ui():
    return send_file(UI_FILE, mimetype="text/html", max_age=0)


def create_app(settings=None, start_background: bool = True):
    settings = settings or load_settings()
    tracing.setup("saga-orchestrator")
    app = new_app("orchestrator")
    app.url_map.converters["saga_id"] = SagaIdConverter
    app.extensions["orchestrator"] = Orchestrator(settings, start_background)
    for blueprint in (starting, reading, operating, services, basics):
        app.register_blueprint(blueprint)
    engine = app.extensions["orchestrator"].engine
    metrics.init_app(app, metrics.SagaCounts(
        engine.store, metrics.saga_budget(SAGA_TYPES.values(), settings)))

    @app.after_request
    def cors(resp):
        # The UI may be opened from disk (Origin: null): allow any origin, but never
        # with credentials, so no browser ever sends cookies along.
        resp.headers["Access-Control-Allow-Origin"] = "*"
        resp.headers["Access-Control-Allow-Headers"] = \
            "Content-Type, Authorization, Idempotency-Key"
        resp.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, OPTIONS"
        return resp

    return app


def main() -> None:
    """Serve the orchestrator at ORCHESTRATOR_PORT."""
    if not SAGA_TYPES:
        sys.exit("saga.api cannot start: no saga type is registered; set SAGA_TYPE_MODULES "
                 "to the modules that define yours (comma-separated)")
    settings = load_settings()
    serve(lambda: create_app(settings), settings.ports["orchestrator"], settings,
          "orchestrator")


if __name__ == "__main__":
    main()
