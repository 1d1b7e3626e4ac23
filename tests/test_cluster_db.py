"""A MariaDB primary with a semi-synchronous replica (AFTER_SYNC), MHA for failover and
HAProxy in front, under the real four processes: kill -9 the primary while sagas of
every type run; MHA promotes the replica, HAProxy routes to it, every process carries on
without a restart, nothing acknowledged is lost and every saga ends all or nothing. The
failover figures: `python tools/cluster_db.py failover --runs 3`."""

import mysql.connector
import pytest
import requests

from cluster_db import MariaDBPair, SagaLoad
from conftest import LiveSystem, system_env
from launcher import System, wait_for
from saga.definitions import SAGA_TYPES

FINAL = ("COMPLETED", "COMPENSATED", "FAILED")


@pytest.fixture
def pair_system(tmp_path):
    """The four processes on a MariaDB pair, reached through the pair's HAProxy."""
    pair = MariaDBPair(str(tmp_path / "db"))
    system = None
    try:
        pair.start()
        system = System(str(tmp_path), system_env(pair, pair.dbname))
        system.start()
        yield LiveSystem(pair, system, pair.dbname)
    finally:
        if system:
            system.stop()
        pair.stop()


def committed(live):
    """What the primary has committed: every saga (and its status), every log row."""
    return (dict(live.query("SELECT id, status FROM SAGA")),
            {r[0] for r in live.query("SELECT id FROM SAGA_LOG")})


def received_by_replica(pair):
    """The sequence number of the last primary transaction in the replica's relay log."""
    conn = mysql.connector.connect(unix_socket=pair.replica.socket, user="root")
    try:
        cur = conn.cursor(dictionary=True)
        cur.execute("SHOW SLAVE STATUS")
        return int(cur.fetchone()["Gtid_IO_Pos"].split("-")[-1])
    finally:
        conn.close()


def written_by_old_primary(pair):
    """The sequence number of server 1's last transaction in the new primary's log."""
    state = pair.root("SELECT @@gtid_binlog_state")[0][0]
    return max(int(g.split("-")[2]) for g in state.split(",") if g.split("-")[1] == "1")


def every_type_completed(load, sent_after=None):
    return {a["type"] for a in load.completed(sent_after)} == set(SAGA_TYPES)


def test_a_killed_primary_loses_no_acknowledged_commit_and_every_process_carries_on(
        pair_system):
    live, pair, system = pair_system, pair_system.server, pair_system.system
    pids = {name: proc.pid for name, proc in system.procs.items()}
    load = SagaLoad(live.url, SAGA_TYPES.values(), clients=6).start()
    try:
        wait_for(lambda: every_type_completed(load) and len(load.completed()) >= 12, 60,
                 "sagas of every type to complete")
        sagas_before, log_before = committed(live)
        acknowledged_before = load.completed()
        # Hold the replica's receiver for the last moment, so the primary dies with
        # commits in its binary log that the replica never got and that no client saw
        # acknowledged (they wait for the replica): MHA must fetch them from the dead
        # primary's disk over SSH, so the new primary has all the old one wrote.
        pair.replica.root("STOP SLAVE IO_THREAD")
        wait_for(lambda: int(pair.primary.variable("Rpl_semi_sync_master_wait_sessions",
                                                   status=True)) > 0,
                 30, "a commit to wait for the replica")
        received = received_by_replica(pair)
        pair.kill_primary()
        pair.wait_promoted(90)
        wait_for(lambda: every_type_completed(load, sent_after=pair.killed_at), 90,
                 "sagas of every type, started after the kill, to complete")
    finally:
        load.stop()
    live.wait_quiet()

    # The replica is the primary now, and HAProxy routes there.
    assert pair.primary is pair.nodes[1] and pair.fenced is pair.nodes[0]
    assert live.query("SELECT @@server_id, @@read_only") == [(2, 0)]
    assert written_by_old_primary(pair) > received   # the dead primary's tail is here
    # Every process reconnected by itself: the same processes, all healthy.
    assert {name: proc.pid for name, proc in system.procs.items()} == pids
    for name in system.names:
        assert system.alive(name), name
        assert requests.get(system.url(name) + "/health", timeout=5).status_code == 200

    # Nothing committed before the kill is missing; a finished saga stayed as it was.
    sagas_after, log_after = committed(live)
    assert log_before <= log_after
    assert set(sagas_before) <= set(sagas_after)
    assert {s: sagas_after[s] for s, status in sagas_before.items() if status in FINAL} == \
        {s: status for s, status in sagas_before.items() if status in FINAL}
    assert acknowledged_before and all(sagas_after[a["saga"]] == "COMPLETED"
                                       for a in acknowledged_before)
    # Every answer a client got is true on the new primary: a 200 COMPLETED saga is
    # COMPLETED, any other final answer is that saga's final state.
    for answer in load.answers:
        if answer["status"] in FINAL:
            assert sagas_after.get(answer["saga"]) == answer["status"], answer
    assert all(status in FINAL for status in sagas_after.values())
    live.assert_all_or_nothing()
    live.assert_invariants()
    live.assert_money_conserved()

    # No split brain: the old primary, back from the dead, is read-only for the
    # applications' user and out of HAProxy's route.
    pair.fenced.start()
    old = mysql.connector.connect(host="127.0.0.1", port=pair.fenced.port, user="saga",
                                  password="saga", database=pair.dbname)
    try:
        with pytest.raises(mysql.connector.Error) as refused:
            old.cursor().execute("CREATE TABLE split_brain (id INT)")
        assert refused.value.errno == 1290   # running with --read-only
    finally:
        old.close()
    assert live.query("SELECT @@server_id") == [(2,)]
