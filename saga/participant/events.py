"""Events over RabbitMQ, for the choreography: the topology, the outbox relay and the
consumers. What an event means is in saga/participant/choreography.py; this module only
moves events, and moves them so that none is lost:

- an event is written to OUTBOX in the same transaction as the business change that
  caused it, and the relay publishes it with publisher confirms before it marks it
  published (a crash in between publishes it again: consumers are idempotent);
- a consumer acknowledges a message only after its handler's transaction committed (a
  crash in between redelivers it: the ledger answers the repeat);
- queues are durable and messages persistent, so a broker restart loses nothing;
- a handler that fails is retried after a delay through a per-attempt retry queue whose
  messages dead-letter back to the service's queue;
- a message that cannot be read (not JSON, not an event, a bad header) is parked in the
  service's dead-letter queue, counted and logged, never retried and never the end of a
  consumer.

Relay and consumers run as threads in each server worker process (started after the
fork), so a worker that gunicorn replaces, or several processes of one service, each
run their own: the relay claims outbox rows with SKIP LOCKED, the consumers share the
service's queue."""

import json
import logging
import os
import threading
import time

import mysql.connector
import pika
import pika.exceptions

from saga.common import Database, Settings, UnsupportedServer, backoff_delay
from saga.store import LogEntry, insert_log

log = logging.getLogger("saga")

ATTEMPT_HEADER = "x-saga-attempt"
EVENT_HEADER = "x-saga-event"   # a retried copy comes back under the queue's name
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


def connect(settings: Settings) -> pika.BlockingConnection:
    params = pika.URLParameters(settings.rabbitmq_url)
    params.heartbeat = 30
    params.blocked_connection_timeout = 30
    params.connection_attempts = 1
    params.socket_timeout = 5
    return pika.BlockingConnection(params)


def declare_topology(channel, settings: Settings, bindings: dict) -> None:
    """Every service declares the whole topology (it is idempotent), so no event is
    unroutable because the service that consumes it has not started yet."""
    channel.exchange_declare(exchange(settings), exchange_type="topic", durable=True)
    for service, keys in bindings.items():
        queue = service_queue(settings, service)
        channel.queue_declare(queue, durable=True)
        channel.queue_declare(dead_letter_queue(settings, service), durable=True)
        for key in keys:
            channel.queue_bind(queue, exchange(settings), routing_key=key)
        for delay in retry_delays(settings):
            channel.queue_declare(retry_queue(settings, service, delay), durable=True, arguments={
                "x-message-ttl": delay, "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue})


class BrokerThread(threading.Thread):
    """A thread that keeps one connection to the broker and does its work over it
    (`serve`), connecting again with backoff whenever the broker or the database fails
    under it; it says so once, not on every try."""

    def __init__(self, name: str, settings: Settings, bindings: dict,
                 stopping: threading.Event):
        super().__init__(name=name, daemon=True)
        self.settings, self.bindings, self.stopping = settings, bindings, stopping

    def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            connection = None
            try:
                connection = connect(self.settings)
                channel = connection.channel()
                declare_topology(channel, self.settings, self.bindings)
                channel.confirm_delivery()
                failures = 0
                self.serve(connection, channel)
            except DropConnection:
                connection.close()
            except (*BROKER_ERRORS, mysql.connector.Error, UnsupportedServer) as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    # pika's connection errors often carry no text: name the error
                    log.warning("%s: %s; retrying", self.name,
                                str(exc) or f"{type(exc).__name__} (broker not reachable "
                                            f"at {self.settings.rabbitmq_url.split('@')[-1]})")
                self.stopping.wait(backoff_delay(0.1, 2.0, failures))

    def serve(self, connection, channel) -> None:
        raise NotImplementedError


class Outbox:
    """The statements on OUTBOX."""

    @staticmethod
    def add(cur, service: str, saga_id: str, event: str, payload: dict) -> None:
        cur.execute("INSERT INTO OUTBOX (service, saga_id, event, payload) "
                    "VALUES (%s, %s, %s, %s)",
                    (service, saga_id, event, json.dumps(payload, ensure_ascii=False)))

    @staticmethod
    def claim_pending(cur, service: str, limit: int = 100) -> list[dict]:
        cur.execute("SELECT id, saga_id, event, payload FROM OUTBOX WHERE service = %s AND "
                    "published_at IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
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
                    channel.basic_publish(
                        exchange(self.settings), row["event"], row["payload"].encode(),
                        mandatory=True, properties=pika.BasicProperties(
                            delivery_mode=pika.DeliveryMode.Persistent,
                            content_type="application/json", message_id=str(row["id"]),
                            headers={EVENT_HEADER: row["event"]}))
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


class Consumer(BrokerThread):
    """Takes this service's events one at a time and acknowledges each only after its
    handler finished. `handle(event, payload, attempt)` returns "done", "retry" (the
    handler failed and may succeed later), "crash" or "drop" (an injected fault), or
    raises Unreadable."""

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
            verdict = self.handle(str(event), payload, attempt)
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
            # The copy is confirmed by the broker before the original is acknowledged.
            delay = self.delays[min(attempt, len(self.delays)) - 1]
            channel.basic_publish("", retry_queue(self.settings, self.service, delay), body,
                                  properties=(
                pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                     content_type="application/json",
                                     headers={**headers, EVENT_HEADER: event,
                                              ATTEMPT_HEADER: attempt + 1})))
            verdict = "done"
        if verdict == "crash":
            log.warning("injected crash after commit: exiting")
            os._exit(1)
        if verdict == "drop":
            log.warning("injected connection drop after commit")
            raise DropConnection()
        channel.basic_ack(deliver.delivery_tag)


    def park(self, channel, deliver, properties, body: bytes, reason: str) -> None:
        """Into the dead-letter queue (confirmed by the broker), then acknowledged."""
        queue = service_queue(self.settings, self.service)
        log.error("consumer %s: parked a message from %s in %s (%s): %r", self.service,
                  queue, dead_letter_queue(self.settings, self.service), reason, body[:200])
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        channel.basic_publish("", dead_letter_queue(self.settings, self.service), body,
                              properties=pika.BasicProperties(
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
