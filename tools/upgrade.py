"""Move a saga database made by the first version (one saga type, with username, address
and payment columns on SAGA) to the current layout, keeping every saga: the input becomes
JSON, the log and ledger rows learn their operation, the ledger learns each first call's
request and answer. Then schema.sql adds what is new. Safe to run again: a database
already in the current layout is left alone.

It also moves the choreography's RabbitMQ queues to the type the settings want
(RABBITMQ_QUEUE_TYPE, or quorum when RABBITMQ_URL names several nodes): a queue cannot
change its type in place, so each one that is declared otherwise is drained into a
stand-in queue bound to the same events, declared again, and filled back, keeping its
messages in order. Stop the services first (their consumers would hold messages), run
this with the new RABBITMQ_URL, start them with it.

    .venv/bin/python tools/upgrade.py        # uses SAGA_DB_* like the processes
    ./run.sh upgrade                          # the same, after starting the database"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402,F401  (first: the database driver, then the demo's saga types)
from saga.common import Database, load_settings  # noqa: E402

# The registration's operation at each service, and the columns of its first call.
OPS = {"A": ("user", "TABLE_A", "user_id", ("username",)),
       "B": ("address", "TABLE_B", "address_id", ("user_id", "address")),
       "C": ("payment", "TABLE_C", "payment_id", ("user_id", "payment_method"))}

SAGA_TO_V2 = [
    "ALTER TABLE SAGA ADD COLUMN type VARCHAR(32) NOT NULL DEFAULT 'registration' AFTER id, "
    "ADD COLUMN mode ENUM('orchestration', 'choreography') NOT NULL DEFAULT 'orchestration' "
    "AFTER type, ADD COLUMN transport ENUM('http', 'kafka', 'rabbitmq') NOT NULL DEFAULT "
    "'http' AFTER mode, ADD COLUMN input TEXT NULL AFTER attempt, "
    "ADD COLUMN label VARCHAR(255) NOT NULL DEFAULT '' AFTER input, "
    "ADD COLUMN touched TINYINT(1) NOT NULL DEFAULT 0 AFTER rejected, "
    "ADD COLUMN revision INT UNSIGNED NOT NULL DEFAULT 1 AFTER fence, "
    "MODIFY failed_step VARCHAR(40) NULL",
    "UPDATE SAGA SET input = JSON_OBJECT('username', username, 'address', address, "
    "'payment', payment), label = username",
    # The first version always undid the current step: a saga caught in flight keeps that.
    "UPDATE SAGA SET touched = 1 WHERE status IN ('RUNNING', 'COMPENSATING')",
    "ALTER TABLE SAGA MODIFY input TEXT NOT NULL, DROP INDEX saga_username_created, "
    "DROP COLUMN username, DROP COLUMN address, DROP COLUMN payment, "
    "DROP INDEX saga_recovery, ADD KEY saga_recovery (mode, status, lease_until), "
    "ADD KEY saga_type_created (type, created_at), ADD KEY saga_label_created (label, "
    "created_at), ADD KEY saga_finished (status, updated_at)",
]

LOG_TO_V2 = [
    "ALTER TABLE SAGA_LOG ADD COLUMN op VARCHAR(20) NULL AFTER step, "
    "MODIFY action ENUM('invoke', 'compensate', 'publish') NULL, "
    "ADD COLUMN event VARCHAR(64) NULL AFTER action",
    *[f"UPDATE SAGA_LOG SET op = '{op}' WHERE service = '{svc}'"
      for svc, (op, _, _, _) in OPS.items()],
]



def json_pairs(columns) -> str:
    return ", ".join(f"'{c}', t.{c}" for c in columns)


LEDGER_TO_V2 = [
    "ALTER TABLE STEP_LEDGER ADD COLUMN op VARCHAR(20) NOT NULL DEFAULT '' AFTER saga_id, "
    "MODIFY state ENUM('invoked', 'refused', 'compensated') NOT NULL, "
    "ADD COLUMN request TEXT NULL AFTER state, ADD COLUMN answer TEXT NULL AFTER request, "
    "ADD COLUMN created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) AFTER answer",
    *[f"UPDATE STEP_LEDGER SET op = '{op}' WHERE service = '{svc}'"
      for svc, (op, _, _, _) in OPS.items()],
    "ALTER TABLE STEP_LEDGER DROP PRIMARY KEY, ADD PRIMARY KEY (service, saga_id, op), "
    "ADD KEY step_ledger_updated (updated_at)",
    # A repeated call is answered from the ledger now: give each first call its answer.
    *[f"UPDATE STEP_LEDGER l JOIN {table} t ON t.saga_id = l.saga_id SET "
      f"l.request = JSON_OBJECT({json_pairs(columns)}), "
      f"l.answer = JSON_OBJECT('status', 'success', 'saga_id', l.saga_id, 'op', '{op}', "
      f"'{id_name}', t.id) WHERE l.service = '{svc}' AND l.state = 'invoked'"
      for svc, (op, table, id_name, columns) in OPS.items()],
    "UPDATE STEP_LEDGER SET answer = JSON_OBJECT('status', 'compensated', 'saga_id', "
    "saga_id, 'op', op, 'removed', 0, 'undone', 'nothing to undo') "
    "WHERE state = 'compensated' AND answer IS NULL",
]


# Services are named by configuration (SAGA_SERVICES), not only A, B and C.
NAMED_SERVICES = {
    "STEP_LEDGER": "ALTER TABLE STEP_LEDGER MODIFY service VARCHAR(40) NOT NULL, "
                   "MODIFY op VARCHAR(40) NOT NULL",
    "OUTBOX": "ALTER TABLE OUTBOX MODIFY service VARCHAR(40) NOT NULL",
    "SAGA_LOG": "ALTER TABLE SAGA_LOG MODIFY op VARCHAR(40) NULL",
}


# Each saga and each outbox event keeps the trace context of its span (tracing).
TRACED = {
    "SAGA": "ALTER TABLE SAGA ADD COLUMN trace VARCHAR(55) NULL AFTER revision",
    "OUTBOX": "ALTER TABLE OUTBOX ADD COLUMN trace VARCHAR(55) NULL AFTER payload",
}


def column_type(cur, table: str, column: str) -> str | None:
    cur.execute("SELECT column_type AS kind FROM information_schema.columns WHERE "
                "table_schema = DATABASE() AND table_name = %s AND column_name = %s",
                (table, column))
    row = cur.fetchone()
    return row and row["kind"].lower()


def columns_of(cur, table: str) -> set[str]:
    cur.execute("SELECT column_name AS name FROM information_schema.columns "
                "WHERE table_schema = DATABASE() AND table_name = %s", (table,))
    return {row["name"].lower() for row in cur.fetchall()}


def upgrade(db: Database) -> list[str]:
    """Apply what the database still needs; returns what was done."""
    done = []
    with db.transaction() as cur:
        saga, log, ledger = (columns_of(cur, t) for t in ("SAGA", "SAGA_LOG", "STEP_LEDGER"))
    steps = ([("SAGA", SAGA_TO_V2)] if "username" in saga else []) \
        + ([("SAGA_LOG", LOG_TO_V2)] if log and "op" not in log else []) \
        + ([("STEP_LEDGER", LEDGER_TO_V2)] if ledger and "op" not in ledger else [])
    run_steps(db, steps, done)
    with db.transaction() as cur:
        narrow = [table for table, column in (("STEP_LEDGER", "service"), ("OUTBOX", "service"),
                                              ("SAGA_LOG", "op"))
                  if column_type(cur, table, column) in ("char(1)", "varchar(20)")]
    run_steps(db, [(table, [NAMED_SERVICES[table]]) for table in narrow], done)
    with db.transaction() as cur:
        untraced = [t for t in TRACED if (columns := columns_of(cur, t))
                    and "trace" not in columns]
    run_steps(db, [(table, [TRACED[table]]) for table in untraced], done)
    return done


def run_steps(db: Database, steps, done: list) -> None:
    for table, statements in steps:
        # ALTER TABLE commits by itself, so each table moves in one go, in order.
        with db.transaction() as cur:
            for sql in statements:
                cur.execute(sql)
        done.append(f"{table}: moved to the current layout")


def move_queues(settings, routes: dict) -> list[str]:
    """Declare every queue of the choreography as the settings want it, moving each one
    that exists with other arguments; returns the names of those moved."""
    import pika
    from saga.participant.events import connect, exchange, queue_type, topology
    kind = queue_type(settings)
    moved = []
    # A classic retry queue dead-letters into its service's queue by name: the retry
    # queues go first, and a service's queue moves only once those that dead-letter
    # into it are empty (see wait_retries; quorum ones are emptied by the services).
    queues = sorted(topology(settings, routes, kind),
                    key=lambda q: 0 if ".retry." in q.name else 1 if q.routing_keys == () else 2)
    connection = connect(settings)
    try:
        connection.channel().exchange_declare(exchange(settings), exchange_type="topic",
                                              durable=True)
        for queue in queues:
            channel = connection.channel()
            try:
                channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:   # PRECONDITION_FAILED: declared otherwise
                    raise
                if queue.routing_keys:
                    wait_retries(connection, queue.name, [
                        q.name for q in queues
                        if q.arguments.get("x-dead-letter-routing-key") == queue.name])
                move_queue(connection, settings, queue, kind)
                moved.append(queue.name)
                continue
            for key in queue.routing_keys:
                channel.queue_bind(queue.name, exchange(settings), routing_key=key)
            channel.close()
            if finish_move(connection, settings, queue):
                moved.append(queue.name)
    finally:
        connection.close()
    return moved


def wait_retries(connection, service_queue: str, retries: list[str],
                 timeout: float = 120) -> None:
    """Until the retry queues that dead-letter into the service's queue are empty: what
    they hold expires into it, which must then exist (the services are stopped, so
    nothing fills them again; the longest wait is the longest retry delay)."""
    import time
    channel = connection.channel()
    deadline = time.monotonic() + timeout
    while any(channel.queue_declare(n, passive=True).method.message_count for n in retries):
        if time.monotonic() > deadline:
            raise TimeoutError(f"retry queues of {service_queue} still hold messages "
                               f"after {timeout:.0f} s: are the services stopped?")
        time.sleep(0.1)
    channel.close()


def finish_move(connection, settings, queue) -> bool:
    """A move cut short (after the old queue was deleted) left its messages in the
    stand-in: into the queue with them."""
    import pika
    from saga.participant.events import exchange
    channel = connection.channel()
    try:
        channel.queue_declare(f"{queue.name}.moving", passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 404:
            raise
        return False
    channel.confirm_delivery()
    for key in queue.routing_keys:
        channel.queue_unbind(f"{queue.name}.moving", exchange(settings), routing_key=key)
    drain_and_delete(channel, f"{queue.name}.moving", queue.name).close()
    return True


def move_queue(connection, settings, queue, kind: str) -> None:
    """Old queue -> stand-in -> the queue declared anew. The stand-in takes the queue's
    events while it is gone, so a relay still running loses none (one published while
    both are bound arrives twice: consumers answer repeats)."""
    from saga.participant.events import exchange
    channel = connection.channel()
    channel.confirm_delivery()
    stand_in = f"{queue.name}.moving"
    channel.queue_declare(stand_in, durable=True,
                          arguments={"x-queue-type": kind} if kind == "quorum" else {})
    for key in queue.routing_keys:
        channel.queue_bind(stand_in, exchange(settings), routing_key=key)
        channel.queue_unbind(queue.name, exchange(settings), routing_key=key)
    drain_and_delete(channel, queue.name, stand_in).close()
    # A new channel: one that took from the old queue keeps it in a cache by name, and
    # RabbitMQ 3.10 fails the channel on a publish to the new queue of another type.
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    for key in queue.routing_keys:
        channel.queue_bind(queue.name, exchange(settings), routing_key=key)
        channel.queue_unbind(stand_in, exchange(settings), routing_key=key)
    drain_and_delete(channel, stand_in, queue.name).close()


def drain_and_delete(channel, source: str, target: str):
    """Every message of source into target (each confirmed before it is acknowledged),
    then source deleted, once it holds none (a message that arrived meanwhile is moved
    too)."""
    while True:
        method, properties, body = channel.basic_get(source)
        if method is not None:
            headers = {k: v for k, v in (properties.headers or {}).items()
                       if k != "x-delivery-count"}   # the queue's own count, not ours
            properties.headers = headers or None
            channel.basic_publish("", target, body, properties=properties, mandatory=True)
            channel.basic_ack(method.delivery_tag)
            continue
        # (queue.delete's if-empty flag is not supported by quorum queues)
        if channel.queue_declare(source, passive=True).method.message_count == 0:
            channel.queue_delete(source)
            return channel


def main() -> int:
    settings = load_settings()
    done = upgrade(Database(settings, 1))
    print("\n".join(done) if done else f"{settings.db_name}: already in the current layout")
    if settings.rabbitmq_url != "off":
        print(upgrade_queues(settings))
    return 0


def upgrade_queues(settings) -> str:
    """The queue move, unless the broker is not up (the demo starts it after this)."""
    import pika
    from saga.definitions import SAGA_TYPES
    from saga.participant.choreography import bindings
    from saga.participant.events import nodes_named, queue_type
    routes = bindings([t for t in SAGA_TYPES.values() if t.choreography])
    try:
        moved = move_queues(settings, routes)
    except pika.exceptions.AMQPConnectionError:
        return (f"RabbitMQ not reachable at {nodes_named(settings)}: its queues were not "
                f"checked (run this again once it is up)")
    kind = queue_type(settings)
    return (f"RabbitMQ: moved {', '.join(moved)} to {kind} queues" if moved
            else f"RabbitMQ: every queue already a {kind} queue as wanted")


if __name__ == "__main__":
    sys.exit(main())
