"""OTLP/HTTP export of finished spans, with the protobuf bytes written directly.

The exporter's own encoder builds a protobuf object for every span, attribute and value
and then serializes them: about 37 µs a span, more than the SDK takes to make the span.
The spans this project makes are plain (ids, name, kind, times, scalar attributes,
status), and for those `encode_spans` writes the same bytes in about 11 µs. Anything
else in a span (events, links, a trace state, a list as a value, dropped counts) is
encoded by the library, span by span; a resource and a scope are encoded by it once
each. Spans are grouped by their resource and scope objects (one each in a process),
not by equality as the library does: equal objects apart would be two groups, which
OTLP allows. `tests/test_otlp.py` checks the bytes against the library's. It uses the
exporter's `_client` and `_max_request_size`: opentelemetry 1.45 (pinned)."""

import logging
import struct

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind

log = logging.getLogger("saga")

_KIND = {SpanKind.INTERNAL: b"\x30\x01", SpanKind.SERVER: b"\x30\x02",
         SpanKind.CLIENT: b"\x30\x03", SpanKind.PRODUCER: b"\x30\x04",
         SpanKind.CONSUMER: b"\x30\x05"}
# Span.flags: the parent's is_remote is known (0x100), and it is true (0x200).
_FLAGS_LOCAL, _FLAGS_REMOTE = b"\x85\x01\x00\x01\x00\x00", b"\x85\x01\x00\x03\x00\x00"
_fixed64 = struct.Struct("<Q").pack
_double = struct.Struct("<d").pack
_INT64 = range(-2 ** 63, 2 ** 63)


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field: tag, length, bytes."""
    return tag + _varint(len(data)) + data


_keys: dict[str, bytes] = {}   # attribute key -> its KeyValue.key field (a few dozen keys)
# (key, type, value) -> its KeyValue, for the values that recur (a type, a step, an
# outcome); not for long strings such as a saga's id, nor floats (-0.0 == 0.0).
_recurring: dict[tuple, bytes] = {}


def _attribute(key: str, value) -> bytes | None:
    """Span.attributes' KeyValue for a scalar value; None for what only the library writes."""
    kind = type(value)
    if kind is int or kind is bool or (kind is str and len(value) <= 24):
        entry = (key, kind, value)
        encoded = _recurring.get(entry)
        if encoded is None:
            encoded = _encode_attribute(key, kind, value)
            if encoded is not None:
                if len(_recurring) >= 4096:
                    _recurring.clear()
                _recurring[entry] = encoded
        return encoded
    return _encode_attribute(key, kind, value)


def _encode_attribute(key: str, kind: type, value) -> bytes | None:
    if kind is str:
        any_value = _field(b"\x0a", value.encode())
    elif kind is bool:
        any_value = b"\x10\x01" if value else b"\x10\x00"
    elif kind is int and value in _INT64:
        any_value = b"\x18" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)
    elif kind is float:
        any_value = b"\x21" + _double(value)
    else:
        return None
    encoded_key = _keys.get(key)
    if encoded_key is None:
        encoded_key = _field(b"\x0a", key.encode())
        if len(_keys) >= 1000:
            _keys.clear()
        _keys[key] = encoded_key
    return _field(b"\x4a", encoded_key + _field(b"\x12", any_value))


_names: dict[tuple, bytes] = {}   # (name, kind) -> their fields (a few dozen names)


def _span(span) -> bytes:
    """One span as ScopeSpans.spans (field 2)."""
    context = span.context
    if (span.events or span.links or context.trace_state or span.dropped_attributes
            or span.dropped_events or span.dropped_links):
        return _library_span(span)
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"),
             b"\x12\x08", context.span_id.to_bytes(8, "big")]
    parent = span.parent
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    name_and_kind = _names.get((span.name, span.kind))
    if name_and_kind is None:
        name_and_kind = (_field(b"\x2a", span.name.encode()) if span.name else b"") + \
            _KIND[span.kind]
        if len(span.name) <= 64:   # not a name made of a request's junk
            if len(_names) >= 1000:
                _names.clear()
            _names[(span.name, span.kind)] = name_and_kind
    parts += (name_and_kind, b"\x39", _fixed64(span.start_time),
              b"\x41", _fixed64(span.end_time))
    for key, value in span.attributes.items():
        attribute = _attribute(key, value)
        if attribute is None:
            return _library_span(span)
        parts.append(attribute)
    status = span.status
    code, description = status.status_code.value, status.description
    parts.append(_field(b"\x7a", (_field(b"\x12", description.encode()) if description else b"")
                        + (bytes((0x18, code)) if code else b"")))
    parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return _field(b"\x12", b"".join(parts))


def _span_or_library(span) -> bytes:
    """A span's bytes, written here or (for what this cannot write: text that is not
    UTF-8, such as a lone surrogate from a request's JSON) by the library, which drops
    the attribute it cannot encode; a span neither can write is left out, alone."""
    try:
        return _span(span)
    except (UnicodeError, ValueError, TypeError):
        try:
            return _library_span(span)
        except Exception as exc:   # noqa: BLE001 - one span, not the batch
            log.warning("tracing: span %r left out, it cannot be encoded: %s: %s",
                        span.name, type(exc).__name__, exc)
            return b""


def _library_span(span) -> bytes:
    scope_spans = library_encode([span]).resource_spans[0].scope_spans[0]
    return _field(b"\x12", scope_spans.spans[0].SerializeToString())


# What the library writes once for each resource and scope (a process has one or two):
# id -> (the object, ResourceSpans' resource field | ScopeSpans' scope field, schema_url field)
_resources: dict[int, tuple] = {}
_scopes: dict[int, tuple] = {}


def _once(cache: dict, key, span, encode) -> tuple:
    entry = cache.get(id(key))
    if entry is None or entry[0] is not key:
        entry = cache[id(key)] = (key, *encode(library_encode([span]).resource_spans[0]))
    return entry


def _schema_url(url: str) -> bytes:
    """ResourceSpans' or ScopeSpans' schema_url field (field 3 of both), if any."""
    return _field(b"\x1a", url.encode()) if url else b""


def _resource_of(resource_spans) -> tuple:
    return (_field(b"\x0a", resource_spans.resource.SerializeToString()),
            _schema_url(resource_spans.schema_url))


def _scope_of(resource_spans) -> tuple:
    scope_spans = resource_spans.scope_spans[0]
    return (_field(b"\x0a", scope_spans.scope.SerializeToString()),
            _schema_url(scope_spans.schema_url))


def encode_spans(spans) -> bytes:
    """An ExportTraceServiceRequest's bytes: the spans grouped by resource, then scope."""
    groups: dict[int, tuple] = {}   # resource -> (its entry, {scope -> (its entry, spans)})
    for span in spans:
        resource = _once(_resources, span.resource, span, _resource_of)
        scopes = groups.setdefault(id(resource), (resource, {}))[1]
        scope = _once(_scopes, span.instrumentation_scope, span, _scope_of)
        scopes.setdefault(id(scope), (scope, []))[1].append(_span_or_library(span))
    out = []
    for (_, resource, resource_schema), scopes in groups.values():
        body = [resource]
        for (_, scope, scope_schema), encoded in scopes.values():
            body.append(_field(b"\x12", scope + b"".join(encoded) + scope_schema))
        body.append(resource_schema)
        out.append(_field(b"\x0a", b"".join(body)))
    return b"".join(out)


class SpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter (endpoint, headers, compression, TLS, retries from the
    standard variables), sending what `encode_spans` writes."""

    def export(self, spans) -> SpanExportResult:
        if self._shutdown:
            log.warning("tracing: exporter already shut down, %d spans not sent", len(spans))
            return SpanExportResult.FAILURE
        try:
            data = encode_spans(spans)
        except Exception as exc:   # noqa: BLE001 - a batch it cannot write is lost alone
            log.error("tracing: could not encode %d spans: %s: %s", len(spans),
                      type(exc).__name__, exc)
            return SpanExportResult.FAILURE
        if 0 < self._max_request_size < len(data):   # as the library's exporter does
            log.warning("tracing: %d spans not sent: %d bytes is over the %d-byte limit",
                        len(spans), len(data), self._max_request_size)
            return SpanExportResult.FAILURE
        result = self._client.export(data)
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE
