"""Calling a service: one call becomes an Outcome the engine can decide on. HTTP here;
saga/kafka_transport.py sends the same calls as Kafka commands."""

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import urllib3
from urllib3.util.wait import wait_for_read

from saga.common import Settings
from saga.model import Outcome


class HttpTransport:
    """JSON over HTTP, with no retries of its own (retrying is the saga's decision) and a
    connect and a read timeout on every call. The steps' calls go over the standard
    library's http.client, one keep-alive connection per driver thread and service: the
    engine's hottest path, where urllib3's pooling layer cost more CPU than the call's
    own work. Other requests (fault control, health, balances) use urllib3's pools."""

    name = "http"

    def __init__(self, settings: Settings, maxsize: int):
        self.targets = {service: urlsplit(url) for service, url in settings.service_urls.items()}
        self.pools = urllib3.PoolManager(num_pools=16, maxsize=maxsize, retries=False)
        self.headers = {"Content-Type": "application/json"}
        if settings.api_token:
            self.headers["Authorization"] = f"Bearer {settings.api_token}"
        self.connect_timeout, self.read_timeout = settings.connect_timeout, settings.read_timeout
        self.timeout = urllib3.Timeout(connect=self.connect_timeout, read=self.read_timeout)
        self.local = threading.local()

    def call(self, service: str, action: str, fields: dict,
             timeout: float | None = None, trace: str | None = None) -> Outcome:
        """POST /invoke or /compensate to `service`, waiting `timeout` seconds for the
        answer (SAGA_READ_TIMEOUT by default), with the call's `trace` (a traceparent);
        never raises for a failed call."""
        started = time.monotonic()
        read_timeout = timeout or self.read_timeout
        conn, phase = self.connection(service), "connect"
        try:
            if conn.sock is None:
                conn.timeout = self.connect_timeout
                conn.connect()
            conn.sock.settimeout(read_timeout)
            phase = "send"
            conn.request("POST", f"{self.targets[service].path.rstrip('/')}/{action}",
                         json.dumps(fields).encode(),
                         {**self.headers, "traceparent": trace} if trace else self.headers)
            phase = "read"
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            message, reached = describe_failure(exc, phase, self.connect_timeout,
                                                read_timeout)
            return outcome(started, None, message, reached=reached)
        if resp.will_close:
            conn.close()
        return outcome_of_answer(started, resp.status, decode(data), action)

    def connection(self, service: str) -> http.client.HTTPConnection:
        """This thread's connection to the service, dropped first if the service closed
        it meanwhile (an idle keep-alive connection times out at the server)."""
        connections = self.local.__dict__.setdefault("connections", {})
        conn = connections.get(service)
        if conn is None:
            target = self.targets[service]
            kind = http.client.HTTPSConnection if target.scheme == "https" \
                else http.client.HTTPConnection
            conn = connections[service] = kind(target.hostname, target.port)
        elif conn.sock is not None and wait_for_read(conn.sock, timeout=0):
            conn.close()
        return conn

    def request(self, method: str, url: str, body=None, timeout=None):
        """(HTTP status, the JSON answer or None); raises urllib3's HTTPError when no
        answer came."""
        resp = self.pools.request(method, url, headers=self.headers,
                                  timeout=timeout or self.timeout,
                                  body=None if body is None else json.dumps(body).encode())
        return resp.status, decode(resp.data)

    def close(self) -> None:
        self.pools.clear()


def decode(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def describe_failure(exc: BaseException, phase: str, connect_timeout: float,
                     read_timeout: float):
    """(what happened, whether the request may have reached the service). Only a
    connection that was never made proves the service never saw the request; a reset or
    a read timeout may come after it committed."""
    if isinstance(exc, socket.gaierror):
        return f"name not resolved: {exc}", False
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listening)", False
    if phase == "connect":
        if isinstance(exc, TimeoutError):
            return f"connect timeout after {connect_timeout:g} s", False
        return f"could not connect: {exc}", False
    if isinstance(exc, TimeoutError):
        return f"read timeout after {read_timeout:g} s (no answer)", True
    text = repr(exc) if not str(exc) else f"{type(exc).__name__}: {exc}"
    return f"connection reset before an answer: {text[:200]}", True


def outcome(started: float, status_code, message, *, ok=False, refused=False, reached=True,
            body=None) -> Outcome:
    return Outcome(ok=ok, refused=refused, reached=reached, status_code=status_code,
                   elapsed_ms=int((time.monotonic() - started) * 1000), message=message,
                   body=body)


# What a service's ledger holds for a step it answers with a 4xx that proves nothing
# was written: a refusal it recorded, or a compensation (a tombstone) that came first.
LEDGER_NO_WRITE = ("refused", "compensated")


def outcome_of_answer(started: float, status: int, payload, action: str) -> Outcome:
    """Only a refusal the service says it recorded in its ledger is its final no. Any
    other 4xx (a wrong token after a restart, a proxy's, a path that moved) comes from
    something that may stand in front of a step that already committed: like a 5xx, a
    failure whose outcome is unknown."""
    detail = payload.get("error") if isinstance(payload, dict) else None
    if 400 <= status < 500 and action == "invoke" and isinstance(payload, dict) \
            and payload.get("ledger") in LEDGER_NO_WRITE:
        return outcome(started, status, f"HTTP {status}: {detail or 'refused'}", refused=True)
    if status >= 500:
        return outcome(started, status, f"HTTP {status}: {detail or 'server error'}")
    if status >= 400:
        return outcome(started, status, f"HTTP {status}: {detail or 'client error'} "
                                        "(no refusal in the service's ledger)")
    if not isinstance(payload, dict):
        return outcome(started, status, "answer was not a JSON object")
    return outcome(started, status, describe_success(action, payload), ok=True, body=payload)


def describe_success(action: str, payload: dict) -> str:
    if action == "compensate":
        return f"compensated ({payload.get('undone', 'nothing to undo')})"
    ids = ", ".join(f"{k}={v}" for k, v in payload.items() if k not in ("status", "saga_id"))
    return f"committed ({ids})" if ids else "committed"
