"""What the orchestrator and the services share about Kafka: the topics, the client
settings, and making sure the topics exist (a memory-only broker forgets them when it
restarts). The database stays the source of truth: Kafka only carries commands and
replies, and losing them all costs a retry, never a saga.

KAFKA_BOOTSTRAP names one broker or several (comma-separated host:port): the client
asks the first that answers for the cluster's brokers, so one dead entry costs nothing.
On a cluster the topics are made with three replicas and min.insync.replicas=2, and
every produce waits for acks=all: an acknowledged command or reply is on two brokers."""

import logging

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient, NewTopic

from saga.common import SERVICES, Settings

log = logging.getLogger("saga")

# Commands are keyed by saga, so one saga's commands stay in order in one partition;
# four let a service's consumers (two processes, several threads each) work in parallel.
COMMAND_PARTITIONS = 4
REPLY_PARTITIONS = 1
# A command that cannot be read is parked on its service's dead-letter topic, with why in
# this header (and where it came from in the next ones), for an operator to look at.
DEAD_LETTER_PARTITIONS = 1
PARKED_HEADER = "x-saga-parked"
# Optional on a command: its attempt number, a positive integer in decimal (as the
# RabbitMQ events' x-saga-attempt); anything else makes the command unreadable.
ATTEMPT_HEADER = "x-saga-attempt"

# Settings measured against Tansu 0.6.0, the broker of the demo and the tests (see
# tools/brokers.py); all are valid for any Kafka cluster.
PRODUCER = {
    # Acknowledged only once every in-sync replica has it (with min.insync.replicas=2,
    # at least two brokers): a broker's death loses no acknowledged message.
    "acks": "all",
    "linger.ms": 0,
    # Tansu reports a topic's end as the start of its last batch plus one: one message a
    # batch keeps "start at the end" meaning the end.
    "batch.num.messages": 1,
    "socket.nagle.disable": True,
    "reconnect.backoff.max.ms": 500,
    # No enable.idempotence: after a broker restart Tansu answers UNKNOWN_PRODUCER_ID to
    # every epoch bump and the producer wedges. Nothing here needs it: a command or reply
    # sent twice (a producer retry, a resend after a timeout) is answered from the
    # ledger, and one saga has one command in flight, so order within a partition does
    # not matter either.
    "message.timeout.ms": 5000,
}
CONSUMER = {
    # Tansu holds a fetch for its full wait even when data arrives.
    "fetch.wait.max.ms": 10,
    # A group join takes about half the session timeout there.
    "session.timeout.ms": 2000,
    "heartbeat.interval.ms": 200,
    "topic.metadata.refresh.interval.ms": 1000,
    "socket.nagle.disable": True,
    "reconnect.backoff.max.ms": 500,
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
}


def command_topic(settings: Settings, service: str) -> str:
    # Named after the database, like the RabbitMQ queues: several saga databases can
    # share one cluster.
    return f"saga.{settings.db_name}.{service}.commands"


def reply_topic(settings: Settings) -> str:
    return f"saga.{settings.db_name}.replies"


def dead_letter_topic(settings: Settings, service: str) -> str:
    return command_topic(settings, service) + ".dead"


def all_topics(settings: Settings) -> dict[str, int]:
    topics = {command_topic(settings, s): COMMAND_PARTITIONS for s in SERVICES}
    topics.update({dead_letter_topic(settings, s): DEAD_LETTER_PARTITIONS for s in SERVICES})
    topics[reply_topic(settings)] = REPLY_PARTITIONS
    return topics


# Replicas of each topic on a cluster, and how many must hold a message before acks=all
# answers: one broker may die (or be restarted for an upgrade) without losing or
# refusing a message.
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2


def replication(brokers: int) -> dict:
    """NewTopic's replication settings for a cluster of `brokers` (one broker: one
    replica, as the demo's and the tests' broker)."""
    factor = min(REPLICATION_FACTOR, brokers)
    config = {"min.insync.replicas": str(MIN_INSYNC_REPLICAS)} \
        if factor >= REPLICATION_FACTOR else {}
    return {"replication_factor": factor, "config": config}


def ensure_topics(settings: Settings, admin: AdminClient | None = None) -> AdminClient:
    """Create whichever of the topics is missing (idempotent, cheap when all exist)."""
    admin = admin or AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    wanted = all_topics(settings)
    metadata = admin.list_topics(timeout=5)
    existing = metadata.topics
    replicas = replication(len(metadata.brokers))
    missing = [NewTopic(name, count, **replicas) for name, count in wanted.items()
               if name not in existing]
    if missing:
        for future in admin.create_topics(missing, request_timeout=10).values():
            try:
                future.result(timeout=15)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        log.info("kafka: created %s", ", ".join(t.topic for t in missing))
    return admin


def topic_id(admin: AdminClient, name: str) -> str | None:
    """The topic's id, None while it does not exist. A topic deleted and created again
    (a memory-only broker restarted) has a new id."""
    try:
        return str(admin.describe_topics(TopicCollection([name]), request_timeout=5)[name]
                   .result().topic_id)
    except KafkaException as exc:
        if exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return None
        raise


def partition_count(admin: AdminClient, name: str) -> int:
    """How many partitions the topic has (0 while it does not exist)."""
    meta = admin.list_topics(name, timeout=5).topics.get(name)
    return len(meta.partitions) if meta is not None and meta.error is None else 0


def client_config(settings: Settings, **extra) -> dict:
    return {"bootstrap.servers": settings.kafka_bootstrap, **extra}
