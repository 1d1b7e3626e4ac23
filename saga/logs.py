"""Logging: one setup for every process (SAGA_LOG_FORMAT: `text`, the default, or `json`
lines), the saga a log line is about, and exceptions that always say what failed.

A JSON line carries `saga_id` when the thread is driving a saga (the engine) or
handling a call or event of one (a participant), and `trace_id` when an OpenTelemetry
span is current; each is left out where there is none. The gunicorn server's own lines
go through the same formatter, so every line of a process is the same format."""

import logging
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import trace

LOG_FORMATS = ("text", "json")

# The saga this thread is working on: set by the engine while it drives one, and by a
# participant while it handles one's call or event.
SAGA_ID: ContextVar[str | None] = ContextVar("saga_id", default=None)


@contextmanager
def saga_context(saga_id: str | None):
    """Name `saga_id` in every log line of this thread until the block ends."""
    token = SAGA_ID.set(saga_id if isinstance(saga_id, str) else None)
    try:
        yield
    finally:
        SAGA_ID.reset(token)


def describe(exc: BaseException) -> str:
    """An exception as '<class>: <what it says>', never empty: some carry no text
    (pika's connection errors; a bare ConnectionResetError), and a warning that only
    says '; retrying' tells an operator nothing."""
    name = type(exc).__name__
    shown = repr(exc)
    if shown.startswith(f"{name}: "):   # a class that describes itself (pika's do)
        return shown
    text = str(exc).strip()
    if text:
        return f"{name}: {text}"
    cause = exc.__cause__ or exc.__context__
    return f"{shown} (caused by {describe(cause)})" if cause is not None else shown


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, None outside a valid span."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class SagaContext(logging.Filter):
    """Adds saga_id and trace_id to a record where they are known, and turns every
    exception among its arguments into describe(exc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        saga_id = SAGA_ID.get()
        if saga_id is not None and not hasattr(record, "saga_id"):
            record.saga_id = saga_id
        trace_id = current_trace_id()
        if trace_id is not None and not hasattr(record, "trace_id"):
            record.trace_id = trace_id
        if isinstance(record.args, tuple) and any(isinstance(a, BaseException)
                                                  for a in record.args):
            record.args = tuple(describe(a) if isinstance(a, BaseException) else a
                                for a in record.args)
        return True


def formatter(process: str, log_format: str) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter
        return JsonFormatter(["asctime", "levelname", "name", "process", "threadName",
                              "message"],
                             rename_fields={"asctime": "time", "levelname": "level",
                                            "process": "pid", "threadName": "thread"},
                             static_fields={"service": process})
    return logging.Formatter(f"%(asctime)s {process} %(levelname)s %(message)s")


def dress(handler: logging.Handler, process: str, log_format: str) -> None:
    """Give a handler this process's format and the saga context."""
    handler.setFormatter(formatter(process, log_format))
    if not any(isinstance(f, SagaContext) for f in handler.filters):
        handler.addFilter(SagaContext())


def configure_logging(process: str, log_format: str = "text") -> None:
    """The root logger writes to stderr in `log_format`; chatty libraries are quieted."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        dress(handler, process, log_format)
    root.setLevel(logging.INFO)
    logging.getLogger("mysql.connector").setLevel(logging.WARNING)
    # pika logs every failed connection attempt as an ERROR; our loops say it once.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def gunicorn_logger(process: str, log_format: str):
    """A gunicorn logger class whose handlers write in this process's format."""
    from gunicorn.glogging import Logger

    class SagaGunicornLogger(Logger):
        def setup(self, cfg):
            super().setup(cfg)
            if log_format != "text":   # text: gunicorn's own lines, as they always were
                for handler in self.error_log.handlers + self.access_log.handlers:
                    dress(handler, process, log_format)

    return SagaGunicornLogger
