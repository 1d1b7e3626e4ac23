"""SAGA_LOG_FORMAT=json: every line each real process writes is a JSON object, a saga's
lines carry its saga_id, and a warning about a broker that cannot be reached names the
error (pika's carry no text of their own)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, LiveSystem, SEED_INPUT, system_env
from brokers import pick_free_port
from launcher import System, wait_for


@pytest.fixture
def json_logging_system(mariadb, tmp_path):
    """The four processes logging JSON, pointed at a RabbitMQ port nobody listens on."""
    dbname = mariadb.create_database(f"saga_logs_{os.getpid()}")
    nobody = f"amqp://guest:guest@127.0.0.1:{pick_free_port()}/%2F"
    system = System(str(tmp_path), system_env(
        mariadb, dbname, None, SAGA_LOG_FORMAT="json", SAGA_COMPENSATE_FOR="0.5",
        RABBITMQ_URL=nobody))
    system.start()
    yield LiveSystem(mariadb, system, dbname)
    system.stop()


def log_lines(system, process):
    with open(os.path.join(system.system.logdir, f"{process}.log")) as log:
        return [line for line in log.read().splitlines() if line.strip()]


def test_json_log_lines_carry_the_saga_id_and_name_what_failed(json_logging_system):
    system = json_logging_system
    system.set_fault("C", mode="reject")
    system.set_fault("A", mode="fail", on="compensate")
    resp = system.start({**SEED_INPUT, "username": "json_logs"})
    assert resp.json()["status"] == "FAILED", resp.text
    sid = resp.json()["saga"]

    def consumer_warned():
        return [r for r in map(json.loads, log_lines(system, "service_b"))
                if r["level"] == "WARNING" and r["message"].startswith("consumer-B-")]
    warned = wait_for(consumer_warned, 30, "service B's consumers to warn about RabbitMQ")
    # Says what failed: the error's class and what it wraps, and where.
    assert re.search(r"consumer-B-\d: AMQPConnectionError: .*ConnectionRefusedError.* \(broker "
                     r"not reachable at 127\.0\.0\.1:\d+\S*\); retrying",
                     warned[0]["message"]), warned

    for process in ("orchestrator", "service_a", "service_b", "service_c"):
        records = [json.loads(line) for line in log_lines(system, process)]   # every line
        assert records, process
        for record in records:
            assert {"time", "level", "message", "service"} <= record.keys(), record
            assert re.fullmatch(r"[0-9a-f]{32}", record.get("trace_id", "0" * 32)), record
    failed = [r for r in map(json.loads, log_lines(system, "orchestrator"))
              if r.get("saga_id") == sid and r["level"] == "ERROR"]
    assert failed and "FAILED, needs an operator" in failed[0]["message"], failed
    # The server's own lines are JSON too, without a saga.
    booted = [r for r in map(json.loads, log_lines(system, "orchestrator"))
              if r["message"].startswith("Booting worker")]
    assert booted and "saga_id" not in booted[0]


def test_an_unknown_log_format_stops_the_process_with_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "service_a.py")], cwd=ROOT,
                          env={**os.environ, "SAGA_LOG_FORMAT": "xml"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "SAGA_LOG_FORMAT='xml': expected 'text' or 'json'" in done.stderr, done.stderr
