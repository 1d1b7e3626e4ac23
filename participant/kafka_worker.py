"""A service's commands over Kafka (SAGA_TRANSPORT=kafka): each process of the service is
a member of the service's consumer group, so several processes share its command topic.
A command is run by the same participant as an HTTP call, the answer goes to the reply
topic, and only then is the command's offset committed: a process killed in between
leaves the command to be delivered again (to itself restarted, or to another member),
and the ledger answers the repeat."""

import json
import logging
import os
import threading
import time

import mysql.connector
from confluent_kafka import Consumer, KafkaException, Producer

from common import Settings, UnsupportedServer
from kafka_io import (CONSUMER, PRODUCER, client_config, command_topic, ensure_topics,
                      reply_topic, topic_id)
from participant.core import Answer, Participant
from validation import ApiError

log = logging.getLogger("saga")


def start_command_workers(participant: Participant) -> None:
    """SAGA_CONSUMERS members of the service's consumer group in this process (each
    takes commands one at a time: a stalled call holds up only its partitions), and
    what /health says of them."""
    workers = [CommandWorker(participant.service, participant, participant.settings)
               for _ in range(participant.settings.consumers)]

    def status() -> dict:
        return {"topic": command_topic(participant.settings, participant.service),
                "partitions": sorted(set().union(*(w.partitions for w in workers)))}

    participant.status["kafka"] = status
    for worker in workers:
        worker.start()


class CommandWorker(threading.Thread):
    def __init__(self, service: str, participant: Participant, settings: Settings):
        super().__init__(name=f"kafka-{service}", daemon=True)
        self.service, self.participant, self.settings = service, participant, settings
        self.me = f"{service} pid {os.getpid()}"
        self.stopping = threading.Event()
        self.partitions: set[int] = set()   # of the command topic, assigned to this thread

    def run(self) -> None:
        self.me = f"{self.service} pid {os.getpid()}"   # after the fork
        while not self.stopping.is_set():
            consumer = None
            try:
                admin = ensure_topics(self.settings)
                subscribed = topic_id(admin, command_topic(self.settings, self.service))
                if subscribed is None:   # deleted since; ensure_topics makes it again
                    continue
                producer = Producer(client_config(self.settings, **PRODUCER))
                # The group is named for the topic's incarnation: after a memory-only
                # broker restarts, the old group is never assigned the topic again
                # (Tansu 0.6), and its offsets are gone anyway. On a cluster the id
                # stays, and so do the group and its offsets.
                consumer = Consumer(client_config(
                    self.settings, **CONSUMER, **{"group.id": f"saga.{self.settings.db_name}."
                                                              f"{self.service}.{subscribed}"}))
                consumer.subscribe([command_topic(self.settings, self.service)],
                                   on_assign=self.assigned, on_revoke=self.revoked,
                                   on_lost=self.revoked)
                self.serve(consumer, producer, admin, subscribed)
            except KafkaException as exc:
                log.warning("kafka commands %s: %s; retrying", self.service, exc)
                self.stopping.wait(1.0)
            finally:
                self.partitions = set()
                if consumer is not None:
                    consumer.close()

    def assigned(self, consumer, partitions) -> None:
        self.partitions |= {p.partition for p in partitions}

    def revoked(self, consumer, partitions) -> None:
        self.partitions -= {p.partition for p in partitions}

    def serve(self, consumer, producer, admin, subscribed: str | None) -> None:
        """Until the command topic is a new one (a memory-only broker restarted): then
        this member leaves, to join the new topic's group."""
        topic = command_topic(self.settings, self.service)
        checked = time.monotonic()
        while not self.stopping.is_set():
            if time.monotonic() - checked > 2.0:
                ensure_topics(self.settings, admin)   # a restarted memory broker lost them
                if topic_id(admin, topic) != subscribed:
                    log.info("kafka commands %s: %s was created again; joining anew",
                             self.service, topic)
                    producer.flush(1)
                    return
                checked = time.monotonic()
            message = consumer.poll(0.2)
            producer.poll(0)   # delivery reports
            if message is None:
                continue
            if message.error() is not None:
                log.debug("kafka commands %s: %s", self.service, message.error())
                continue
            answer, command = self.run_command(message.value())
            if answer.after == "crash":
                log.warning("injected crash after commit: exiting")
                os._exit(1)
            if answer.after != "drop" and command is not None:
                reply = {"id": command["id"], "status": answer.status, "body": answer.body,
                         "by": self.me}
                # Not waited for: a reply that is lost costs the orchestrator a timeout
                # and a resend, which the ledger answers. The same goes for the offset.
                producer.produce(reply_topic(self.settings), json.dumps(reply).encode(),
                                 key=message.key())
            consumer.commit(message=message, asynchronous=True)

    def run_command(self, raw: bytes):
        """(the Answer, the command); a database failure is a 503, which the
        orchestrator retries like any other."""
        try:
            command = json.loads(raw)
            action, fields = command["action"], command["fields"]
        except (ValueError, KeyError, TypeError):
            log.error("kafka commands %s: dropped a command that is not JSON: %r",
                      self.service, raw[:200])
            return Answer(400, {"error": "not a command"}), None
        with self.participant.in_flight:
            try:
                if action == "invoke":
                    return self.participant.invoke(fields), command
                if action == "compensate":
                    return self.participant.compensate(fields), command
                return Answer(400, {"error": f"unknown action {action!r}"}), command
            except ApiError as exc:
                return Answer(exc.status, exc.body()), command
            except (mysql.connector.Error, UnsupportedServer) as exc:
                log.warning("kafka commands %s: database: %s", self.service, exc)
                return Answer(503, {"error": f"database unavailable: {exc}"}), command
