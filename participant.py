"""The one implementation behind services A, B and C: an idempotent, compensable step
over one business table. Each service file supplies only its table part (a Part)."""

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import mysql.connector
from mysql.connector import errorcode
from flask import Flask, g, jsonify, request

from common import (MAX_BODY_BYTES, BadRequest, Database, FaultStore, error,
                    initial_fault, install_error_handlers, json_object, load_settings,
                    parse_fault, reject_unknown_fields, saga_id_field, serve, token_ok)

log = logging.getLogger("saga")


@dataclass(frozen=True)
class Part:
    """What differs between services: the table, how to read and insert a row."""
    service: str                       # "A", "B" or "C"
    table: str
    id_name: str                       # name of the row id in the answer, e.g. "user_id"
    read_input: Callable[[dict], dict]  # validated request fields (raises BadRequest)
    insert_sql: str                    # takes saga_id then the read_input values, in order


def create_service_app(part, settings=None, faults=None):
    settings = settings or load_settings()
    app = Flask(f"service_{part.service.lower()}")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    db = Database(settings)
    faults = faults or FaultStore(initial_fault(settings, part.service))
    install_error_handlers(app)
    in_flight = InFlight()

    @app.before_request
    def require_token():
        if request.path != "/health" and not token_ok(settings):
            return error(401, "missing or wrong bearer token")
        if request.path in ("/invoke", "/compensate"):
            in_flight.enter()
            g.counted = True

    @app.teardown_request
    def count_done(exc):
        if g.pop("counted", False):
            in_flight.leave()

    @app.get("/health")
    def health():
        up = db.ping()
        body = {"service": part.service, "status": "ok" if up else "degraded",
                "database": "up" if up else "down", "faults": faults.get()["fault"],
                "in_flight": in_flight.count}
        return jsonify(body), 200 if up else 503

    @app.post("/invoke")
    def invoke():
        body = json_object()
        saga_id = saga_id_field(body)
        values = part.read_input(body)
        reject_unknown_fields(body, {"saga_id", *values})
        mode, fault = faults.next_fault("invoke")
        early = before_transaction(mode, fault, settings)
        if early is not None:
            return early
        with db.transaction() as cur:
            # The ledger key is written first by both invoke and compensate, so the
            # database serializes them: whichever commits second sees the other.
            try:
                cur.execute("INSERT INTO STEP_LEDGER (service, saga_id, state) "
                            "VALUES (%s, %s, 'invoked')", (part.service, saga_id))
                cur.execute(part.insert_sql, (saga_id, *values.values()))
                row_id = cur.lastrowid
            except mysql.connector.IntegrityError as exc:
                if exc.errno == errorcode.ER_NO_REFERENCED_ROW_2:
                    raise BadRequest(f"user_id {values.get('user_id')} does not exist "
                                     "in TABLE_A", "user_id", status=422) from None
                if exc.errno != errorcode.ER_DUP_ENTRY:
                    raise
                return replay(cur, part, saga_id)
        answer = {"status": "success", "saga_id": saga_id, part.id_name: row_id}
        after_commit(mode, fault)
        return jsonify(answer)

    @app.post("/compensate")
    def compensate():
        body = json_object()
        saga_id = saga_id_field(body)
        reject_unknown_fields(body, {"saga_id"})
        mode, fault = faults.next_fault("compensate")
        early = before_transaction(mode, fault, settings)
        if early is not None:
            return early
        with db.transaction() as cur:
            cur.execute("INSERT INTO STEP_LEDGER (service, saga_id, state) "
                        "VALUES (%s, %s, 'compensated') "
                        "ON DUPLICATE KEY UPDATE state = 'compensated'",
                        (part.service, saga_id))
            cur.execute(f"DELETE FROM {part.table} WHERE saga_id = %s", (saga_id,))
            removed = cur.rowcount
        after_commit(mode, fault)
        return jsonify({"status": "compensated", "saga_id": saga_id, "removed": removed})

    @app.get("/faults")
    def get_faults():
        return jsonify(faults.get())

    @app.put("/faults")
    def put_faults():
        fault = parse_fault(json_object())
        faults.set(fault)
        log.info("service %s faults set to %s", part.service, fault)
        return jsonify(faults.get())

    return app


class InFlight:
    """How many calls this worker is serving: lets a test or an operator see that a
    hung call has finished (and so whether a late write could still land)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def enter(self):
        with self._lock:
            self.count += 1

    def leave(self):
        with self._lock:
            self.count -= 1


def replay(cur, part, saga_id):
    """Answer a repeated invoke the way the first one was answered, or refuse one that
    arrives after its compensation."""
    cur.execute("SELECT state FROM STEP_LEDGER WHERE service = %s AND saga_id = %s "
                "LOCK IN SHARE MODE", (part.service, saga_id))
    (state,) = cur.fetchone()
    if state == "compensated":
        return error(409, f"saga {saga_id} was already compensated at {part.service}; "
                          "a late invoke makes no row", status="compensated")
    cur.execute(f"SELECT id FROM {part.table} WHERE saga_id = %s", (saga_id,))
    (row_id,) = cur.fetchone()
    return jsonify({"status": "success", "saga_id": saga_id, part.id_name: row_id})


def before_transaction(mode, fault, settings):
    """Apply faults that act before any write; returns a response to send instead, or
    None to go on (hang and slow go on, late)."""
    if mode == "fail":
        return error(500, "injected failure before the transaction", fault=fault)
    if mode == "reject":
        return error(422, "rejected: injected business rejection", fault=fault)
    if mode == "hang":
        time.sleep(fault.get("seconds", settings.read_timeout * 2))
    elif mode == "slow":
        time.sleep(fault.get("seconds", 0.2))
    return None


def after_commit(mode, fault):
    """Faults that strike after the transaction committed: the caller never hears."""
    if mode == "crash":
        log.warning("injected crash after commit: exiting")
        os._exit(1)
    if mode == "drop":
        sock = request.environ.get("gunicorn.socket")
        if sock is None:
            os._exit(1)
        log.warning("injected connection drop after commit")
        sock.shutdown(socket.SHUT_RDWR)


def run(part, create_app):
    """`python service_x.py`: serve the service at its configured port."""
    settings = load_settings()
    # Created before the server forks, so a replaced worker keeps the same fault state.
    faults = FaultStore(initial_fault(settings, part.service))
    name = f"service_{part.service.lower()}"
    serve(lambda: create_app(settings, faults), getattr(settings, f"{name}_port"), settings,
          name, preload=True)
