"""Calling a service: one call becomes an Outcome the engine can decide on. HTTP here;
saga/kafka_transport.py sends the same calls as Kafka commands."""

import json
import time

import urllib3
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, NameResolutionError,
                                NewConnectionError, ProtocolError, ReadTimeoutError)

from common import Settings
from saga.model import Outcome


class HttpTransport:
    """JSON over HTTP: urllib3's keep-alive connection pools (requests' own engine,
    without its per-call work on proxies, cookies and hooks), no retries of its own
    (retrying is the saga's decision), a connect and a read timeout on every call."""

    name = "http"

    def __init__(self, settings: Settings, maxsize: int):
        self.urls = settings.service_urls
        self.pools = urllib3.PoolManager(num_pools=16, maxsize=maxsize, retries=False)
        self.headers = {"Content-Type": "application/json"}
        if settings.api_token:
            self.headers["Authorization"] = f"Bearer {settings.api_token}"
        self.connect_timeout, self.read_timeout = settings.connect_timeout, settings.read_timeout
        self.timeout = urllib3.Timeout(connect=self.connect_timeout, read=self.read_timeout)

    def call(self, service: str, action: str, fields: dict) -> Outcome:
        """POST /invoke or /compensate to `service`; never raises for a failed call."""
        started = time.monotonic()
        try:
            status, payload = self.request("POST", f"{self.urls[service]}/{action}", fields)
        except HTTPError as exc:
            message, reached = describe_failure(exc, self.connect_timeout, self.read_timeout)
            return outcome(started, None, message, reached=reached)
        return outcome_of_answer(started, status, payload, action)

    def request(self, method: str, url: str, body=None, timeout=None):
        """(HTTP status, the JSON answer or None); raises urllib3's HTTPError when no
        answer came."""
        resp = self.pools.request(method, url, headers=self.headers,
                                  timeout=timeout or self.timeout,
                                  body=None if body is None else json.dumps(body).encode())
        try:
            payload = json.loads(resp.data)
        except ValueError:
            payload = None
        return resp.status, payload

    def close(self) -> None:
        self.pools.clear()


def describe_failure(exc: HTTPError, connect_timeout: float, read_timeout: float):
    """(what happened, whether the request may have reached the service). urllib3's
    refused-connection and name errors subclass its connect timeout, so the order of
    these checks matters. Only a connection that was never made proves the service never
    saw the request; a reset or a read timeout may come after it committed."""
    if isinstance(exc, NameResolutionError):
        return f"name not resolved: {_reason(exc)}", False
    if isinstance(exc, NewConnectionError):
        if isinstance(exc.__context__, ConnectionRefusedError) or "refused" in str(exc).lower():
            return "connection refused (nothing listening)", False
        return f"could not connect: {_reason(exc)}", False
    if isinstance(exc, ConnectTimeoutError):
        return f"connect timeout after {connect_timeout:g} s", False
    if isinstance(exc, ReadTimeoutError):
        return f"read timeout after {read_timeout:g} s (no answer)", True
    if isinstance(exc, ProtocolError):
        return f"connection reset before an answer: {_reason(exc)}", True
    return f"connection failed: {_reason(exc)}", True


def _reason(exc: BaseException) -> str:
    cause = exc.__context__ or exc.__cause__
    text = str(cause if cause is not None and str(cause) else exc)
    if isinstance(exc, ProtocolError) and len(exc.args) > 1:
        text = repr(exc.args[1])
    return text if len(text) <= 200 else text[:197] + "..."


def outcome(started: float, status_code, message, *, ok=False, refused=False, reached=True,
            body=None) -> Outcome:
    return Outcome(ok=ok, refused=refused, reached=reached, status_code=status_code,
                   elapsed_ms=int((time.monotonic() - started) * 1000), message=message,
                   body=body)


def outcome_of_answer(started: float, status: int, payload, action: str) -> Outcome:
    """5xx, 408 and 429 may succeed on a retry; any other 4xx is the service's final no."""
    detail = payload.get("error") if isinstance(payload, dict) else None
    if status >= 500 or status in (408, 429):
        return outcome(started, status, f"HTTP {status}: {detail or 'server error'}")
    if status >= 400:
        return outcome(started, status, f"HTTP {status}: {detail or 'refused'}", refused=True)
    if not isinstance(payload, dict):
        return outcome(started, status, "answer was not a JSON object")
    return outcome(started, status, describe_success(action, payload), ok=True, body=payload)


def describe_success(action: str, payload: dict) -> str:
    if action == "compensate":
        return f"compensated ({payload.get('undone', 'nothing to undo')})"
    ids = ", ".join(f"{k}={v}" for k, v in payload.items() if k not in ("status", "saga_id"))
    return f"committed ({ids})" if ids else "committed"
