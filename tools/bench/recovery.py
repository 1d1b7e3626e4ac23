#!/usr/bin/env python3
"""Measure how fast unfinished sagas are resumed after kill -9 of the only orchestrator.

    python bench/recovery.py [--sagas 20] [--rounds 3]

Starts a private MariaDB and the four processes with the default lease and recovery
settings (SAGA_LEASE_SECONDS=2, SAGA_RECOVERY_INTERVAL=0.5, unless set in the
environment), parks N sagas mid-flight at step B (B's next N calls hang), kills the orchestrator with
SIGKILL and starts the orchestrator again. Prints, per round: how
long the new process took to be healthy, and how long after the kill every parked saga
was resumed (claimed by the new process) and completed."""

import argparse
import os
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/
from launcher import PrivateMariaDB, System, wait_for  # noqa: E402
from systems import root_query as query  # noqa: E402  (tools/bench, this script's folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=10,
                        help="parked per round (fewer than a service's 16 threads)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="saga-recovery-")
    server = PrivateMariaDB(os.path.join(workdir, "db"))
    server.install()
    server.start()
    system = None
    try:
        name = server.create_database("saga_recovery")
        env = {"SAGA_FAULTS": "off", "SAGA_DB_PORT": str(server.port), "SAGA_DB_NAME": name,
               "SAGA_READ_TIMEOUT": "30", "RABBITMQ_URL": "off"}
        system = System(workdir, env)
        system.start()
        settings = {k: os.environ.get(k, d) for k, d in (("SAGA_LEASE_SECONDS", "2"),
                                                           ("SAGA_RECOVERY_INTERVAL", "0.5"))}
        print(f"lease {settings['SAGA_LEASE_SECONDS']} s, recovery poll "
              f"{settings['SAGA_RECOVERY_INTERVAL']} s, {args.sagas} sagas parked per round")
        print(f"{'round':>5} {'restart→healthy':>16} {'kill→all resumed':>17} {'kill→all completed':>19}")
        for rnd in range(1, args.rounds + 1):
            print(f"{rnd:>5} " + " ".join(f"{v:>{w}.2f}s" for v, w in zip(
                one_round(system, server, name, args.sagas), (15, 16, 18))))
    finally:
        if system:
            system.stop()
        server.stop()


def one_round(system, server, name, n):
    # Start from an idle B: the last round's hung calls have landed.
    wait_for(lambda: requests.get(system.url("service_b") + "/health", timeout=5)
             .json()["in_flight"] == 0, 60, "service B to be idle")
    query(server, name, "DELETE FROM SAGA WHERE status = 'COMPLETED'")
    requests.put(system.url("service_b") + "/faults", json={"mode": "hang", "seconds": 8, "next": n},
                 timeout=5).raise_for_status()
    for _ in range(n):
        threading.Thread(target=post_start, args=(system.url(),), daemon=True).start()
    wait_for(lambda: query(server, name, "SELECT COUNT(*) FROM SAGA WHERE step = 1 "
                                         "AND status = 'RUNNING'")[0][0] == n, 60, "sagas parked at B")
    fences = dict(query(server, name, "SELECT id, fence FROM SAGA"))
    killed = time.monotonic()   # before: kill() returns once every process is gone
    system.kill("orchestrator")
    system.start("orchestrator")
    healthy = time.monotonic()

    def resumed():
        rows = query(server, name, "SELECT id, fence, status FROM SAGA")
        return all(fence > fences[sid] or status == "COMPLETED" for sid, fence, status in rows)
    wait_for(resumed, 60, "every saga to be resumed", interval=0.02)
    all_resumed = time.monotonic()
    wait_for(lambda: query(server, name, "SELECT COUNT(*) FROM SAGA WHERE status <> 'COMPLETED'")
             [0][0] == 0, 120, "every saga to complete", interval=0.02)
    return healthy - killed, all_resumed - killed, time.monotonic() - killed


def post_start(url):
    try:
        requests.post(url + "/start", json={"username": "r", "address": "a", "payment": "p"},
                      timeout=120)
    except requests.RequestException:
        pass  # the orchestrator is killed under this request on purpose


if __name__ == "__main__":
    main()
