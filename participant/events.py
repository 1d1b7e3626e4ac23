"""Events over RabbitMQ, for the choreography: the topology, the outbox relay and the
consumers. What an event means is in participant/choreography.py; this module only
moves events, and moves them so that none is lost:

- an event is written to OUTBOX in the same transaction as the business change that
  caused it, and the relay publishes it with publisher confirms before it marks it
  published (a crash in between publishes it again: consumers are idempotent);
- a consumer acknowledges a message only after its handler's transaction committed (a
  crash in between redelivers it: the ledger answers the repeat);
- queues are durable and messages persistent, so a broker restart loses nothing;
- a handler that fails is retried after a delay through a per-attempt retry queue whose
  messages dead-letter back to the service's queue.

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

from common import Database, Settings, UnsupportedServer, backoff_delay
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
                    log.warning("%s: %s; retrying", self.name, exc)
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
    def purge(cur, older_than_days: float, batch: int = 500) -> int:
        cur.execute("DELETE FROM OUTBOX WHERE published_at < NOW(3) - INTERVAL %s MICROSECOND "
                    "LIMIT %s", (int(older_than_days * 86400e6), batch))
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
                channel.basic_publish(
                    exchange(self.settings), row["event"], row["payload"].encode(),
                    mandatory=True, properties=pika.BasicProperties(
                        delivery_mode=pika.DeliveryMode.Persistent,
                        content_type="application/json", message_id=str(row["id"]),
                        headers={EVENT_HEADER: row["event"]}))
            Outbox.mark_published(cur, [r["id"] for r in rows])
            return len(rows)

        # A crash after the broker confirmed but before this commit publishes the
        # events again: at least once, and the consumers are idempotent.
        return self.db.run(publish, attempts=2)


class Consumer(BrokerThread):
    """Takes this service's events one at a time and acknowledges each only after its
    handler finished. `handle(event, payload, attempt)` returns "done", "retry" (the
    handler failed and may succeed later), "crash" or "drop" (an injected fault)."""

    def __init__(self, service: str, settings: Settings, bindings: dict, handle,
                 stopping: threading.Event, number: int):
        super().__init__(f"consumer-{service}-{number}", settings, bindings, stopping)
        self.service, self.handle = service, handle
        self.delays = retry_delays(settings)

    def serve(self, connection, channel) -> None:
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(service_queue(self.settings, self.service), self.on_message)
        while not self.stopping.is_set():
            connection.process_data_events(time_limit=0.2)

    def on_message(self, channel, deliver, properties, body: bytes) -> None:
        headers = properties.headers or {}
        attempt = int(headers.get(ATTEMPT_HEADER, 1))
        event = headers.get(EVENT_HEADER, deliver.routing_key)
        try:
            payload = json.loads(body)
            verdict = self.handle(event, payload, attempt)
        except (mysql.connector.Error, UnsupportedServer) as exc:
            log.warning("consumer %s: %s on %s; will retry", self.service, exc, event)
            verdict = "retry"
        except ValueError:
            log.error("consumer %s: dropping a message that is not JSON: %r", self.service,
                      body[:200])
            verdict = "done"
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


class DropConnection(Exception):
    """Close the connection without acknowledging: the broker redelivers."""
