"""Past one process of each: HAProxy in front of two orchestrators and two processes of
each service (tools/cluster.py), the orchestrators reaching the services through it.
Killing any one process under load loses no saga, leaves none half done, and tells no
client anything false. (The database pair and the RabbitMQ cluster have their own
tests; here one private MariaDB and no broker keep the run short.)"""

import os
import sys

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from cluster import Cluster, Load, check, scan_logs, wait_quiet  # noqa: E402
from launcher import wait_for  # noqa: E402

# Quick takeovers and retries, so a killed process's sagas finish within seconds.
CLUSTER_ENV = {
    "SAGA_LEASE_SECONDS": "1",
    "SAGA_RECOVERY_INTERVAL": "0.2",
    "SAGA_BACKOFF_BASE": "0.05",
    "SAGA_BACKOFF_MAX": "0.5",
    "SAGA_START_WAIT": "20",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("cluster")), env=CLUSTER_ENV,
                database="single", rabbitmq="off")
    try:
        c.start()
        yield c
    finally:
        c.stop()


def keeps_completing(load, more=30, timeout=90):
    mark = load.completed()
    wait_for(lambda: load.completed() >= mark + more, timeout,
             f"{more} more sagas to complete")


def test_killing_an_orchestrator_and_a_service_process_under_load_loses_no_saga(cluster):
    load = Load(cluster, clients=6, seed=21).start()
    try:
        keeps_completing(load)
        for victim in ("orchestrator2", "service_b"):
            cluster.kill(victim)   # kill -9, its whole process group
            wait_for(lambda: cluster.balancer_state(victim) == "DOWN", 30,
                     f"HAProxy to mark {victim} down")
            keeps_completing(load)
    finally:
        load.stop()
    wait_quiet(cluster, timeout=120)
    violations, outcomes = check(cluster, load)
    assert violations == []
    assert outcomes["registration/COMPLETED"] > 0 and outcomes["transfer/COMPLETED"] > 0
    assert all(r.final is not None for r in load.requests)
    assert scan_logs(cluster.logdir) == []   # no 500, a caller cut off mid-call included


def test_with_no_orchestrator_left_the_balancer_answers_503_and_nothing_is_made(cluster):
    for name in ("orchestrator", "orchestrator2"):
        cluster.kill(name)
    wait_for(lambda: all(cluster.balancer_state(n) == "DOWN"
                         for n in ("orchestrator", "orchestrator2")), 30,
             "HAProxy to mark both orchestrators down")
    resp = requests.post(cluster.url() + "/start", timeout=10,
                         json={"username": "nobody-home", "address": "x", "payment": "y"})
    assert resp.status_code == 503
    assert resp.json()["balancer"] == "no process"
    assert resp.headers["Retry-After"] == "1"
    conn = cluster.connect()
    try:
        cur = conn.cursor()
        cur.execute("SELECT COUNT(*) FROM SAGA WHERE label = 'nobody-home'")
        assert cur.fetchone()[0] == 0
    finally:
        conn.close()
    cluster.restart("orchestrator2")
    wait_for(lambda: cluster.balancer_state("orchestrator2") == "UP", 30,
             "HAProxy to see orchestrator2 again")
    resp = requests.post(cluster.url() + "/start", timeout=30,
                         json={"username": "back-again", "address": "x", "payment": "y"})
    assert resp.status_code == 200 and resp.json()["status"] == "COMPLETED"
