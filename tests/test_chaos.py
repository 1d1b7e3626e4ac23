"""The chaos harness, short: sagas from concurrent clients while every process is killed
and frozen, faults come and go and the database restarts; afterwards every saga is
all-or-nothing and every answer a client got is true. The bank run does the same with
money transfers, while a sampler reads every balance from the database every 50 ms. The
choreography run does it with registrations the services run by RabbitMQ events, no
orchestrator, while the broker too is killed and frozen; the Kafka run with both saga
types over Kafka commands, a second process of B and the Kafka broker killed. The long
runs are `python tools/chaos.py --sagas 10000 --clients 16 --db-restarts 3`,
`python tools/chaos.py --saga transfer --sagas 3000 --clients 16 --orchestrators 2
--db-restarts 2`, `python tools/chaos.py --mode choreography --sagas 3000 --second-b
--db-restarts 2 --broker-share 0.1` and `python tools/chaos.py --transport kafka --saga transfer --sagas 3000
--clients 16 --orchestrators 2 --second-b --db-restarts 2`."""

import json
import os
import subprocess
import sys
from decimal import Decimal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = ("orchestrator", "orchestrator2", "service_a", "service_b", "service_c")
SERVICES = ("service_a", "service_b", "service_c")


def run_chaos(tmp_path, *args, timeout=150):
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "chaos.py"), *args,
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    summary = json.loads(out.read_text()) if out.exists() else None
    violations = summary["violations"] if summary else None
    report = f"violations: {violations}\n...{proc.stdout[-5000:]}{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    assert summary is not None and summary["violations"] == [], report
    return summary, report


def assert_chaos_covered(summary, report, processes=PROCESSES):
    """The chaos really happened: every process (both orchestrators, every service, and
    the broker if the run had one) was killed and frozen, every service had a fault set,
    and the database went down and came back."""
    chaos = summary["chaos"]
    assert summary["coverage_left"] == [], report
    for name in processes:
        assert chaos[name].get("kill", 0) >= 1 and chaos[name].get("freeze", 0) >= 1, report
    for name in SERVICES:
        assert chaos[name].get("fault", 0) >= 1, report
    assert len(summary["db_restarts"]) == 1, report
    if summary["broker"]:
        assert summary["broker_kills"] >= 1 and summary["broker"]["restarts"], report


def test_sagas_stay_all_or_nothing_through_kills_freezes_faults_and_a_database_restart(tmp_path):
    summary, report = run_chaos(tmp_path, "--seed", "4242", "--sagas", "100", "--clients", "16",
                                "--orchestrators", "2", "--db-restarts", "1", "--interval", "0.3")
    assert_chaos_covered(summary, report)
    # Every saga request ended somewhere, and the database holds each one settled.
    assert summary["stuck"] == 0 and summary["failed"] == 0, report
    assert summary["completed"] + summary["compensated"] == summary["sagas_in_db"], report
    assert summary["completed"] > 0 and summary["answers"].get("200", 0) > 0, report


def test_transfers_conserve_money_and_never_overdraw_through_kills_freezes_faults_and_a_database_restart(
        tmp_path):
    summary, report = run_chaos(tmp_path, "--saga", "transfer", "--seed", "2024", "--sagas",
                                "120", "--clients", "16", "--orchestrators", "2",
                                "--db-restarts", "1", "--interval", "0.3")
    assert_chaos_covered(summary, report)
    bank = summary["bank"]
    # The sampler read the balances all through the run, and never saw one below zero.
    assert bank["reads"] >= 100 and bank["ledger_audits"] >= 5, report
    assert all(Decimal(low) >= 0 for low in bank["min_balance_seen"].values()), report
    # Money is conserved and each balance is what the completed transfers say.
    assert bank["total"] == bank["opening_total"] == "1750.00", report
    assert bank["balance_check"] == "checked", report
    # Transfers completed, some were refused for want of funds, none failed or stuck.
    assert bank["transfers"] == summary["sagas_in_db"] and summary["stuck"] == 0, report
    assert bank["failed"] == 0 and bank["completed"] + bank["compensated"] == bank["transfers"]
    assert bank["completed"] > 0 and bank["refused_insufficient_funds"] > 0, report
    assert summary["answers"].get("200", 0) > 0, report


def test_choreographed_registrations_stay_all_or_nothing_with_no_orchestrator_through_broker_kills(
        tmp_path):
    summary, report = run_chaos(tmp_path, "--mode", "choreography", "--second-b", "--seed", "11",
                                "--sagas", "150", "--clients", "8", "--db-restarts", "1",
                                "--interval", "0.3")
    assert (summary["mode"], summary["transport"]) == ("choreography", "rabbitmq"), report
    assert summary["orchestrator_running"] is False, report
    assert_chaos_covered(summary, report, SERVICES + ("service_b2", "rabbitmq"))
    # Every registration ended, one way or the other, and most completed; every event
    # was published (the checks above) and every answer was true.
    assert summary["stuck"] == 0 and summary["failed"] == 0, report
    assert summary["completed"] + summary["compensated"] == summary["sagas_in_db"], report
    assert summary["sagas_in_db"] >= 150, report
    assert summary["completed"] > summary["sagas_in_db"] / 2, report
    assert summary["answers"].get("200", 0) > 0, report


def test_sagas_over_kafka_stay_all_or_nothing_and_conserve_money_through_broker_kills(tmp_path):
    summary, report = run_chaos(tmp_path, "--transport", "kafka", "--saga", "mixed",
                                "--second-b", "--orchestrators", "2", "--seed", "7", "--sagas",
                                "60", "--clients", "16", "--db-restarts", "1", "--interval",
                                "0.3")
    assert (summary["mode"], summary["transport"]) == ("orchestration", "kafka"), report
    assert_chaos_covered(summary, report, PROCESSES + ("service_b2", "kafka"))
    assert summary["stuck"] == 0 and summary["failed"] == 0, report
    assert summary["completed"] + summary["compensated"] == summary["sagas_in_db"], report
    outcomes = summary["outcomes_by_type"]
    assert outcomes["registration"].get("COMPLETED", 0) > 0, report
    bank = summary["bank"]
    assert bank["total"] == bank["opening_total"] == "1750.00", report
    assert bank["balance_check"] == "checked" and bank["completed"] > 0, report
    assert all(Decimal(low) >= 0 for low in bank["min_balance_seen"].values()), report
