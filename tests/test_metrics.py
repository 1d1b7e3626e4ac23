"""GET /metrics on the four real processes, each running two gunicorn workers: the counts
after real sagas (orchestrated and choreographed, completed, undone, with a worker that
crashed), parsed with prometheus_client's own parser; and Debian's real Prometheus
scraping them with the shipped rules, whose FAILED alert fires after a compensation that
keeps failing."""

import os
import shutil
import subprocess

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, LiveSystem, SEED_INPUT, system_env
from brokers import pick_free_port
from launcher import System, wait_for

RULES = os.path.join(ROOT, "deploy", "prometheus", "rules.yml")
PROCESSES = ("orchestrator", "service_a", "service_b", "service_c")


@pytest.fixture(scope="module")
def _observed_system(mariadb, rabbitmq, tmp_path_factory):
    dbname = mariadb.create_database("saga_metrics")
    system = System(str(tmp_path_factory.mktemp("metrics-logs")), system_env(
        mariadb, dbname, rabbitmq, SAGA_WEB_WORKERS="2", SAGA_COMPENSATE_FOR="1"))
    system.start()
    yield LiveSystem(mariadb, system, dbname, rabbitmq)
    system.stop()


@pytest.fixture
def observed_system(_observed_system):
    """Every process with two workers, emptied, idle, no faults."""
    _observed_system.reset()
    yield _observed_system
    _observed_system.wait_all_idle()


def scrape(system, process):
    """{(name, labels as a sorted tuple): value} of one /metrics answer."""
    resp = requests.get(system.system.url(process) + "/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text)
            for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_all(system):
    return {p: scrape(system, p) for p in PROCESSES}


def delta(before, after, process, name, **labels):
    return value(after[process], name, **labels) - value(before[process], name, **labels)


def registration(n):
    return {**SEED_INPUT, "username": f"metrics_user_{n}"}


def test_metrics_count_every_saga_and_call_across_workers(observed_system):
    system = observed_system
    before = scrape_all(system)
    for n in range(3):
        assert system.start(registration(n)).json()["status"] == "COMPLETED"
    system.set_fault("C", mode="reject", next=1)
    assert system.start(registration(3)).json()["status"] == "COMPENSATED"
    # B's worker commits the call, then dies before answering: gunicorn forks another,
    # and the retry is answered there. The dead worker's counts must stay in the sum.
    system.set_fault("B", mode="crash", next=1)
    assert system.start(registration(4)).json()["status"] == "COMPLETED"
    assert system.register(registration(5)).json()["status"] == "COMPLETED"

    # Each scrape is a new connection, answered by either worker: all must agree.
    scrapes = [scrape_all(system) for _ in range(4)]
    for after in scrapes:
        orchestrated = {"type": "registration", "mode": "orchestration"}
        assert delta(before, after, "orchestrator", "saga_started_total", **orchestrated,
                     transport="http") == 5
        assert delta(before, after, "orchestrator", "saga_finished_total", **orchestrated,
                     status="COMPLETED") == 4
        assert delta(before, after, "orchestrator", "saga_finished_total", **orchestrated,
                     status="COMPENSATED") == 1
        assert delta(before, after, "orchestrator", "saga_duration_seconds_count",
                     type="registration", status="COMPLETED") == 4
        assert delta(before, after, "orchestrator", "saga_duration_seconds_bucket",
                     type="registration", status="COMPLETED", le="+Inf") == 4
        # Measured from the row's created_at (stored in UTC) whoever finishes the saga.
        assert 0 < delta(before, after, "orchestrator", "saga_duration_seconds_sum",
                         type="registration", status="COMPLETED") < 4 * 60
        assert 0 < delta(before, after, "service_a", "saga_duration_seconds_sum",
                         type="registration", status="COMPLETED") < 60
        calls = {(s, a, o): delta(before, after, "orchestrator", "saga_step_calls_total",
                                  service=s, op=op, action=a, outcome=o)
                 for s, op in (("A", "user"), ("B", "address"), ("C", "payment"))
                 for a in ("invoke", "compensate") for o in ("success", "rejected", "failed")}
        assert {k: v for k, v in calls.items() if v} == {
            ("A", "invoke", "success"): 5, ("A", "compensate", "success"): 1,
            ("B", "invoke", "success"): 5, ("B", "invoke", "failed"): 1,
            ("B", "compensate", "success"): 1,
            ("C", "invoke", "success"): 4, ("C", "invoke", "rejected"): 1}
        assert delta(before, after, "orchestrator", "saga_step_duration_seconds_count",
                     service="B", op="address", action="invoke") == 6
        # The states, read from the database: every saga of this test has ended.
        assert value(after["orchestrator"], "sagas", status="COMPLETED") == 5
        assert value(after["orchestrator"], "sagas", status="COMPENSATED") == 1
        assert value(after["orchestrator"], "sagas", status="RUNNING") == 0
        assert value(after["orchestrator"], "saga_oldest_active_seconds") == 0
        assert value(after["orchestrator"], "saga_budget_seconds") > 0
        # The choreographed saga is started and finished by service A.
        choreographed = {"type": "registration", "mode": "choreography"}
        assert delta(before, after, "service_a", "saga_started_total", **choreographed,
                     transport="rabbitmq") == 1
        assert delta(before, after, "service_a", "saga_finished_total", **choreographed,
                     status="COMPLETED") == 1
        # The services' own view: B served the crashed call and its retry (a replay).
        b_calls = {(a, o): delta(before, after, "service_b", "saga_participant_calls_total",
                                 service="B", op="address", action=a, outcome=o)
                   for a in ("invoke", "compensate") for o in ("success", "rejected", "failed")}
        assert {k: v for k, v in b_calls.items() if v} == {
            ("invoke", "success"): 7, ("compensate", "success"): 1}
        assert delta(before, after, "service_c", "saga_participant_calls_total", service="C",
                     op="payment", action="invoke", outcome="rejected") == 1
        for service in ("A", "B", "C"):
            assert value(after[f"service_{service.lower()}"], "saga_outbox_pending",
                         service=service) == 0
        assert ("saga_takeovers_total", ()) in after["orchestrator"]


@pytest.fixture
def prometheus(observed_system, tmp_path):
    """Debian's Prometheus scraping the four processes every second with the shipped
    rules, evaluated every second."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    port = pick_free_port()
    targets = ", ".join(f'"127.0.0.1:{observed_system.system.ports[p]}"' for p in PROCESSES)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s, scrape_timeout: 1s}\n"
        f"rule_files: [{RULES!r}]\n"
        f"scrape_configs: [{{job_name: saga-test, static_configs: [{{targets: [{targets}]}}]}}]\n")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        try:
            return requests.get(url + "/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(ready, 30, "Prometheus to be ready", 0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_shipped_rules_pass_promtool():
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    done = subprocess.run([promtool, "check", "rules", RULES], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    config = os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")
    done = subprocess.run([promtool, "check", "config", config], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_fires_the_failed_alert_after_a_compensation_that_keeps_failing(
        observed_system, prometheus):
    def all_up():
        result = requests.get(prometheus + "/api/v1/query", params={"query": "up"},
                              timeout=5).json()["data"]["result"]
        return len(result) == 4 and all(r["value"][1] == "1" for r in result)
    wait_for(all_up, 30, "Prometheus to scrape all four processes", 0.2)

    def alert(name):
        alerts = requests.get(prometheus + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == name]

    assert alert("SagaFailed") == []
    observed_system.set_fault("C", mode="reject")
    observed_system.set_fault("A", mode="fail", on="compensate")
    resp = observed_system.start(registration(9))
    assert resp.json()["status"] == "FAILED", resp.text
    firing = wait_for(lambda: [a for a in alert("SagaFailed") if a["state"] == "firing"],
                      30, "the SagaFailed alert to fire", 0.2)
    assert firing[0]["labels"]["severity"] == "critical"
    assert float(firing[0]["value"]) == 1
