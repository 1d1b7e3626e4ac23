"""A service's HTTP face: /invoke and /compensate for the orchestrator, its accounts,
failure-injection control and health. Each of service_a.py, service_b.py and
service_c.py is this app with that service's operations."""

import json
import logging
import socket
from http import HTTPStatus
import threading
import time

import mysql.connector

from flask import Blueprint, Flask, jsonify, request

from saga import metrics, tracing
from saga.common import Database, Settings, UnsupportedServer, load_settings, purge_interval
from saga.faults import OFF, Carrier, FaultMode, FaultStore, initial_fault, parse_fault
from saga.participant.choreography import Choreography, step_service
from saga.participant.core import Answer, Participant
from saga.participant.events import Outbox
from saga.answers import first_saga_of, request_hash
from saga.definitions import SAGA_TYPES, register
from saga.errors import KnownStart
from saga.serving import (WaitingRoom, database_error, install_error_handlers, new_app,
                          respond, serve, token_ok)
from saga.validation import (MAX_BODY_BYTES, ApiError, idempotency_key, json_object,
                        parse_object, reject_unknown_fields)

log = logging.getLogger("saga")

# A service's calls are short (a transaction or two), so fewer threads than the
# orchestrator's, whose requests wait for whole sagas; some are kept free of /register
# requests waiting for their saga.
SERVICE_THREADS = 64
RESERVED_THREADS = 8


def service_operations(service: str, saga_types) -> list:
    """This service's operations for every registered saga type, in registration order
    (the first is what an /invoke naming no operation runs: the seed's contract)."""
    return [op for t in saga_types for op in t.operations if service in op.services]


class SagaParticipant:
    """Makes a Flask app a participant in the registered saga types (a Flask extension:
    made once, then `init_app(app)`). It adds the step calls (/invoke, /compensate, with
    the ledger's idempotency, tombstones and refusals, and fault injection), /health,
    /faults, each saga type's choreographed start path and reads for this service, and
    the background work (the event relay and consumers, the Kafka command workers,
    retention). Settings come from the environment (SAGA_DB_*, ...) unless given."""

    def __init__(self, service: str, settings: Settings | None = None,
                 faults: FaultStore | None = None, saga_types=None):
        self.service = service
        self.settings = settings or load_settings()
        if saga_types:
            register(saga_types)
        self.saga_types = list(saga_types or SAGA_TYPES.values())
        self.faults = faults or FaultStore(initial_fault(self.settings.faults, service))

    def init_app(self, app: Flask, start_background_now: bool = True) -> Flask:
        """`start_background_now=False` when the server forks after this (the demo's
        gunicorn preloads the app): its workers call start_background(app) instead."""
        service, settings, faults = self.service, self.settings, self.faults
        tracing.setup(f"saga-service-{service.lower()}")
        # Calls hold a connection for one transaction; those beyond 16 at once wait
        # briefly. (With the orchestrator's 68, one of each process stays under MariaDB's
        # default of 151 connections.)
        db = Database(settings, pool_size=16 + settings.consumers + 4)
        participant = Participant(service, service_operations(service, self.saga_types), db,
                                  faults, settings)
        app.extensions["participant"] = participant
        choreography = None
        if settings.rabbitmq_url != "off":
            choreography = Choreography(service, participant, settings, self.saga_types)
            app.extensions["choreography"] = choreography
        waiting = WaitingRoom(SERVICE_THREADS, RESERVED_THREADS)
        routes = Blueprint("saga", __name__)
        install_error_handlers(routes)

        def check_token():
            if request.path != "/health" and not token_ok(settings):
                raise ApiError("missing or wrong bearer token", status=401)

        routes.before_request(check_token)

        @routes.get("/health")
        def health():
            up = db.ping()
            return jsonify({"service": service, "status": "ok" if up else "degraded",
                            "database": "up" if up else "down",
                            "faults": faults.get()["fault"],
                            "in_flight": participant.in_flight.count,
                            **{name: report() for name, report in participant.status.items()}}
                           ), 200 if up else 503

        def start_choreographed(saga_type):
            """Start a choreographed saga here (the service of its first step) and wait
            for its outcome like /start; the orchestrator is not involved."""
            if choreography is None:
                raise ApiError("choreography is off (RABBITMQ_URL=off)", status=503)
            body = json_object()
            reject_unknown_fields(body, {f.name for f in saga_type.fields})
            data = saga_type.read_input(body)
            key = idempotency_key()
            with waiting.seat(), tracing.span(f"saga {saga_type.name}",
                                              request.headers.get("traceparent"),
                                              tracing.SERVER,
                                              **{"saga.type": saga_type.name}) as span:
                try:
                    saga, first = choreography.start(saga_type, data, key,
                                                     request_hash(saga_type.name, data))
                    span.set_attribute("saga.id", saga.id)
                except KnownStart as known:
                    saga = first_saga_of(known, choreography.store)
                    return respond(choreography.wait(saga, settings.start_wait),
                                   repeated=True)
                if first.status >= 500:
                    return jsonify({"error": f"service {service} could not run the first "
                                             f"step after {settings.max_attempts} attempts; "
                                             "nothing was written, try again "
                                             f"({first.body.get('error')})"}), 503
                if first.after.strikes == "after":
                    return reply(first)  # the injected fault strikes after the commit
                return respond(choreography.wait(saga, settings.start_wait))

        for saga_type in self.saga_types:
            chore = saga_type.choreography
            if chore and step_service(saga_type, 0) == service:
                view = (lambda t: lambda: start_choreographed(t))(saga_type)
                for path in {chore.path, chore.path.rstrip("/") + "/"}:
                    routes.add_url_rule(path, f"start_{saga_type.name}{path}", view,
                                        methods=["POST"], strict_slashes=True)
            reads = saga_type.routes and saga_type.routes(service, db)
            if reads is not None:
                reads.before_request(check_token)
                install_error_handlers(reads)
                app.register_blueprint(reads)

        @routes.get("/faults")
        def get_faults():
            return jsonify(faults.get())

        @routes.put("/faults")
        def put_faults():
            fault = parse_fault(json_object())
            faults.set(fault)
            log.info("service %s faults set to %s", service, fault)
            return jsonify(faults.get())

        app.register_blueprint(routes)
        metrics.init_app(app, metrics.OutboxBacklog(db, service))
        app.wsgi_app = StepCalls(app.wsgi_app, participant, settings)
        if start_background_now:
            start_background(app)
        return app


def create_service_app(service: str, settings: Settings | None = None,
                       faults: FaultStore | None = None, saga_types=None) -> Flask:
    """A service of its own: a new Flask app that is only a saga participant (the demo's
    A, B and C). Its background work starts in each server worker (start_background)."""
    app = new_app(f"service_{service.lower()}")
    return SagaParticipant(service, settings, faults, saga_types).init_app(
        app, start_background_now=False)


def start_background(app: Flask) -> None:
    """What each server process runs beside its web threads (started after the fork):
    the choreography's relay and consumers, the Kafka command worker, and the
    retention of the ledger."""
    participant = app.extensions["participant"]
    if "choreography" in app.extensions:
        app.extensions["choreography"].start_threads()
    if participant.settings.transport == "kafka":
        from saga.participant.kafka_worker import start_command_workers
        start_command_workers(participant)
    days = participant.settings.retention_days
    if days > 0:
        threading.Thread(target=purge_ledger, args=(participant, days), name="retention",
                         daemon=True).start()


def purge_ledger(participant: Participant, days: float) -> None:
    """The service's share of SAGA_RETENTION_DAYS: its ledger entries and its published
    events, in small batches."""
    while True:
        try:
            for purge in (participant.ledger.purge,
                          lambda cur, days: Outbox.purge(cur, participant.service, days)):
                while participant.db.run(lambda cur: purge(cur, days)):
                    pass
        except (mysql.connector.Error, UnsupportedServer) as exc:
            log.warning("retention pass failed: %s", exc)
        time.sleep(purge_interval(days))


class StepCalls:
    """POST /invoke and /compensate, the calls every saga step makes, served in front of
    the Flask app: they need none of its per-request machinery (contexts, routing,
    sessions, signals), which cost a service more CPU than the call's own work. Every
    other request goes to Flask. Errors are answered as Flask's handlers would."""

    PATHS = {"/invoke": "invoke", "/compensate": "compensate"}

    def __init__(self, flask_app, participant: Participant, settings: Settings):
        self.flask_app, self.participant, self.settings = flask_app, participant, settings

    def __call__(self, environ, start_response):
        action = self.PATHS.get(environ.get("PATH_INFO", ""))
        if action is None or environ["REQUEST_METHOD"] != "POST":
            return self.flask_app(environ, start_response)
        status, body, after = self.serve(environ, action)
        data = json.dumps(body).encode()
        after.after_commit(Connection(environ))
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(data)))])
        return [data]

    def serve(self, environ, action: str) -> tuple[int, dict, FaultMode]:
        try:
            if not token_ok(self.settings, environ.get("HTTP_AUTHORIZATION", "")):
                raise ApiError("missing or wrong bearer token", status=401)
            mimetype = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
            if mimetype != "application/json":
                raise ApiError("Content-Type must be application/json, not "
                               f"{mimetype or 'missing'}", status=415)
            length = environ.get("CONTENT_LENGTH")
            try:
                raw = environ["wsgi.input"].read(
                    min(int(length), MAX_BODY_BYTES + 1) if length else MAX_BODY_BYTES + 1)
            except OSError as exc:
                # The caller went away mid-request (a balancer cutting off a call of a
                # killed orchestrator): nothing was read, nothing is done.
                log.info("caller went away during POST /%s: %s", action, exc)
                return 400, {"error": f"request body cut off: {exc}"}, OFF
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(f"request body is larger than {MAX_BODY_BYTES} bytes",
                               status=413)
            fields = parse_object(raw)
            with self.participant.in_flight, self.participant.serving(
                    environ.get("HTTP_TRACEPARENT"), action, fields) as span:
                answer = getattr(self.participant, action)(fields)
                tracing.outcome(span, str(answer.status), answer.status >= 500)
            return answer.status, answer.body, answer.after
        except ApiError as exc:
            return exc.status, exc.body(), OFF
        except (mysql.connector.Error, UnsupportedServer) as exc:
            body, status = database_error(exc, f"POST /{action}")
            return status, body, OFF
        except Exception:
            log.exception("unexpected error on POST /%s", action)
            return 500, {"error": "internal error"}, OFF


def reply(answer: Answer):
    """The answer, after applying a fault that strikes once the work is committed."""
    answer.after.after_commit(Connection(request.environ))
    return jsonify(answer.body), answer.status


class Connection(Carrier):
    """An HTTP call: dropping its answer cuts the client's connection."""

    def __init__(self, environ: dict):
        self.environ = environ

    def drop(self) -> None:
        sock = self.environ.get("gunicorn.socket") or self.environ.get("werkzeug.socket")
        if sock is None:
            self.crash()   # no way to cut just this connection: cut them all
        sock.shutdown(socket.SHUT_RDWR)


def run_service(service: str) -> None:
    """`python service_x.py`: serve the service at its configured port."""
    settings = load_settings()
    # Made before the server forks, so a replaced worker keeps the same fault state.
    faults = FaultStore(initial_fault(settings.faults, service))
    serve(lambda: create_service_app(service, settings, faults), settings.ports[service],
          settings, f"service_{service.lower()}", preload=True, threads=SERVICE_THREADS,
          on_worker_start=start_background)
