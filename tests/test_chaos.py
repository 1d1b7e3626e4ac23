"""The chaos harness, short: sagas from concurrent clients while every process is killed
and frozen, faults come and go and the database restarts; afterwards every saga is
all-or-nothing, every registered type's invariant holds and every answer a client got
is true. The first run mixes every saga type; the bank run does it with money
transfers, while a sampler reads every balance from the database every 50 ms. The
choreography run does it with registrations and orders the services run by RabbitMQ
events, no orchestrator, while the broker too is killed and frozen; the Kafka run with
every saga type over Kafka commands, a second process of B and the Kafka broker killed.
The long runs are `python tools/chaos.py --sagas 10000 --clients 16 --db-restarts 3`,
`python tools/chaos.py --saga transfer --sagas 3000 --clients 16 --orchestrators 2
--db-restarts 2`, `python tools/chaos.py --saga order --sagas 1000 --clients 16
--orchestrators 2 --db-restarts 1`, `python tools/chaos.py --mode choreography --sagas 3000
--second-b --db-restarts 2 --broker-share 0.1` and `python tools/chaos.py --transport kafka
--saga transfer --sagas 3000 --clients 16 --orchestrators 2 --second-b --db-restarts 2`."""

import json
import os
import subprocess
import sys
from decimal import Decimal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES = ("orchestrator", "orchestrator2", "service_a", "service_b", "service_c")
SERVICES = ("service_a", "service_b", "service_c")


def run_chaos(tmp_path, *args, timeout=900):
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


def assert_every_saga_settled(summary, report):
    assert summary["stuck"] == 0 and summary["failed"] == 0, report
    assert summary["completed"] + summary["compensated"] == summary["sagas_in_db"], report


def assert_orders_fulfilled_and_rejected(summary, report):
    """Orders ran both ways: some fulfilled (their saga COMPLETED, the client told 200),
    some rejected for want of a balance or a customer (COMPENSATED, told 409); the order
    invariant was checked at quiet (money conserved, no order PENDING, FULFILLED exactly
    when its saga COMPLETED), and no customer's balance was ever read below zero."""
    orders = summary["outcomes_by_type"]["order"]
    assert orders.get("COMPLETED", 0) > 0 and orders.get("COMPENSATED", 0) > 0, report
    answers = summary["answers_by_type"]["order"]
    assert answers.get("200", 0) > 0 and answers.get("409", 0) > 0, report
    refused = summary["refusals_by_type"]["order"]
    assert refused.get("insufficient balance", 0) + refused.get("unknown customer N", 0) > 0, \
        report
    assert "order" in summary["invariants_checked"], report
    customers = summary["balances"]["CUSTOMER"]
    assert customers["opening_total"] == "600.00", report
    assert all(Decimal(low) >= 0 for low in customers["min_balance_seen"].values()), report


def test_sagas_of_every_type_stay_all_or_nothing_through_kills_freezes_faults_and_a_database_restart(
        tmp_path):
    summary, report = run_chaos(tmp_path, "--saga", "mixed", "--seed", "4242", "--sagas", "120",
                                "--clients", "16", "--orchestrators", "2", "--db-restarts", "1",
                                "--interval", "0.3")
    assert_chaos_covered(summary, report)
    # Every saga request ended somewhere, and the database holds each one settled.
    assert_every_saga_settled(summary, report)
    assert set(summary["outcomes_by_type"]) == {"registration", "transfer", "order"}, report
    assert summary["outcomes_by_type"]["registration"].get("COMPLETED", 0) > 0, report
    assert_orders_fulfilled_and_rejected(summary, report)


def test_transfers_conserve_money_and_never_overdraw_through_kills_freezes_faults_and_a_database_restart(
        tmp_path):
    summary, report = run_chaos(tmp_path, "--saga", "transfer", "--seed", "2024", "--sagas",
                                "120", "--clients", "16", "--orchestrators", "2",
                                "--db-restarts", "1", "--interval", "0.3")
    assert_chaos_covered(summary, report)
    accounts = summary["balances"]["ACCOUNT"]
    # The sampler read the balances all through the run, and never saw one below zero.
    assert summary["sampler"]["reads"] >= 100, report
    assert all(Decimal(low) >= 0 for low in accounts["min_balance_seen"].values()), report
    # Money is conserved and each balance is what the completed transfers say (the
    # transfer's invariant, checked at quiet).
    assert accounts["total"] == accounts["opening_total"] == "1750.00", report
    assert "transfer" in summary["invariants_checked"], report
    # Transfers completed, some were refused for want of funds, none failed or stuck.
    assert_every_saga_settled(summary, report)
    transfers = summary["outcomes_by_type"]["transfer"]
    assert transfers.get("COMPLETED", 0) > 0, report
    assert summary["refusals_by_type"]["transfer"].get("insufficient funds", 0) > 0, report
    assert summary["answers"].get("200", 0) > 0, report


def test_choreographed_registrations_and_orders_stay_all_or_nothing_with_no_orchestrator_through_broker_kills(
        tmp_path):
    summary, report = run_chaos(tmp_path, "--mode", "choreography", "--saga", "mixed",
                                "--second-b", "--seed", "11", "--sagas", "120", "--clients", "8",
                                "--db-restarts", "1", "--interval", "0.3")
    assert (summary["mode"], summary["transport"]) == ("choreography", "rabbitmq"), report
    assert summary["orchestrator_running"] is False, report
    assert_chaos_covered(summary, report, SERVICES + ("service_b2", "rabbitmq"))
    # Every saga ended, one way or the other; every event was published (the checks
    # above) and every answer was true.
    assert_every_saga_settled(summary, report)
    assert summary["sagas_in_db"] >= 120, report
    assert set(summary["outcomes_by_type"]) == {"registration", "order"}, report
    assert summary["outcomes_by_type"]["registration"].get("COMPLETED", 0) > 0, report
    assert_orders_fulfilled_and_rejected(summary, report)


def test_sagas_over_kafka_stay_all_or_nothing_and_conserve_money_through_broker_kills(tmp_path):
    summary, report = run_chaos(tmp_path, "--transport", "kafka", "--saga", "mixed",
                                "--second-b", "--orchestrators", "2", "--seed", "7", "--sagas",
                                "60", "--clients", "16", "--db-restarts", "1", "--interval",
                                "0.3")
    assert (summary["mode"], summary["transport"]) == ("orchestration", "kafka"), report
    assert_chaos_covered(summary, report, PROCESSES + ("service_b2", "kafka"))
    assert_every_saga_settled(summary, report)
    outcomes = summary["outcomes_by_type"]
    assert outcomes["registration"].get("COMPLETED", 0) > 0, report
    assert outcomes["transfer"].get("COMPLETED", 0) > 0, report
    accounts = summary["balances"]["ACCOUNT"]
    assert accounts["total"] == accounts["opening_total"] == "1750.00", report
    assert all(Decimal(low) >= 0 for low in accounts["min_balance_seen"].values()), report
    assert_orders_fulfilled_and_rejected(summary, report)
