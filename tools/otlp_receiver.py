"""A small OTLP/HTTP trace receiver: takes what the processes export with
OTEL_TRACES_EXPORTER=otlp (POST /v1/traces, http/protobuf), keeps the spans in memory
and prints one line per span. For a quick look without a collector, and for the tests:

    .venv/bin/python tools/otlp_receiver.py --port 4318
    OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 ./run.sh demo

A real deployment points OTEL_EXPORTER_OTLP_ENDPOINT at its collector (Jaeger, Tempo,
the OpenTelemetry Collector) instead."""

import argparse
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)


def any_value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def spans_of(request: ExportTraceServiceRequest) -> list[dict]:
    """Each span as a plain dict: ids in hex, its process's service.name, attributes."""
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: any_value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append({
                    "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                    "parent_id": span.parent_span_id.hex() or None, "name": span.name,
                    "kind": span.kind, "service": resource.get("service.name"),
                    "instance": resource.get("service.instance.id"),
                    "start_ns": span.start_time_unix_nano, "end_ns": span.end_time_unix_nano,
                    "error": span.status.code == 2,
                    "attributes": {a.key: any_value(a.value) for a in span.attributes}})
    return out


class Receiver:
    """Runs in a thread of the caller's (tests) or in the foreground (main)."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", echo: bool = False,
                 keep: bool = True):
        self.spans, self.lock, self.echo, self.count = [], threading.Lock(), echo, 0
        self.keep = keep   # False: count the spans only (for the benchmark)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a collector does: the exporter reuses its connection.
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                if self.path != "/v1/traces":
                    self.send_error(404, "only /v1/traces")
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = ExportTraceServiceRequest()
                try:
                    request.ParseFromString(body)
                except Exception as exc:   # noqa: BLE001 - any undecodable body
                    self.send_error(400, f"not an ExportTraceServiceRequest: {exc}")
                    return
                if receiver.keep:
                    receiver.add(spans_of(request))
                else:
                    with receiver.lock:
                        receiver.count += sum(len(scope.spans) for rs in request.resource_spans
                                              for scope in rs.scope_spans)
                data = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"http://{host}:{self.port}"

    def add(self, spans: list[dict]) -> None:
        with self.lock:
            self.spans.extend(spans)
        if self.echo:
            for s in spans:
                attrs = s["attributes"]
                print(f"{s['trace_id']} {s['span_id']} <- {s['parent_id'] or '-':16} "
                      f"{s['service']:22} {s['name']:36} {attrs.get('saga.id', '')} "
                      f"{attrs.get('saga.outcome', '')}", flush=True)

    def of_trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def with_attribute(self, key: str, value) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["attributes"].get(key) == value]

    def start(self) -> "Receiver":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing per span, keep only a count (for the benchmark)")
    args = parser.parse_args(argv)
    receiver = Receiver(args.port, args.host, echo=not args.quiet, keep=not args.quiet)
    print(f"receiving OTLP/HTTP traces at {receiver.endpoint}/v1/traces", flush=True)
    try:
        receiver.server.serve_forever()
    except KeyboardInterrupt:
        pass
    if args.quiet:
        print(f"{receiver.count} spans received", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
