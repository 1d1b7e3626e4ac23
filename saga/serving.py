"""Serving an app: the production server every process runs under, the JSON answer for
every error, and the bearer-token check."""

import hmac
import logging
import sys
import threading
from contextlib import contextmanager

import mysql.connector
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from saga.common import (C_DRIVER, ConfigError, Database, Settings, UnsupportedServer,
                    is_unavailable)
from saga import metrics
from saga.answers import answer_code, public
from saga.logs import configure_logging, gunicorn_logger
from saga.validation import MAX_BODY_BYTES, ApiError

log = logging.getLogger("saga")


def new_app(name: str) -> Flask:
    app = Flask(name)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    install_error_handlers(app)
    return app


def install_error_handlers(app: Flask) -> None:
    """Every error leaves as JSON; a database that cannot be reached is a 503 so callers
    retry; anything unexpected is logged and is a 500, which is a bug."""

    @app.errorhandler(ApiError)
    def _api_error(exc):
        resp = jsonify(exc.body())
        if exc.retry_after is not None:
            resp.headers["Retry-After"] = str(exc.retry_after)
        return resp, exc.status

    @app.errorhandler(HTTPException)
    def _http(exc):
        if exc.code == 413:
            return jsonify({"error": f"request body is larger than {MAX_BODY_BYTES} bytes"}), 413
        resp = jsonify({"error": exc.description or exc.name})
        for name, value in exc.get_headers():  # e.g. Allow on a 405
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp, exc.code

    @app.errorhandler(mysql.connector.Error)
    @app.errorhandler(UnsupportedServer)
    def _database(exc):
        body, status = database_error(exc, f"{request.method} {request.path}")
        return jsonify(body), status

    @app.errorhandler(Exception)
    def _unexpected(exc):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify({"error": "internal error"}), 500


def database_error(exc: Exception, where: str) -> tuple[dict, int]:
    """A database that cannot be reached is a 503 (the caller retries); any other
    database error is a bug, logged, and a 500."""
    if is_unavailable(exc):
        log.warning("database unavailable on %s: %s", where, exc)
        return {"error": "database unavailable, try again",
                "detail": str(getattr(exc, "msg", None) or exc)}, 503
    log.error("database error on %s", where, exc_info=exc)
    return {"error": "internal database error"}, 500


def respond(answer: dict, code: int | None = None, **extra):
    """A saga's answer (saga.answers) as a response: its status decides the code."""
    return jsonify({**public(answer), **extra}), code or answer_code(answer)


class WaitingRoom:
    """The web threads that may wait for a saga's outcome: all but `reserved`, kept free
    for health checks, reads and operator actions. A request that finds no seat is
    refused before it writes anything (503): answering it 202 instead would let a client
    that retries at once pile up sagas faster than they can run."""

    def __init__(self, threads: int, reserved: int):
        self.seats = max(1, threads - reserved)
        self._free = threading.BoundedSemaphore(self.seats)

    @contextmanager
    def seat(self):
        with self.seat_if_free() as seated:
            if not seated:
                metrics.start_refused("busy")
                raise ApiError(f"{self.seats} requests are already waiting for their saga; "
                               "nothing was started, try again", status=503, retry_after=1)
            yield

    @contextmanager
    def seat_if_free(self):
        """Yields whether a seat was free (and holds it meanwhile)."""
        seated = self._free.acquire(blocking=False)
        try:
            yield seated
        finally:
            if seated:
                self._free.release()


def token_ok(settings: Settings, authorization: str | None = None) -> bool:
    """True when no token is configured or the request carries the right one."""
    if not settings.api_token:
        return True
    if authorization is None:
        authorization = request.headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), settings.api_token.encode())


def require_token(settings: Settings) -> None:
    if not token_ok(settings):
        raise ApiError("this needs Authorization: Bearer <SAGA_API_TOKEN>", status=401)


def serve(app_factory, port: int, settings: Settings, name: str, preload: bool = False,
          threads: int | None = None, on_worker_start=None) -> None:
    """Run an app under gunicorn: a production server whose master replaces a worker
    that dies (the 'crash after commit' fault) while the listening socket stays open.
    With `preload` the app is built once in the master, so a replacement worker is a
    fork, ready at once; `on_worker_start(app)` then starts what must run in each worker
    (threads do not survive a fork)."""
    from gunicorn.app.base import BaseApplication

    configure_logging(name, settings.log_format)

    class Server(BaseApplication):
        def load_config(self):
            self.cfg.set("bind", f"127.0.0.1:{port}")
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("workers", settings.web_workers)
            self.cfg.set("threads", threads or settings.web_threads)
            self.cfg.set("keepalive", 30)
            self.cfg.set("graceful_timeout", 3)
            self.cfg.set("timeout", 60)
            self.cfg.set("proc_name", name)
            self.cfg.set("control_socket_disable", True)  # one shared default path
            self.cfg.set("preload_app", preload)
            self.cfg.set("errorlog", "-")
            self.cfg.set("loglevel", "info")
            self.cfg.set("logger_class", gunicorn_logger(name, settings.log_format))
            # A worker that is gone keeps its counts; only its live gauges go.
            self.cfg.set("child_exit",
                         lambda server, worker: metrics.worker_exited(worker.pid))
            if on_worker_start:
                self.cfg.set("post_worker_init", lambda worker: on_worker_start(worker.wsgi))

        def load(self):
            return app_factory()

    log.info("%s: database driver %s", name,
             "mysql-connector's C extension" if C_DRIVER else "mysql-connector, pure Python")
    try:
        Database(settings, 1).check_server()
        Server().run()
    except (ConfigError, UnsupportedServer) as exc:
        log.critical("%s cannot start: %s", name, exc)
        sys.exit(3)
