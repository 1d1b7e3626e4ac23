"""Reading requests: the one error type every 4xx answer comes from, and the readers
that turn a request body or field into a checked value or raise it."""

import json
import re
from decimal import Decimal, InvalidOperation

from flask import request

MAX_BODY_BYTES = 64 * 1024


class ApiError(Exception):
    """A request that cannot be served as asked. One handler turns it into
    {"error": message, "field": field, ...} with `status` (400 unless said otherwise)."""

    def __init__(self, message: str, field: str | None = None, status: int = 400,
                 retry_after: int | None = None, **extra):
        super().__init__(message)
        self.message, self.field, self.status, self.extra = message, field, status, extra
        self.retry_after = retry_after   # seconds, for a 503 the client should retry

    def body(self) -> dict:
        body = {"error": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update(self.extra)
        return body


def json_object() -> dict:
    """The request body as a dict, or ApiError naming what is wrong with it."""
    mimetype = request.mimetype or ""
    if mimetype != "application/json":
        raise ApiError(f"Content-Type must be application/json, not {mimetype or 'missing'}",
                       status=415)
    return parse_object(request.get_data(cache=True))


def parse_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(f"request body must be a JSON object, not {json_type(body)}")
    return body


def json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}.get(type(value), "value")


def reject_unknown_fields(body: dict, allowed) -> None:
    for name in body:
        if name not in allowed:
            raise ApiError(f"unknown field {name!r}; expected {', '.join(sorted(allowed))}", name)


def text_field(body: dict, name: str, max_length: int = 255) -> str:
    """A required, non-empty string of at most `max_length` characters."""
    if name not in body or body[name] is None:
        raise ApiError(f"{name} is required", name)
    value = body[name]
    if not isinstance(value, str):
        raise ApiError(f"{name} must be a string, not {json_type(value)}", name)
    if not value.strip():
        raise ApiError(f"{name} must not be empty", name)
    if len(value) > max_length:
        raise ApiError(f"{name} must be at most {max_length} characters, got {len(value)}", name)
    if "\x00" in value:
        raise ApiError(f"{name} must not contain NUL characters", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"{name} must be valid Unicode text (no lone surrogates)", name) from None
    return value


MAX_INT = 2 ** 31 - 1


def int_field(body: dict, name: str, low: int = 1, high: int = MAX_INT) -> int:
    """A required integer from `low` to `high` (by default a positive 32-bit one: a row
    id)."""
    value = body.get(name)
    if value is None:
        raise ApiError(f"{name} is required", name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{name} must be an integer, not {json_type(value)}", name)
    if not low <= value <= high:
        if (low, high) == (1, MAX_INT):
            raise ApiError(f"{name} must be a positive 32-bit integer", name)
        raise ApiError(f"{name} must be an integer from {low} to {high}", name)
    return value


MAX_AMOUNT = Decimal("1000000")


def amount_field(body: dict, name: str = "amount") -> str:
    """A required amount of money: a JSON number or a decimal string, more than 0, at
    most two decimal places, at most 1000000. Returned as a string with two places, so
    it is never a float anywhere after this."""
    if name not in body or body[name] is None:
        raise ApiError(f"{name} is required", name)
    raw = body[name]
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ApiError(f"{name} must be a number or a decimal string, not {json_type(raw)}",
                       name)
    if isinstance(raw, str) and not re.fullmatch(r"[0-9]{1,16}(\.[0-9]{1,16})?", raw.strip()):
        raise ApiError(f"{name} must be a positive decimal number like 12.50, not {raw!r}",
                       name)
    try:
        # repr() of a float is its shortest exact spelling: 12.5, not 12.4999...
        value = Decimal(raw.strip() if isinstance(raw, str) else repr(raw))
    except InvalidOperation:
        raise ApiError(f"{name} must be a decimal number, not {raw!r}", name) from None
    if not value.is_finite() or value <= 0:
        raise ApiError(f"{name} must be more than 0", name)
    if value > MAX_AMOUNT:
        raise ApiError(f"{name} must be at most {MAX_AMOUNT}", name)
    if value.as_tuple().exponent < -2:
        raise ApiError(f"{name} must have at most two decimal places", name)
    return str(value.quantize(Decimal("0.01")))


def choice_field(body: dict, name: str, choices, default=None) -> str:
    value = body.get(name, default)
    if value is None:
        raise ApiError(f"{name} is required", name)
    if value not in choices:
        raise ApiError(f"{name} must be one of {', '.join(choices)}, not {value!r}", name)
    return value


SAGA_ID = re.compile(r"[A-Za-z0-9_-]{1,36}")


def saga_id_field(body: dict) -> str:
    value = text_field(body, "saga_id", 36)
    if not SAGA_ID.fullmatch(value):
        raise ApiError("saga_id must be 1 to 36 letters, digits, '-' or '_'", "saga_id")
    return value


IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def idempotency_key() -> str | None:
    """The Idempotency-Key header, if the client sent one: 1-255 visible ASCII characters."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError("Idempotency-Key must be 1 to 255 visible ASCII characters "
                       "(no spaces)", "Idempotency-Key")
    return key


def query_int(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(f"{name} must be an integer", name) from None
    if not low <= value <= high:
        raise ApiError(f"{name} must be from {low} to {high}", name)
    return value


def query_choice(name: str, choices) -> str | None:
    value = request.args.get(name)
    if value is not None and value not in choices:
        raise ApiError(f"{name} must be one of {', '.join(choices)}", name)
    return value
