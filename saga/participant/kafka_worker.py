"""A service's commands over Kafka (SAGA_TRANSPORT=kafka). A command is run by the same
participant as an HTTP call, the answer goes to the reply topic, and only then is the
command's offset committed: a process killed in between leaves the command to be
delivered again (to itself restarted, or to another process), and the ledger answers
the repeat.

Who reads which partition is not left to the broker's group coordinator. Under a broker
that restarts empty while service processes die and start around it, Tansu's groups
were seen stuck for good: members that held no partition while the topic existed, and
a service deaf to its commands with every process running. So each process assigns
itself its partitions (consumer.assign, no group membership), by a rule every process
computes alike from the live processes of the service, which it reads from the database
(Members below). The consumer group is only where the offsets are committed.

A transient disagreement (a process that joined or died a moment ago, one that cannot
read the members) can make two processes read one partition, never none for longer than
a read of the members: a command delivered twice is answered from the ledger, and its
second reply is dropped by the orchestrator as stale.

A message that is not a command (not JSON, not an object, no id, action, fields or
saga_id, wrong types, a bad x-saga-attempt header), or whose handling raises something
unforeseen, is logged with its topic, parked on the service's dead-letter topic with the
reason, counted in GET /health, and its offset moves on: it can never stop a worker."""

import hashlib
import json
import logging
import os
import threading
import time

import mysql.connector
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from saga.common import C_DRIVER, Settings, UnsupportedServer
from saga.kafka_io import (ATTEMPT_HEADER, CONSUMER, PARKED_HEADER, PRODUCER, client_config,
                      command_topic, dead_letter_topic, ensure_topics, partition_count,
                      reply_topic, topic_id)
from saga import tracing
from saga.faults import Carrier
from saga.participant.core import Answer, Participant
from saga.validation import ApiError

log = logging.getLogger("saga")

ACTIONS = ("invoke", "compensate")
# How often a worker checks that its command topic is the one it reads (a memory-only
# broker that restarted comes back without it, and it is created anew with a new id).
TOPIC_CHECK_EVERY = 2.0
# Members: how many processes of one service can take part, how often each reads who is
# there, and after how long without a read of its own a process takes every partition
# (the database is down or unreachable from it: better a command read twice than never).
MEMBER_SLOTS = 64
MEMBERS_EVERY = 0.5
BLIND_AFTER = 5.0
# The members' session is closed by the server after this many idle seconds: the slot of
# a process frozen (SIGSTOP) or hung that long goes to the others. A live process reads
# every MEMBERS_EVERY seconds, so it is never idle that long.
MEMBER_IDLE_TIMEOUT = 4


def start_command_workers(participant: Participant) -> None:
    """SAGA_CONSUMERS workers in this process (each takes commands one at a time: a
    stalled call holds up only its partitions), the thread that follows the service's
    members, and what /health says of them."""
    settings, service = participant.settings, participant.service
    members = Members(service, settings)
    dead = Counter()
    workers = [CommandWorker(service, participant, settings, members, dead, n,
                             settings.consumers) for n in range(settings.consumers)]

    def status() -> dict:
        return {"topic": command_topic(settings, service),
                "partitions": sorted(set().union(*(frozenset(w.partitions) for w in workers))),
                "members": len(members.live),
                "dead_letter_topic": dead_letter_topic(settings, service),
                "dead_lettered": dead.count}

    participant.status["kafka"] = status
    members.start()
    for worker in workers:
        worker.start()


class Counter:
    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.count += 1


class Members(threading.Thread):
    """The live processes of this service, from the database the service runs on, with
    no table of its own: each process holds one of MEMBER_SLOTS named locks
    (GET_LOCK) on a session of its own, which the server frees the moment the process
    dies (its connection closes) or stays idle past MEMBER_IDLE_TIMEOUT (frozen). Every
    MEMBERS_EVERY seconds it reads which slots are held (IS_USED_LOCK); partition p is
    the i-th live slot's when p % n == i."""

    def __init__(self, service: str, settings: Settings):
        super().__init__(name=f"kafka-members-{service}", daemon=True)
        self.service, self.settings = service, settings
        self.names = [lock_name(settings.db_name, service, k) for k in range(MEMBER_SLOTS)]
        self.slot: int | None = None
        self.live: tuple[int, ...] = ()
        self.read_at: float | None = None    # time.monotonic() of the last good read

    def share(self, count: int) -> set[int]:
        """The partitions (of `count`) this process reads now."""
        slot, live, read_at = self.slot, self.live, self.read_at
        if read_at is None or time.monotonic() - read_at > BLIND_AFTER or slot not in live:
            return set(range(count))
        i, n = live.index(slot), len(live)
        return {p for p in range(count) if p % n == i}

    def run(self) -> None:
        conn = None
        while True:
            try:
                if conn is None:
                    conn = self.connect()
                cur = conn.cursor()
                holders = self.holders(cur)
                if self.slot is None or holders[self.slot] != conn.connection_id:
                    if self.slot is not None:
                        log.warning("kafka members %s: slot %d lost; taking one again",
                                    self.service, self.slot)
                    self.slot = self.take_slot(cur, holders)
                    holders = self.holders(cur)
                cur.close()
                self.live = tuple(k for k, holder in enumerate(holders) if holder is not None)
                self.read_at = time.monotonic()
            except (mysql.connector.Error, UnsupportedServer) as exc:
                if conn is not None:
                    log.warning("kafka members %s: %s; reconnecting", self.service, exc)
                    close_quietly(conn)
                conn, self.slot = None, None
            except Exception:   # never let this thread die: the workers would go blind
                log.exception("kafka members %s: unexpected failure", self.service)
                if conn is not None:
                    close_quietly(conn)
                conn, self.slot = None, None
            time.sleep(MEMBERS_EVERY)

    def connect(self):
        s = self.settings
        conn = mysql.connector.connect(
            host=s.db_host, port=s.db_port, user=s.db_user, password=s.db_password,
            database=s.db_name, autocommit=True, connection_timeout=5, use_pure=not C_DRIVER)
        cur = conn.cursor()
        cur.execute(f"SET SESSION wait_timeout = {MEMBER_IDLE_TIMEOUT}")
        cur.close()
        return conn

    def holders(self, cur) -> list:
        """The connection id holding each slot, None for a free one."""
        cur.execute("SELECT " + ", ".join(["IS_USED_LOCK(%s)"] * len(self.names)), self.names)
        return list(cur.fetchone())

    def take_slot(self, cur, holders) -> int | None:
        for k, holder in enumerate(holders):
            if holder is None:
                cur.execute("SELECT GET_LOCK(%s, 0)", (self.names[k],))
                if cur.fetchone()[0] == 1:
                    log.info("kafka members %s: this process is member %d", self.service, k)
                    return k
        log.warning("kafka members %s: all %d slots taken; reading every partition",
                    self.service, MEMBER_SLOTS)
        return None


def lock_name(db_name: str, service: str, slot: int) -> str:
    """A named lock per (database, service, slot); MariaDB takes at most 64 characters."""
    name = f"saga.{db_name}.{service}.kafka.{slot}"
    if len(name) > 64:
        name = f"saga.{hashlib.sha1(db_name.encode()).hexdigest()[:20]}.{service}.kafka.{slot}"
    return name


def close_quietly(conn) -> None:
    try:
        conn.close()
    except Exception:   # already broken: nothing to release that the server keeps
        pass


class Unreadable(Exception):
    """A message that is not a command this service can run."""


class CommandWorker(threading.Thread):
    def __init__(self, service: str, participant: Participant, settings: Settings,
                 members: Members, dead: Counter, number: int, total: int):
        super().__init__(name=f"kafka-{service}-{number}", daemon=True)
        self.service, self.participant, self.settings = service, participant, settings
        self.members, self.dead, self.number, self.total = members, dead, number, total
        self.topic = command_topic(settings, service)
        self.me = f"{service} pid {os.getpid()}"
        self.stopping = threading.Event()
        self.partitions: set[int] = set()   # of the command topic, assigned to this thread

    def run(self) -> None:
        self.me = f"{self.service} pid {os.getpid()}"   # after the fork
        producer = Producer(client_config(self.settings, **PRODUCER))
        admin = None
        while not self.stopping.is_set():
            consumer = None
            try:
                admin = ensure_topics(self.settings, admin)
                incarnation = topic_id(admin, self.topic)
                if incarnation is None:   # deleted since; ensure_topics makes it again
                    self.stopping.wait(0.5)
                    continue
                # The offsets' group is named for the topic's incarnation: after a
                # memory-only broker restarts they are gone anyway, and on a cluster a
                # topic created again must not be read from its predecessor's offsets.
                consumer = Consumer(client_config(
                    self.settings, **CONSUMER, **{"group.id": f"saga.{self.settings.db_name}."
                                                              f"{self.service}.{incarnation}"}))
                self.serve(consumer, producer, admin, incarnation)
            except KafkaException as exc:
                log.warning("kafka commands %s: %s; retrying", self.service, exc)
                self.stopping.wait(1.0)
            except Exception:
                # Whatever it was, the worker goes on: a service deaf to its commands
                # with its process running is the one failure nothing else would heal.
                log.exception("kafka commands %s: worker failure; starting over", self.service)
                self.stopping.wait(1.0)
            finally:
                self.partitions = set()
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception as exc:   # a consumer of a broker that is gone
                        log.warning("kafka commands %s: close: %s", self.service, exc)

    def mine(self, count: int) -> set[int]:
        """This thread's part of this process's partitions."""
        return set(sorted(self.members.share(count))[self.number::self.total])

    def serve(self, consumer, producer, admin, incarnation: str) -> None:
        """Until the command topic is a new one (a memory-only broker restarted): then
        this worker starts over on the new one."""
        count = partition_count(admin, self.topic)
        checked = time.monotonic()
        while not self.stopping.is_set():
            if time.monotonic() - checked > TOPIC_CHECK_EVERY:
                ensure_topics(self.settings, admin)   # a restarted memory broker lost them
                if topic_id(admin, self.topic) != incarnation:
                    log.info("kafka commands %s: %s was created again; reading the new one",
                             self.service, self.topic)
                    producer.flush(1)
                    return
                count = partition_count(admin, self.topic)
                checked = time.monotonic()
            self.follow(consumer, count)
            producer.poll(0)   # delivery reports
            if not self.partitions:
                self.stopping.wait(0.2)
                continue
            message = consumer.poll(0.2)
            if message is None:
                continue
            if message.error() is not None:
                log.debug("kafka commands %s: %s", self.service, message.error())
                continue
            self.handle(consumer, producer, message)

    def follow(self, consumer, count: int) -> None:
        """Read the partitions the members' rule gives this thread now: one taken over
        starts at the offset its last reader committed (the earliest if none)."""
        wanted = self.mine(count)
        if wanted == self.partitions:
            return
        gone, new = self.partitions - wanted, wanted - self.partitions
        if gone:
            consumer.incremental_unassign([TopicPartition(self.topic, p) for p in sorted(gone)])
        if new:
            consumer.incremental_assign([TopicPartition(self.topic, p) for p in sorted(new)])
        self.partitions = wanted
        log.info("kafka commands %s: reading partitions %s of %s (%d member(s))", self.service,
                 sorted(wanted) or "none", self.topic, len(self.members.live))

    def handle(self, consumer, producer, message) -> None:
        """One command: run, answer, then commit its offset; an unreadable one (or one
        whose handling fails unforeseen) is parked instead of answered."""
        try:
            command = read_command(message)
        except Unreadable as exc:
            self.park(producer, message, str(exc))
            consumer.commit(message=message, asynchronous=True)
            return
        try:
            with self.participant.serving(tracing.header_value(message.headers()),
                                          command["action"], command["fields"],
                                          tracing.CONSUMER) as span:
                answer = self.run_command(command)
                tracing.outcome(span, str(answer.status), answer.status >= 500)
        except Exception as exc:
            log.exception("kafka commands %s: a command failed unforeseen", self.service)
            self.park(producer, message, f"handler failed: {type(exc).__name__}: {exc}")
            consumer.commit(message=message, asynchronous=True)
            return
        command_carrier = Command()
        answer.after.after_commit(command_carrier)
        if not command_carrier.dropped:
            reply = {"id": command["id"], "status": answer.status, "body": answer.body,
                     "by": self.me}
            # Not waited for: a reply that is lost costs the orchestrator a timeout
            # and a resend, which the ledger answers. The same goes for the offset.
            self.produce(producer, reply_topic(self.settings), json.dumps(reply).encode(),
                         key=message.key())
        consumer.commit(message=message, asynchronous=True)

    def produce(self, producer, topic: str, value: bytes, **kwargs) -> None:
        try:
            producer.produce(topic, value, **kwargs)
        except BufferError:   # the local queue is full (the broker is away): make room once
            producer.poll(1)
            try:
                producer.produce(topic, value, **kwargs)
            except (BufferError, KafkaException) as exc:
                log.warning("kafka commands %s: not sent to %s: %s", self.service, topic, exc)
        except KafkaException as exc:
            log.warning("kafka commands %s: not sent to %s: %s", self.service, topic, exc)

    def park(self, producer, message, reason: str) -> None:
        """Onto the dead-letter topic, confirmed by the broker (or given up on after a
        few seconds: the message is unreadable either way), then counted."""
        dead = dead_letter_topic(self.settings, self.service)
        value = message.value() or b""
        log.error("kafka commands %s: parked a message from %s [%s] at offset %s in %s "
                  "(%s): %r", self.service, message.topic(), message.partition(),
                  message.offset(), dead, reason, value[:200])
        delivered = []
        headers = list(message.headers() or []) + [
            (PARKED_HEADER, reason[:500].encode()),
            ("x-saga-topic", str(message.topic()).encode()),
            ("x-saga-partition", str(message.partition()).encode()),
            ("x-saga-offset", str(message.offset()).encode())]
        self.produce(producer, dead, value, key=message.key(), headers=headers,
                     on_delivery=lambda err, msg: delivered.append(err))
        producer.flush(5)
        if delivered and delivered[0] is None:
            self.dead.add()
        else:
            log.warning("kafka commands %s: could not park it in %s: %s", self.service, dead,
                        delivered[0] if delivered else "no confirmation")

    def run_command(self, command: dict) -> Answer:
        """The Answer; a database failure is a 503, which the orchestrator retries like
        any other."""
        with self.participant.in_flight:
            try:
                if command["action"] == "invoke":
                    return self.participant.invoke(command["fields"])
                return self.participant.compensate(command["fields"])
            except ApiError as exc:
                return Answer(exc.status, exc.body())
            except (mysql.connector.Error, UnsupportedServer) as exc:
                log.warning("kafka commands %s: database: %s", self.service, exc)
                return Answer(503, {"error": f"database unavailable: {exc}"})


def read_command(message) -> dict:
    """The command in a message, or Unreadable saying why it is not one."""
    for key, value in message.headers() or []:
        if key == ATTEMPT_HEADER:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 1_000_000):
                raise Unreadable(f"{ATTEMPT_HEADER} header must be a positive integer, "
                                 f"not {text[:40]!r}")
    raw = message.value()
    if not raw:
        raise Unreadable("empty message")
    try:
        command = json.loads(raw)
    except (ValueError, RecursionError):
        raise Unreadable("not JSON") from None
    if not isinstance(command, dict):
        raise Unreadable(f"not a JSON object but {type(command).__name__}")
    if not isinstance(command.get("id"), str) or not 1 <= len(command["id"]) <= 200:
        raise Unreadable("id must be a string of 1 to 200 characters")
    if command.get("action") not in ACTIONS:
        raise Unreadable(f"action must be one of {', '.join(ACTIONS)}, "
                         f"not {str(command.get('action'))[:40]!r}")
    if not isinstance(command.get("fields"), dict):
        raise Unreadable("fields must be an object")
    if not isinstance(command["fields"].get("saga_id"), str):
        raise Unreadable("fields.saga_id must be a string")
    return command


class Command(Carrier):
    """A Kafka command: dropping its answer is not sending the reply."""
    dropped = False

    def drop(self) -> None:
        self.dropped = True
