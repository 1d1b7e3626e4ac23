"""The orchestrator (port 5000): runs each registration as a saga A -> B -> C over HTTP,
compensates in reverse on failure, and serves the API and ui.html."""

import dataclasses
import json
import logging
import os
import uuid

import mysql.connector
import urllib3
from flask import Flask, jsonify, request, send_file
from werkzeug.routing import BaseConverter

from common import (MAX_BODY_BYTES, SAGA_ID, BadRequest, Database, error,
                    install_error_handlers, json_object, load_settings, parse_fault,
                    reject_unknown_fields, serve, text_field, token_ok)
from openapi import SPEC
from saga import (ACTIVE, COMPENSATED, COMPENSATING, COMPLETED, FAILED, STATES,
                  Engine, IllegalTransition, Step, saga_event)

log = logging.getLogger("saga")
HERE = os.path.dirname(os.path.abspath(__file__))
INPUT_FIELDS = ("username", "address", "payment")


def saga_steps(settings):
    """The saga, as data: forward runs this list in order, compensation reversed."""
    return (
        Step("A", settings.service_a_url, lambda data, results: {
            "username": data["username"]}),
        Step("B", settings.service_b_url, lambda data, results: {
            "user_id": results["A"]["user_id"], "address": data["address"]}),
        Step("C", settings.service_c_url, lambda data, results: {
            "user_id": results["A"]["user_id"], "payment_method": data["payment"]}),
    )


def start_status_code(saga):
    """200 only for a completed saga; 202 still running; 409 undone because a service
    said no; 502 undone (or stuck FAILED) because a service kept failing."""
    if saga.status in ACTIVE:
        return 202
    if saga.status == COMPLETED:
        return 200
    if saga.status == COMPENSATED and saga.rejected:
        return 409
    return 502


def create_app(settings=None, start_background=True):
    settings = settings or load_settings()
    app = Flask("orchestrator")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    app.url_map.converters["saga_id"] = SagaIdConverter
    db = Database(settings)
    steps = saga_steps(settings)
    engine = Engine(settings, db, steps)
    app.extensions["saga_engine"] = engine
    install_error_handlers(app)
    if start_background:
        engine.start_background()

    @app.after_request
    def cors(resp):
        # The UI may be opened from disk (Origin: null): allow any origin, but never
        # with credentials, so no browser ever sends cookies along.
        resp.headers["Access-Control-Allow-Origin"] = "*"
        resp.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        resp.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, OPTIONS"
        return resp

    def require_operator():
        if not token_ok(settings):
            raise BadRequest("this action needs Authorization: Bearer <SAGA_API_TOKEN>", status=401)

    # -- starting sagas

    @app.post("/start")
    @app.post("/sagas/start")
    def start():
        body = json_object()
        reject_unknown_fields(body, set(INPUT_FIELDS))
        data = {name: text_field(body, name) for name in INPUT_FIELDS}
        saga = engine.store.create(str(uuid.uuid4()), data)
        saga = as_saved(engine.drive_until(saga, settings.start_wait))
        return jsonify(start_answer(saga)), start_status_code(saga)

    def as_saved(saga):
        """The saga as the database holds it once this request stopped driving it: never
        a state that was not saved (the last save may have failed, or another
        orchestrator may have taken the saga over)."""
        if saga.saved_status in ACTIVE or saga.saved_status != saga.status:
            try:
                return engine.store.load(saga.id) or saga
            except mysql.connector.Error:
                return dataclasses.replace(saga, status=saga.saved_status)
        return saga

    # -- reading sagas

    @app.get("/sagas")
    def list_sagas():
        status = request.args.get("status")
        if status is not None and status not in STATES:
            raise BadRequest(f"status must be one of {', '.join(STATES)}", "status")
        username = request.args.get("username")
        limit = query_int("limit", 50, 1, 500)
        offset = query_int("offset", 0, 0, 10_000_000)
        where, params = [], []
        if status:
            where.append("status = %s")
            params.append(status)
        if username:
            where.append("username = %s")
            params.append(username)
        # Unfiltered, MariaDB would rather scan and sort than walk saga_created for a
        # deep offset; walking the index is what keeps pages fast on a big table.
        scope = " WHERE " + " AND ".join(where) if where else " FORCE INDEX (saga_created)"
        sql = (f"SELECT {ITEM_COLUMNS} FROM SAGA{scope} "
               "ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s")
        with db.transaction() as cur:
            cur.execute(sql, (*params, limit + 1, offset))
            rows = cur.fetchall()
        items = [saga_item(row, steps) for row in rows[:limit]]
        return jsonify({"sagas": items, "limit": limit, "offset": offset,
                        "next_offset": offset + limit if len(rows) > limit else None})

    @app.get("/sagas/<saga_id:saga_id>")
    def get_saga(saga_id):
        check_saga_id(saga_id)
        with db.transaction() as cur:
            cur.execute(f"SELECT {ITEM_COLUMNS}, address, payment, results, rejected "
                        "FROM SAGA WHERE id = %s", (saga_id,))
            row = cur.fetchone()
            if row is None:
                return error(404, f"no saga with id {saga_id!r}", "saga_id")
            cur.execute("SELECT " + LOG_COLUMNS + " FROM SAGA_LOG WHERE saga_id = %s "
                        "ORDER BY id", (saga_id,))
            log_rows = [log_item(r) for r in cur.fetchall()]
        item = saga_item(row[:9], steps)
        item["input"] = {"username": row[4], "address": row[9], "payment": row[10]}
        item["results"] = json.loads(row[11])
        item["rejected"] = bool(row[12])
        item["steps"] = step_outcomes(steps, log_rows)
        item["log"] = log_rows
        return jsonify(item)

    @app.get("/sagas/<saga_id:saga_id>/status")
    def saga_status(saga_id):
        check_saga_id(saga_id)
        with db.transaction() as cur:
            cur.execute(f"SELECT {ITEM_COLUMNS} FROM SAGA WHERE id = %s", (saga_id,))
            row = cur.fetchone()
        if row is None:
            return error(404, f"no saga with id {saga_id!r}", "saga_id")
        return jsonify(saga_item(row, steps))

    @app.get("/log")
    def log_tail():
        """SAGA_LOG rows with id > after, oldest first (for a live tail); without
        `after`, the newest `limit` rows."""
        limit = query_int("limit", 100, 1, 1000)
        after = request.args.get("after")
        with db.transaction() as cur:
            if after is None:
                cur.execute(f"SELECT {LOG_COLUMNS} FROM SAGA_LOG ORDER BY id DESC LIMIT %s", (limit,))
                rows = list(reversed(cur.fetchall()))
            else:
                cur.execute(f"SELECT {LOG_COLUMNS} FROM SAGA_LOG WHERE id > %s ORDER BY id LIMIT %s",
                            (query_int("after", 0, 0, 2 ** 62), limit))
                rows = cur.fetchall()
        return jsonify({"log": [log_item(r) for r in rows]})

    # -- operator actions

    @app.post("/sagas/<saga_id:saga_id>/compensate")
    def compensate(saga_id):
        require_operator()

        def decide(saga, lease_live):
            if saga.status in (COMPENSATED, COMPENSATING):
                return []
            if saga.status == COMPLETED:
                saga.step = len(steps) - 1
            saga.status, saga.attempt = COMPENSATING, 1
            saga.reason = "compensation requested by an operator"
            return [saga_event(saga, COMPENSATING, saga.reason)]

        return operator_action(saga_id, decide)

    @app.post("/sagas/<saga_id:saga_id>/retry")
    def retry(saga_id):
        require_operator()

        def decide(saga, lease_live):
            if saga.status == FAILED:
                saga.status, saga.attempt = COMPENSATING, 1
                saga.reason = (saga.reason or "") + " (retried by an operator)"
                return [saga_event(saga, COMPENSATING, "compensation retried by an operator")]
            if saga.status in ACTIVE and not lease_live:
                return [saga_event(saga, saga.status, "resumed by an operator")]
            if saga.status in ACTIVE:
                raise BadRequest(f"saga {saga.id} is {saga.status} and being driven; "
                                 "nothing to retry", status=409)
            raise BadRequest(f"saga {saga.id} is {saga.status}; only a FAILED or stuck "
                             "saga can be retried", status=409)

        return operator_action(saga_id, decide)

    def operator_action(saga_id, decide):
        check_saga_id(saga_id)
        try:
            saga, taken = engine.store.take_for_operator(saga_id, decide)
        except IllegalTransition as exc:
            return error(409, str(exc))
        if saga is None:
            return error(404, f"no saga with id {saga_id!r}", "saga_id")
        if taken:
            saga = as_saved(engine.drive_until(saga, settings.start_wait))
        code = 202 if saga.status in ACTIVE else 200
        return jsonify(start_answer(saga)), code

    # -- faults, health, UI

    @app.get("/faults")
    def get_faults():
        return jsonify({step.service: service_call(step, "GET", "/faults") for step in steps})

    @app.put("/faults/<service>")
    def put_faults(service):
        require_operator()
        step = next((s for s in steps if s.service == service), None)
        if step is None:
            return error(404, f"no service {service!r}; expected A, B or C", "service")
        fault = parse_fault(json_object())
        answer = service_call(step, "PUT", "/faults", fault)
        if "error" in answer:
            return jsonify(answer), 502
        return jsonify(answer)

    def service_call(step, method, path, body=None, timeout=None):
        try:
            _, payload, _ = engine.http.call(method, step.url + path, body, timeout)
        except urllib3.exceptions.HTTPError as exc:
            payload = None
            problem = exc.__class__.__name__
        else:
            problem = "answer was not JSON"
        if not isinstance(payload, dict):
            return {"service": step.service, "status": "down",
                    "error": f"service {step.service} unreachable: {problem}"}
        return payload

    @app.get("/health")
    def health():
        up = db.ping()
        body = {"service": "orchestrator", "status": "ok" if up else "degraded",
                "database": "up" if up else "down", "owner": engine.owner,
                "active_sagas": engine.active_count()}
        if request.args.get("all"):
            quick = urllib3.Timeout(connect=settings.connect_timeout, read=2)
            body["services"] = {s.service: service_call(s, "GET", "/health", timeout=quick)
                                for s in steps}
        return jsonify(body), 200 if up else 503

    @app.get("/openapi.json")
    def openapi():
        return jsonify(SPEC)

    @app.get("/")
    @app.get("/ui.html")
    def ui():
        return send_file(os.path.join(HERE, "ui.html"), mimetype="text/html", max_age=0)

    return app


# What saga_item() reads, in its order.
ITEM_COLUMNS = "id, status, step, attempt, username, failed_step, reason, created_at, updated_at"
LOG_COLUMNS = ("id, saga_id, service, status, message, created_at, step, action, attempt, "
               "http_status, elapsed_ms")


class SagaIdConverter(BaseConverter):
    """Any path segment but 'start', so /sagas/start stays the seed's POST alias
    instead of also reading as the saga named 'start'."""
    regex = r"(?!start(?:/|$))[^/]+"


def check_saga_id(saga_id):
    """Ids are minted here as UUIDs; anything else cannot name a saga."""
    if not SAGA_ID.fullmatch(saga_id):
        raise BadRequest(f"no saga with id {saga_id!r}", "saga_id", status=404)


def query_int(name, default, low, high):
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", name) from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be from {low} to {high}", name)
    return value


def iso(ts):
    return ts.isoformat(timespec="milliseconds") if ts else None


def saga_item(row, steps):
    sid, status, step, attempt, username, failed_step, reason, created, updated = row
    return {"id": sid, "status": status, "current_step": steps[min(step, len(steps) - 1)].service,
            "attempt": attempt, "username": username, "failed_step": failed_step,
            "reason": reason, "created_at": iso(created), "updated_at": iso(updated)}


def log_item(row):
    keys = ("id", "saga_id", "service", "status", "message", "created_at", "step", "action",
            "attempt", "http_status", "elapsed_ms")
    item = dict(zip(keys, row))
    item["created_at"] = iso(item["created_at"])
    return item


def step_outcomes(steps, log_rows):
    """Each step's forward and compensation story, folded from its SAGA_LOG rows."""
    out = []
    for step in steps:
        entry = {"service": step.service}
        for action in ("invoke", "compensate"):
            rows = [r for r in log_rows if r["service"] == step.service and r["action"] == action]
            if rows:
                last = rows[-1]
                entry[action] = {"status": last["status"], "attempts": len(rows),
                                 "http_status": last["http_status"],
                                 "elapsed_ms": last["elapsed_ms"], "message": last["message"]}
        out.append(entry)
    return out


def start_answer(saga):
    body = {"saga": saga.id, "status": saga.status}
    if saga.status != COMPLETED:
        body.update(failed_step=saga.failed_step, reason=saga.reason)
    if saga.results:
        body["results"] = saga.results
    return body


if __name__ == "__main__":
    _settings = load_settings()
    serve(lambda: create_app(_settings), _settings.orchestrator_port, _settings, "orchestrator")
