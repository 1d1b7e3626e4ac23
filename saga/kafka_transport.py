"""Calling a service over Kafka: the step's command goes to the topic of the service that
owns it, keyed by the saga; the answer comes back on the reply topic, matched by the
command's id. The engine above is the same as over HTTP: the command was persisted as
the saga's next call before it is sent, no reply within SAGA_READ_TIMEOUT is a failed
attempt that is retried (the service answers the repeat from its ledger), and a reply
nobody waits for any more (a stale attempt's) is dropped."""

import json
import logging
import threading
import time
import uuid

from confluent_kafka import OFFSET_END, Consumer, KafkaException, Producer, TopicPartition

from saga.common import Settings
from saga.kafka_io import (CONSUMER, PRODUCER, client_config, command_topic, ensure_topics,
                      reply_topic, topic_id)
from saga.model import Outcome
from saga.transport import outcome, outcome_of_answer

log = logging.getLogger("saga")


class Waiter:
    def __init__(self):
        self.done = threading.Event()
        self.reply: dict | None = None
        self.error: str | None = None


class KafkaTransport:
    name = "kafka"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.producer = Producer(client_config(settings, **PRODUCER))
        self.waiters: dict[str, Waiter] = {}
        self.lock = threading.Lock()
        self.listening = threading.Event()
        self.stopping = threading.Event()
        threading.Thread(target=self.deliver_loop, name="kafka-deliver", daemon=True).start()
        threading.Thread(target=self.reply_loop, name="kafka-replies", daemon=True).start()

    def call(self, service: str, action: str, fields: dict,
             timeout: float | None = None, trace: str | None = None) -> Outcome:
        wait = timeout or self.settings.read_timeout
        started = time.monotonic()
        # Replies are read from the end of the topic: send nothing before listening.
        if not self.listening.wait(self.settings.connect_timeout + self.settings.read_timeout):
            return outcome(started, None, "Kafka not reachable: no reply listener yet",
                           reached=False)
        command_id = uuid.uuid4().hex
        waiter = Waiter()
        with self.lock:
            self.waiters[command_id] = waiter
        try:
            value = json.dumps({"id": command_id, "action": action, "fields": fields})
            try:
                self.producer.produce(command_topic(self.settings, service), value.encode(),
                                      key=fields["saga_id"].encode(),
                                      headers=[("traceparent", trace.encode())] if trace
                                      else None,
                                      on_delivery=lambda err, msg: self.delivered(waiter, err))
            except (BufferError, KafkaException) as exc:
                return outcome(started, None, f"Kafka refused the command: {exc}",
                               reached=False)
            waiter.done.wait(wait)
            if waiter.reply is not None:
                reply = waiter.reply
                answer = outcome_of_answer(started, reply["status"], reply["body"], action)
                return Outcome(answer.ok, answer.refused, answer.reached, answer.status_code,
                               answer.elapsed_ms,
                               f"{answer.message} via kafka ({reply.get('by', '?')})", answer.body)
            if waiter.error is not None:
                # Not confirmed by the broker; it may still have been written.
                return outcome(started, None, f"Kafka did not take the command: {waiter.error}")
            return outcome(started, None, f"no reply within {wait:g} s "
                                          "(kafka)")
        finally:
            with self.lock:
                self.waiters.pop(command_id, None)

    def delivered(self, waiter: Waiter, error) -> None:
        if error is not None:
            waiter.error = str(error)
            waiter.done.set()

    def deliver_loop(self) -> None:
        """Serve the producer's delivery reports."""
        while not self.stopping.is_set():
            self.producer.poll(0.1)

    def reply_loop(self) -> None:
        """Read every partition of the reply topic from its end (no consumer group: each
        orchestrator reads all replies and keeps those it waits for)."""
        consumer, admin = None, None
        while not self.stopping.is_set():
            try:
                if consumer is None:
                    admin = ensure_topics(self.settings, admin)
                    incarnation = topic_id(admin, reply_topic(self.settings))
                    consumer = Consumer(client_config(
                        self.settings, **{**CONSUMER, "auto.offset.reset": "latest",
                                          "group.id": f"orchestrator-{uuid.uuid4().hex}"}))
                    partitions = self.reply_partitions(consumer)
                    consumer.assign([TopicPartition(reply_topic(self.settings), p, OFFSET_END)
                                     for p in partitions])
                    self.listening.set()
                    checked = time.monotonic()
                message = consumer.poll(0.1)
                if message is not None and message.error() is None:
                    self.take_reply(message.value())
                if time.monotonic() - checked > 2.0:
                    # A restarted memory-only broker comes back without topics. The one
                    # created again has the same partitions but a new id, and starts at
                    # offset 0: a consumer left at the old topic's offsets would hear
                    # nothing (Tansu answers a fetch past the end with no data and no
                    # error) until the new topic grew past them. So start over on it.
                    ensure_topics(self.settings, admin)
                    if (topic_id(admin, reply_topic(self.settings)) != incarnation
                            or self.reply_partitions(consumer) != partitions):
                        log.info("kafka replies: %s was created again; reading the new one",
                                 reply_topic(self.settings))
                        consumer.close()
                        consumer = None
                    checked = time.monotonic()
            except KafkaException as exc:
                log.warning("kafka replies: %s; retrying", exc)
                if consumer is not None:
                    consumer.close()
                consumer = None
                self.stopping.wait(1.0)
            except Exception:
                # Whatever it was, keep listening: an orchestrator deaf to the replies
                # would time out every step of every saga.
                log.exception("kafka replies: unexpected failure; starting over")
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:   # nothing more to release
                        pass
                consumer = None
                self.stopping.wait(1.0)

    def reply_partitions(self, consumer) -> list[int]:
        topic = consumer.list_topics(reply_topic(self.settings), timeout=5).topics
        meta = topic.get(reply_topic(self.settings))
        return sorted(meta.partitions) if meta and meta.partitions else [0]

    def take_reply(self, raw: bytes) -> None:
        try:
            reply = json.loads(raw)
            command_id = reply["id"]
            # What call() reads of a reply, checked here: a malformed one is dropped
            # (its call times out and is retried), never raised into the engine.
            if not (isinstance(command_id, str) and isinstance(reply["status"], int)
                    and "body" in reply and isinstance(reply.get("by", ""), str)):
                raise TypeError("not a reply")
        except (ValueError, KeyError, TypeError, RecursionError):
            log.warning("kafka replies: dropped a reply that is not one of ours: %r",
                        (raw or b"")[:200])
            return
        with self.lock:
            waiter = self.waiters.get(command_id)
        if waiter is not None:  # otherwise a stale attempt's reply: its caller moved on
            waiter.reply = reply
            waiter.done.set()

    def close(self) -> None:
        self.stopping.set()
        self.producer.flush(2)
