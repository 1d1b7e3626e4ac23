"""The choreography on a three-node RabbitMQ cluster: RABBITMQ_URL names every node, the
queues are quorum queues (their retry copies moved back by the services, not by
dead-lettering), and kill -9 of one node under load, then of a second one after the
first is back, loses no event: every choreographed saga ends all or nothing,
and the consumers that lived through it (their processes never restarted) consume on.
Also: KAFKA_BOOTSTRAP naming several brokers, and moving classic queues to quorum."""

import threading
import time

import pika
import pytest
import requests

from conftest import SEED_INPUT, LiveSystem, system_env
from cluster_rabbit import RabbitCluster
from launcher import System, free_port, wait_for
from saga.common import SERVICES, Settings
from saga.definitions import SAGA_TYPES
from saga.participant.choreography import bindings
from saga.participant.events import (dead_letter_queue, declare_topology, queue_type,
                                     service_queue, topology)

CONSUMERS = 2   # SAGA_CONSUMERS in the tests' environment
FINAL = ("COMPLETED", "COMPENSATED", "FAILED")
ANSWERED = {200: "COMPLETED", 409: "COMPENSATED"}


@pytest.fixture(scope="module")
def rabbit_cluster(tmp_path_factory):
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"), nodes=3)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cluster_system(mariadb, rabbit_cluster, tmp_path_factory):
    """The four processes with RABBITMQ_URL naming the three nodes (so quorum queues);
    C fails every 2nd call, so events also go through the delay queues."""
    dbname = mariadb.create_database("saga_rabbit_cluster")
    system = System(str(tmp_path_factory.mktemp("cluster-logs")),
                    system_env(mariadb, dbname, RABBITMQ_URL=rabbit_cluster.url()))
    system.start()
    live = LiveSystem(mariadb, system, dbname)
    yield live
    system.stop()


class Load:
    """Clients starting choreographed sagas (registrations, and orders of customers
    who can and cannot pay) at service A until stopped, keeping every answer."""

    def __init__(self, live: LiveSystem, clients: int = 4):
        self.live, self.stopping = live, threading.Event()
        self.answers: list[tuple[float, int, dict]] = []   # (sent at, HTTP status, body)
        self.errors: list[Exception] = []
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True)
                        for n in range(clients)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(90)
            assert not thread.is_alive(), "a client is still waiting for its answer"

    def run(self, client: int) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            if n % 2:
                path, body = "/register", {**SEED_INPUT, "username": f"c{client}-{n}"}
            else:
                path, body = "/orders", {"customer_id": 1 + n % 3, "product_id": 1,
                                         "quantity": 1, "total_price": "1.00"}
            sent = time.monotonic()
            try:
                resp = requests.post(self.live.service("A") + path, json=body, timeout=60)
                self.answers.append((sent, resp.status_code, resp.json()))
            except (requests.RequestException, ValueError) as exc:
                self.errors.append(exc)

    def settled_since(self, moment: float) -> int:
        """Sagas started after `moment` whose client was told how they ended."""
        return sum(1 for sent, code, _ in self.answers if sent > moment and code in ANSWERED)


def leader_of(cluster: RabbitCluster, queue: str) -> int:
    return cluster.index_of(next(q["leader"] for q in cluster.queues() if q["name"] == queue))


def wait_consumers(cluster: RabbitCluster, settings: Settings, timeout: float = 60) -> None:
    """Until each service's queue has every consumer thread of its process on it again."""
    wanted = {service_queue(settings, s) for s in SERVICES}

    def back():
        counts = {q["name"]: q["consumers"] for q in cluster.queues() if q["name"] in wanted}
        return len(counts) == len(wanted) and all(c == CONSUMERS for c in counts.values())
    wait_for(back, timeout, "every consumer to be on its queue again", 0.5)


def wait_quiet(live: LiveSystem, cluster: RabbitCluster) -> None:
    """Every saga ended; if not, fail with what the stuck ones heard and the queues."""
    try:
        live.wait_quiet(timeout=90)
    except TimeoutError:
        stuck = live.query("SELECT id, type, status FROM SAGA WHERE status IN "
                           "('RUNNING', 'COMPENSATING') LIMIT 3")
        unpublished = live.query("SELECT id, service, saga_id, event FROM OUTBOX "
                                 "WHERE published_at IS NULL LIMIT 5")
        pytest.fail(f"sagas still running: {[(s, live.events(s[0])) for s in stuck]}; "
                    f"unpublished: {unpublished}; "
                    f"queues: {[(q['name'], q['messages'], q['messages_ready'], q['consumers'], q['leader']) for q in cluster.queues() if q['messages']]}")


def kill_and_recover(cluster: RabbitCluster, load: Load, node: int) -> float:
    """kill -9 the node; return the seconds until a saga started after the kill ended
    (events flowing again through the surviving nodes)."""
    killed = time.monotonic()
    cluster.kill(node)
    wait_for(lambda: load.settled_since(killed) >= 3, 60,
             f"sagas to end again after node {node} was killed", 0.1)
    return time.monotonic() - killed


def test_killing_two_cluster_nodes_in_turn_loses_no_event(rabbit_cluster, cluster_system):
    live, cluster = cluster_system, rabbit_cluster
    settings = Settings(db_name=live.dbname)
    assert all(q["type"] == "quorum" and len(q["online"]) == 3 for q in cluster.queues()
               if q["name"].startswith(f"saga.{live.dbname}."))
    pids = {name: proc.pid for name, proc in live.system.procs.items()}
    live.set_fault("C", mode="fail", every=2)
    started = time.monotonic()
    with Load(live) as load:
        wait_for(lambda: load.settled_since(started) >= 5, 60, "sagas to flow", 0.1)
        # The node that leads B's queue, so a new leader must be elected.
        first = leader_of(cluster, service_queue(settings, "B"))
        stall_first = kill_and_recover(cluster, load, first)
        cluster.restart(first)
        cluster.wait_clustered()
        second = leader_of(cluster, service_queue(settings, "C"))
        if second == first:
            second = (first + 1) % len(cluster.nodes)
        stall_second = kill_and_recover(cluster, load, second)
        cluster.restart(second)
        cluster.wait_clustered()
        back = time.monotonic()
        wait_for(lambda: load.settled_since(back) >= 3, 60, "sagas after both restarts", 0.1)
    print(f"\nsagas ending again {stall_first:.1f} s and {stall_second:.1f} s after a node "
          f"was killed; {len(load.answers)} sagas under load")
    live.set_fault("C", mode="off")

    assert not load.errors, load.errors[:3]
    wait_quiet(live, cluster)
    # No false answer: a client told COMPLETED/COMPENSATED finds exactly that.
    for _, code, body in load.answers:
        if code in ANSWERED:
            assert live.status(body["saga"]) == ANSWERED[code], body
    assert live.query("SELECT COUNT(*) FROM SAGA WHERE status = 'FAILED'")[0][0] == 0
    assert live.query("SELECT COUNT(*) FROM OUTBOX WHERE published_at IS NULL")[0][0] == 0
    live.assert_all_or_nothing()
    live.assert_invariants()
    # Nothing left behind: a retry copy stuck in a retry queue (dead-lettered by a quorum
    # queue to a target whose leader died, never confirmed) is how sagas used to hang.
    wait_for(lambda: not any(q["messages"] for q in cluster.queues()
                             if q["name"].startswith(f"saga.{live.dbname}.")),
             60, "every queue of the run to be empty", 0.5)
    # No event parked: every dead-letter queue is empty.
    dead = {dead_letter_queue(settings, s) for s in SERVICES}
    assert {q["name"]: q["messages"] for q in cluster.queues() if q["name"] in dead} == \
        dict.fromkeys(dead, 0)

    # The processes that lived through both deaths consume on, each consumer thread
    # back on its queue, without a restart.
    assert {n: p.pid for n, p in live.system.procs.items()} == pids
    assert all(live.system.alive(name) for name in pids)
    wait_consumers(cluster, settings)
    for n in range(3):
        resp = live.register({**SEED_INPUT, "username": f"after-{n}"})
        assert resp.status_code == 200, resp.text


def test_classic_queues_are_moved_to_quorum_with_their_messages(rabbit_cluster, monkeypatch):
    """What ./run.sh upgrade does for a deployment that moves to a cluster: each queue
    is declared again as a quorum queue, keeping its messages and bindings."""
    from upgrade import move_queues
    settings = Settings(db_name=f"saga_move_{free_port()}", rabbitmq_url=rabbit_cluster.url())
    routes = bindings([t for t in SAGA_TYPES.values() if t.choreography])
    conn = pika.BlockingConnection(pika.URLParameters(rabbit_cluster.nodes[0].url))
    try:
        channel = conn.channel()
        declare_topology(channel, settings, routes, "classic")
        channel.confirm_delivery()
        queue = service_queue(settings, "B")
        for n in range(5):
            channel.basic_publish("", queue, f"event {n}".encode(), properties=
                                  pika.BasicProperties(delivery_mode=2, headers={"n": n}))
    finally:
        conn.close()
    assert queue_type(settings) == "quorum"   # several nodes named
    moved = move_queues(settings, routes)
    assert queue in moved and len(moved) == len(topology(settings, routes, "quorum"))
    assert move_queues(settings, routes) == []   # again: nothing to do
    queues = {q["name"]: q for q in rabbit_cluster.queues()
              if q["name"].startswith(f"saga.{settings.db_name}.")}
    assert set(queues) == {q.name for q in topology(settings, routes, "quorum")}
    assert all(q["type"] == "quorum" for q in queues.values())
    conn = pika.BlockingConnection(pika.URLParameters(rabbit_cluster.nodes[1].url))
    try:
        channel = conn.channel()
        got = [channel.basic_get(queue, auto_ack=True) for _ in range(6)]
        assert [(body, props.headers["n"]) for _, props, body in got[:5]] == \
            [(f"event {n}".encode(), n) for n in range(5)]
        assert got[5] == (None, None, None)
        # Still bound: an event published to the exchange reaches the moved queue.
        channel.confirm_delivery()
        channel.basic_publish(f"saga.{settings.db_name}.events", routes["B"][0], b"late",
                              mandatory=True)
        assert channel.basic_get(queue, auto_ack=True)[2] == b"late"
        for name in queues:
            channel.queue_delete(name)
    finally:
        conn.close()


def test_kafka_bootstrap_naming_several_brokers_works_with_the_first_one_dead(
        mariadb, kafka, tmp_path):
    """KAFKA_BOOTSTRAP lists brokers: the client asks whichever answers for the
    cluster, so sagas run over Kafka with the first entry dead (nothing listens)."""
    dbname = mariadb.create_database("saga_kafka_bootstrap")
    system = System(str(tmp_path), system_env(
        mariadb, dbname, SAGA_TRANSPORT="kafka", SAGA_READ_TIMEOUT="2",
        KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()},{kafka.bootstrap}"))
    system.start()
    try:
        live = LiveSystem(mariadb, system, dbname)
        live.wait_kafka_ready()
        for n in range(3):
            resp = live.start({**SEED_INPUT, "username": f"kafka-{n}"})
            assert resp.status_code == 200, resp.text
            assert live.row_counts(resp.json()["saga"]) == {"TABLE_A": 1, "TABLE_B": 1,
                                                            "TABLE_C": 1}
        transport = live.get(f"/sagas/{resp.json()['saga']}").json()["transport"]
        assert transport == "kafka"
    finally:
        system.stop()
