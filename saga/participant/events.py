"""Events over RabbitMQ, for the choreography: the topology, the outbox relay and the
consumers. What an event means is in saga/participant/choreography.py; this module only
moves events, and moves them so that none is lost:

- an event is written to OUTBOX in the same transaction as the business change that
  caused it, and the relay publishes it with publisher confirms before it marks it
  published (a crash in between publishes it again: consumers are idempotent);
- a consumer acknowledges a message only after its handler's transaction committed (a
  crash in between redelivers it: the ledger answers the repeat);
- queues are durable and messages persistent, so a broker restart loses nothing;
- RABBITMQ_URL may name several nodes of one cluster: every connection goes to one of
  them that answers, and the queues are then quorum queues (replicated, a publish is
  confirmed once a majority of nodes hold it), so a node's death loses nothing either;
- a handler that fails is retried after a delay through a per-attempt retry queue; the
  retry copy is confirmed by the broker before the original is acknowledged, and a
  copy refused leaves the original unacknowledged (the connection is closed, the
  broker redelivers it). Classic retry queues have a TTL and dead-letter back into the
  service's queue; quorum ones are emptied by the services themselves (RetryMover),
  since RabbitMQ 3.10's dead-lettering out of a quorum queue can stall for good when a
  node dies;
- a message that cannot be read (not JSON, not an event, a bad header) is parked in the
  service's dead-letter queue, counted and logged, never retried and never the end of a
  consumer.

Relay and consumers run as threads in each server worker process (started after the
fork), so a worker that gunicorn replaces, or several processes of one service, each
run their own: the relay claims outbox rows with SKIP LOCKED, the consumers share the
service's queue."""

import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field

import mysql.connector
import pika
import pika.exceptions

from saga.common import Database, Settings, UnsupportedServer, backoff_delay
from saga import tracing
from saga.faults import Carrier, FaultMode
from saga.logs import describe
from saga.store import LogEntry, insert_log

log = logging.getLogger("saga")

ATTEMPT_HEADER = "x-saga-attempt"
EVENT_HEADER = "x-saga-event"   # a retried copy comes back under the queue's name
DUE_HEADER = "x-saga-due"       # when a retry copy is due, in ms since the epoch
BROKER_ERRORS = (pika.exceptions.AMQPError, OSError)


# Names carry the database's name: several saga databases (a demo and a test run, say)
# can share one broker without taking each other's events.
def exchange(settings: Settings) -> str:
    return f"saga.{settings.db_name}.events"


def service_queue(settings: Settings, service: str) -> str:
    return f"saga.{settings.db_name}.{service}"


def retry_delays(settings: Settings) -> list[int]:
    """Milliseconds to wait before attempt 2, 3, ... (the last one repeats)."""
    return [int(1000 * min(settings.backoff_max, settings.backoff_base * 2 ** (n - 1))) or 1
            for n in range(1, max(2, settings.max_attempts))]


def retry_queue(settings: Settings, service: str, delay_ms: int) -> str:
    # The delay is in the name: a queue's TTL cannot change once it is declared.
    return f"{service_queue(settings, service)}.retry.{delay_ms}ms"


def dead_letter_queue(settings: Settings, service: str) -> str:
    return f"{service_queue(settings, service)}.dead"


class Unreadable(Exception):
    """A message no handler can make sense of, now or on a redelivery: parked."""


class TopologyMismatch(Exception):
    """A queue exists with other arguments than this process declares (classic where
    quorum is wanted, say): a queue cannot change in place, tools/upgrade.py moves it."""


def broker_urls(settings: Settings) -> list[str]:
    """RABBITMQ_URL names one node, or several nodes of one cluster, comma-separated."""
    return [url.strip() for url in settings.rabbitmq_url.split(",") if url.strip()]


def queue_type(settings: Settings) -> str:
    """RABBITMQ_QUEUE_TYPE, or by default quorum when RABBITMQ_URL names several nodes
    and classic on one: a classic queue lives on one node, and while that node is down
    its events are refused (or, worse, dropped); a quorum queue is replicated on every
    node and serves while a majority is up. One node keeps classic queues, so an
    existing deployment's queues stay as they are."""
    return settings.rabbitmq_queue_type or (
        "quorum" if len(broker_urls(settings)) > 1 else "classic")


# A quorum queue counts how often it handed a message out without getting an ack back
# (its consumer died, or lost its node). A message that came back this often kills
# whoever takes it: it is parked in the dead-letter queue instead of looping forever.
DELIVERY_LIMIT = 20
RETRY_PREFETCH = 200   # retry copies a RetryMover holds until they are due


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict
    routing_keys: tuple = field(default=())


def topology(settings: Settings, bindings: dict, kind: str) -> list[Queue]:
    """Every queue of the choreography, with its arguments and routing keys."""
    quorum = kind == "quorum"
    # A quorum queue dead-letters at most once unless told otherwise: a node dying as a
    # message moves on to the dead-letter queue would lose it. At least once needs
    # reject-publish.
    safe = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    base = {"x-queue-type": "quorum"} if quorum else {}
    queues = []
    for service, keys in bindings.items():
        queue, dead = service_queue(settings, service), dead_letter_queue(settings, service)
        queues.append(Queue(queue, {**base, **({
            "x-delivery-limit": DELIVERY_LIMIT, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": dead, **safe} if quorum else {})}, tuple(keys)))
        queues.append(Queue(dead, dict(base)))
        for delay in retry_delays(settings):
            # Quorum retry queues have no TTL: RetryMover moves their messages when due.
            queues.append(Queue(retry_queue(settings, service, delay), dict(base) if quorum
                                else {"x-message-ttl": delay, "x-dead-letter-exchange": "",
                                      "x-dead-letter-routing-key": queue}))
    return queues


def connection_parameters(settings: Settings) -> list[pika.URLParameters]:
    """One set per node, in a random order: the connections of all processes spread
    over the nodes, and a dead node is not always the first one tried."""
    nodes = []
    for url in broker_urls(settings):
        params = pika.URLParameters(url)
        params.heartbeat = 30
        params.blocked_connection_timeout = 30
        params.connection_attempts = 1
        params.socket_timeout = 5
        nodes.append(params)
    random.shuffle(nodes)
    return nodes


def connect(settings: Settings) -> pika.BlockingConnection:
    """A connection to the first node that answers (each is tried once)."""
    return pika.BlockingConnection(connection_parameters(settings))


def declare_topology(channel, settings: Settings, bindings: dict,
                     kind: str | None = None) -> None:
    """Every service declares the whole topology (it is idempotent), so no event is
    unroutable because the service that consumes it has not started yet."""
    channel.exchange_declare(exchange(settings), exchange_type="topic", durable=True)
    for queue in topology(settings, bindings, kind or queue_type(settings)):
        try:
            channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:   # PRECONDITION_FAILED: other arguments
                raise
            raise TopologyMismatch(
                f"queue {queue.name} exists with other arguments than wanted "
                f"({kind or queue_type(settings)} queues): {exc.reply_text}; stop the "
                f"services and run ./run.sh upgrade (tools/upgrade.py) to move it") from None
        for key in queue.routing_keys:
            channel.queue_bind(queue.name, exchange(settings), routing_key=key)


class BrokerThread(threading.Thread):
    """A thread that keeps one connection to the broker and does its work over it
    (`serve`), connecting again with backoff whenever the broker or the database fails
    under it; it says so once, not on every try."""

    def __init__(self, name: str, settings: Settings, bindings: dict,
                 stopping: threading.Event):
        super().__init__(name=name, daemon=True)
        self.settings, self.bindings, self.stopping = settings, bindings, stopping
        self.queue_type = queue_type(settings)

    def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            connection = None
            try:
                connection = connect(self.settings)
                channel = connection.channel()
                declare_topology(channel, self.settings, self.bindings, self.queue_type)
                channel.confirm_delivery()
                failures = 0
                self.serve(connection, channel)
            except DropConnection:
                connection.close()
            except TopologyMismatch as exc:
                # Not this process's to fix: said loudly, and tried again until an
                # operator has moved the queue.
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.error("%s: %s", self.name, exc)
                connection.close()
                self.stopping.wait(backoff_delay(0.1, 2.0, failures))
            except (*BROKER_ERRORS, mysql.connector.Error, UnsupportedServer) as exc:
                # Closed, so a message taken and not acknowledged (its retry copy was
                # refused, say) goes back to its queue now, not at a heartbeat timeout.
                close_quietly(connection)
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    # pika's connection errors often carry no text: describe() names
                    # the error's class and what it wraps
                    where = "database" if isinstance(exc, (mysql.connector.Error,
                                                           UnsupportedServer)) \
                        else f"broker not reachable at {nodes_named(self.settings)}"
                    log.warning("%s: %s (%s); retrying", self.name, describe(exc), where)
                self.stopping.wait(backoff_delay(0.1, 2.0, failures))

    def serve(self, connection, channel) -> None:
        raise NotImplementedError


def close_quietly(connection) -> None:
    try:
        if connection is not None and connection.is_open:
            connection.close()
    except BROKER_ERRORS:
        pass   # already gone: the broker has dropped it, and requeued what it held


def nodes_named(settings: Settings) -> str:
    """The broker nodes of RABBITMQ_URL, host:port only (no credentials in a log)."""
    return ", ".join(url.split("@")[-1] for url in broker_urls(settings))


class Outbox:
    """The statements on OUTBOX."""

    @staticmethod
    def add(cur, service: str, saga_id: str, event: str, payload: dict) -> None:
        """The event keeps the trace context it is written in, for the relay."""
        cur.execute("INSERT INTO OUTBOX (service, saga_id, event, payload, trace) "
                    "VALUES (%s, %s, %s, %s, %s)",
                    (service, saga_id, event, json.dumps(payload, ensure_ascii=False),
                     tracing.traceparent()))

    @staticmethod
    def count_pending(cur, service: str) -> int:
        """Events committed and not yet published (read from the outbox_pending index)."""
        cur.execute("SELECT COUNT(*) AS n FROM OUTBOX WHERE service = %s AND "
                    "published_at IS NULL", (service,))
        return cur.fetchone()["n"]

    @staticmethod
    def claim_pending(cur, service: str, limit: int = 100) -> list[dict]:
        cur.execute("SELECT id, saga_id, event, payload, trace FROM OUTBOX WHERE service = %s "
                    "AND published_at IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                    (service, limit))
        return cur.fetchall()

    @staticmethod
    def mark_published(cur, ids) -> None:
        marks = ", ".join(["%s"] * len(ids))
        cur.execute(f"UPDATE OUTBOX SET published_at = NOW(3) WHERE id IN ({marks})", ids)

    @staticmethod
    def purge(cur, service: str, older_than_days: float, batch: int = 500) -> int:
        """Published events older than the retention (an unpublished one is never
        purged: the relay still owes it to the broker)."""
        cur.execute("DELETE FROM OUTBOX WHERE service = %s AND published_at < "
                    "NOW(3) - INTERVAL %s MICROSECOND LIMIT %s",
                    (service, int(older_than_days * 86400e6), batch))
        return cur.rowcount


class Relay(BrokerThread):
    """Publishes this service's committed events, oldest first, with confirms."""

    def __init__(self, service: str, db: Database, settings: Settings, bindings: dict,
                 stopping: threading.Event):
        super().__init__(f"relay-{service}", settings, bindings, stopping)
        self.service, self.db = service, db
        self.wake = threading.Event()   # set after this process commits an event

    def serve(self, connection, channel) -> None:
        next_scan = 0.0
        while not self.stopping.is_set():
            woken = self.wake.wait(0.05)
            connection.process_data_events(0)   # heartbeats
            if not woken and time.monotonic() < next_scan:
                continue
            self.wake.clear()
            next_scan = time.monotonic() + 0.5   # also pick up other processes' leftovers
            while self.publish_batch(channel):
                pass

    def publish_batch(self, channel) -> int:
        def publish(cur):
            rows = Outbox.claim_pending(cur, self.service)
            if not rows:
                return 0
            # Log first: ids are handed out at insert, so each 'published' row sorts
            # before whatever its consumers log, even though it commits after.
            insert_log(cur, [LogEntry(r["saga_id"], self.service, "published",
                                      f"published {r['event']}", action="publish",
                                      event=r["event"]) for r in rows])
            for row in rows:
                try:
                    with tracing.span(f"publish {row['event']}", row["trace"], tracing.PRODUCER,
                                      **{"saga.id": row["saga_id"],
                                         "saga.event": row["event"]}) as span:
                        headers = {EVENT_HEADER: row["event"]}
                        if row["trace"]:
                            headers["traceparent"] = tracing.traceparent(span) or row["trace"]
                        channel.basic_publish(
                            exchange(self.settings), row["event"], row["payload"].encode(),
                            mandatory=True, properties=pika.BasicProperties(
                                delivery_mode=pika.DeliveryMode.Persistent,
                                content_type="application/json", message_id=str(row["id"]),
                                headers=headers))
                except pika.exceptions.UnroutableError:
                    # No queue is bound to it, now or after any retry: published again
                    # it would jam every event behind it. Said, and let go.
                    log.error("relay %s: no queue takes event %s (saga %s, outbox row %s); "
                              "dropped", self.service, row["event"], row["saga_id"],
                              row["id"])
            Outbox.mark_published(cur, [r["id"] for r in rows])
            return len(rows)

        # A crash after the broker confirmed but before this commit publishes the
        # events again: at least once, and the consumers are idempotent.
        return self.db.run(publish, attempts=2)


class DeadLetters:
    """How many messages this process parked, for /health."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.count += 1


class Consumer(BrokerThread, Carrier):
    """Takes this service's events one at a time and acknowledges each only after its
    handler finished. `handle(event, payload, attempt)` returns "done", "retry" (the
    handler failed and may succeed later) or the injected fault to strike after the
    commit (a FaultMode: a crash, or a drop that closes the connection unacknowledged),
    or raises Unreadable."""

    def __init__(self, service: str, settings: Settings, bindings: dict, handle,
                 stopping: threading.Event, number: int, dead: DeadLetters):
        super().__init__(f"consumer-{service}-{number}", settings, bindings, stopping)
        self.service, self.handle, self.dead = service, handle, dead
        self.delays = retry_delays(settings)

    def serve(self, connection, channel) -> None:
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(service_queue(self.settings, self.service), self.on_message)
        while not self.stopping.is_set():
            connection.process_data_events(time_limit=0.2)

    def on_message(self, channel, deliver, properties, body: bytes) -> None:
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        event = headers.get(EVENT_HEADER, deliver.routing_key)
        try:
            attempt = read_attempt(headers)
            try:
                payload = json.loads(body)
            except ValueError:
                raise Unreadable("not JSON") from None
            with tracing.span(f"handle {event}", tracing.header_value(headers),
                              tracing.CONSUMER, **{
                                  "saga.id": str(payload.get("saga_id"))
                                  if isinstance(payload, dict) else "",
                                  "saga.event": str(event), "saga.attempt": attempt,
                                  "saga.service": self.service}) as span:
                verdict = self.handle(str(event), payload, attempt)
                tracing.outcome(span, verdict if isinstance(verdict, str) else "done",
                                verdict == "retry")
        except (mysql.connector.Error, UnsupportedServer) as exc:
            log.warning("consumer %s: %s on %s; will retry", self.service, exc, event)
            verdict = "retry"
        except Unreadable as exc:
            return self.park(channel, deliver, properties, body, str(exc))
        except Exception as exc:
            # A bug or a message of a shape nobody foresaw: it would fail the same way on
            # every redelivery, so it is parked where an operator can look at it.
            log.exception("consumer %s: handling %s failed", self.service, event)
            return self.park(channel, deliver, properties, body,
                             f"handler failed: {type(exc).__name__}: {exc}")
        if verdict == "retry":
            # The copy is confirmed by the broker before the original is acknowledged;
            # a copy refused (NackError) or unroutable (UnroutableError: the queue is
            # gone) raises before the ack, and run() closes the connection, so the
            # broker hands the original out again.
            delay = self.delays[min(attempt, len(self.delays)) - 1]
            channel.basic_publish("", retry_queue(self.settings, self.service, delay), body,
                                  mandatory=True, properties=(
                pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                     content_type="application/json",
                                     headers={**headers, EVENT_HEADER: event,
                                              ATTEMPT_HEADER: attempt + 1,
                                              DUE_HEADER: int(time.time() * 1000) + delay})))
            verdict = "done"
        if isinstance(verdict, FaultMode):
            verdict.after_commit(self)   # a crash or a drop never gets to the ack
        channel.basic_ack(deliver.delivery_tag)

    def drop(self) -> None:
        raise DropConnection()   # the broker redelivers: the caller never heard


    def park(self, channel, deliver, properties, body: bytes, reason: str) -> None:
        """Into the dead-letter queue (confirmed by the broker), then acknowledged."""
        queue = service_queue(self.settings, self.service)
        log.error("consumer %s: parked a message from %s in %s (%s): %r", self.service,
                  queue, dead_letter_queue(self.settings, self.service), reason, body[:200])
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        channel.basic_publish("", dead_letter_queue(self.settings, self.service), body,
                              mandatory=True, properties=pika.BasicProperties(
                                  delivery_mode=pika.DeliveryMode.Persistent,
                                  headers={**headers, "x-saga-parked": reason[:500],
                                           "x-saga-routing-key": deliver.routing_key}))
        channel.basic_ack(deliver.delivery_tag)
        self.dead.add()


def read_attempt(headers: dict) -> int:
    value = headers.get(ATTEMPT_HEADER, 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise Unreadable(f"{ATTEMPT_HEADER} header must be a positive integer, not {value!r}")
    return value


class DropConnection(Exception):
    """Close the connection without acknowledging: the broker redelivers."""


class RetryMover(BrokerThread):
    """Quorum mode: moves each message of this service's retry queues back into the
    service's queue once it is due (DUE_HEADER; a message without one is due now), the
    copy confirmed before the message is acknowledged, so a crash or a dead node hands
    it out again rather than losing it (a repeat is answered by the ledger).

    Why not a TTL and dead-lettering, as classic queues do: in RabbitMQ 3.10 a quorum
    queue's at-least-once dead-letter worker hands each expired message to the target
    queue's client and waits for its confirm; when the target's leader is killed, that
    confirm can be lost for good (rabbit_fifo_dlx_worker's settle timeout republishes
    to classic targets only, leaving quorum ones to their client), and the message then
    sits in the retry queue, checked out to the worker, and its saga never ends (the
    symptom of rabbitmq/rabbitmq-server#10718, "Messages on queue with TTL do not
    expire"). Classic retry queues are no way out: a classic queue dead-letters without
    confirms, into a service queue whose leader may be the node that just died."""

    def __init__(self, service: str, settings: Settings, bindings: dict,
                 stopping: threading.Event):
        super().__init__(f"retry-mover-{service}", settings, bindings, stopping)
        self.service = service
        self.queues = [retry_queue(settings, service, delay) for delay in retry_delays(settings)]

    def serve(self, connection, channel) -> None:
        # A retry queue is first in, first due (one delay each): holding a few hundred
        # at a time keeps a burst of retries from waiting on each other's turn.
        channel.basic_qos(prefetch_count=RETRY_PREFETCH)
        for queue in self.queues:
            channel.basic_consume(queue, lambda ch, deliver, props, body: self.hold(
                connection, ch, deliver, props, body))
        while not self.stopping.is_set():
            connection.process_data_events(time_limit=0.2)

    def hold(self, connection, channel, deliver, properties, body: bytes) -> None:
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        due = headers.get(DUE_HEADER)
        wait = due / 1000 - time.time() if isinstance(due, int) else 0
        move = lambda: self.move(channel, deliver, properties, body)   # noqa: E731
        if wait > 0:
            # Held unacknowledged until then: if this connection dies first, the broker
            # hands the message to another mover (and the timer dies with it).
            connection.call_later(min(wait, 3600), move)
        else:
            move()

    def move(self, channel, deliver, properties, body: bytes) -> None:
        headers = {k: v for k, v in (properties.headers or {}).items()
                   if k not in (DUE_HEADER, "x-delivery-count")}
        properties.headers = headers
        # Raises on a refusal (NackError, UnroutableError) before the ack: run() closes
        # the connection and the broker hands the message out again.
        channel.basic_publish("", service_queue(self.settings, self.service), body,
                              mandatory=True, properties=properties)
        channel.basic_ack(deliver.delivery_tag)
