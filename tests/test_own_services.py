"""A team adopts the library without forking it: its own saga type and two tiny Flask
services, in a folder outside this repository, importing only the installed package
(`pip install .`), run through a success, a refusal, and a kill -9 of the orchestrator
with another one taking over."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import requests

from conftest import ROOT, in_background, join
from launcher import free_port, wait_for

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "own_services")


class Team:
    """The team's processes: `python -m saga.api` and its two services."""

    def __init__(self, workdir, site, env):
        self.workdir, self.procs = workdir, {}
        self.ports = {name: free_port() for name in ("orchestrator", "inventory", "payments")}
        self.env = {**env, "PYTHONPATH": f"{site}{os.pathsep}{workdir}",
                    "SAGA_TYPE_MODULES": "shop_sagas", "SAGA_SERVICES": "inventory,payments",
                    "ORCHESTRATOR_PORT": str(self.ports["orchestrator"]),
                    "SERVICE_INVENTORY_URL": f"http://127.0.0.1:{self.ports['inventory']}",
                    "SERVICE_PAYMENTS_URL": f"http://127.0.0.1:{self.ports['payments']}"}

    def url(self, name="orchestrator"):
        return f"http://127.0.0.1:{self.ports[name]}"

    def run(self, *args):
        return subprocess.run([sys.executable, *args], cwd=self.workdir, env=self.env,
                              capture_output=True, text=True, check=True).stdout

    def start(self, name):
        command = ["-m", "saga.api"] if name == "orchestrator" else [f"{name}.py"]
        log = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, *command], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
            env={**self.env, "PORT": str(self.ports[name])}, start_new_session=True)
        log.close()

        def healthy():
            assert self.procs[name].poll() is None, open(
                os.path.join(self.workdir, f"{name}.log")).read()[-2000:]
            try:
                return requests.get(self.url(name) + "/health", timeout=1).status_code == 200
            except requests.RequestException:
                return False
        wait_for(healthy, 30, f"{name} to be healthy")

    def kill(self, name):
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture
def team(mariadb, tmp_path):
    # The library, installed as a team would (its dependencies are this venv's).
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), ROOT],
                   check=True, cwd=tmp_path, capture_output=True)
    workdir = tmp_path / "shop"
    shutil.copytree(FIXTURE, workdir)
    dbname = f"shop_{os.getpid()}"
    mariadb.create_database(dbname, schema=os.devnull)
    team = Team(str(workdir), str(site), {
        **os.environ, "SAGA_DB_PORT": str(mariadb.port), "SAGA_DB_NAME": dbname,
        "SAGA_FAULTS": "off", "RABBITMQ_URL": "off", "SAGA_LEASE_SECONDS": "1",
        "SAGA_RECOVERY_INTERVAL": "0.2", "SAGA_BACKOFF_BASE": "0.05", "SAGA_BACKOFF_MAX": "0.2",
        "SAGA_READ_TIMEOUT": "10"})
    team.db = lambda sql: mariadb.root(f"USE `{dbname}`", sql)
    yield team
    team.stop()


def test_a_teams_own_saga_and_services_run_on_the_installed_library(team):
    # Nothing from this repository: the library comes from where pip put it.
    where = team.run("-c", "import saga, shop_sagas; print(saga.__file__)")
    assert where.startswith(team.env["PYTHONPATH"].split(os.pathsep)[0])
    assert ROOT not in where
    assert "reservation" in team.run("-m", "saga.schema")   # the engine's and its tables
    for name in ("inventory", "payments", "orchestrator"):
        team.start(name)

    types = requests.get(team.url() + "/saga-types", timeout=10).json()["saga_types"]
    assert [t["name"] for t in types] == ["reservation"]
    assert requests.get(team.url("inventory") + "/stock", timeout=10).json() == {"lamp": 3}

    def start(**body):
        return requests.post(team.url() + "/sagas/start", timeout=60,
                             json={"saga_type": "reservation", **body})

    done = start(item="lamp", amount="20.00")
    assert done.status_code == 200 and done.json()["status"] == "COMPLETED", done.text
    refused = start(item="sofa", amount="500.00")
    assert refused.status_code == 409, refused.text
    assert "need a manager" in refused.json()["reason"]
    assert team.db("SELECT item, released FROM RESERVATION ORDER BY item") == [
        ("lamp", 0), ("sofa", 1)]
    assert [str(a) for a, in team.db("SELECT amount FROM PAYMENT")] == ["20.00"]

    # The payment stalls; the orchestrator driving it dies; another one takes over.
    resp = requests.put(team.url("payments") + "/faults", timeout=10,
                        json={"mode": "slow", "seconds": 3, "next": 1})
    assert resp.status_code == 200
    thread, answer = in_background(start, item="desk", amount="30.00")
    wait_for(lambda: requests.get(team.url("payments") + "/health", timeout=5).json()[
        "in_flight"] == 1, 30, "the payment to be under way")
    team.kill("orchestrator")
    join(thread)
    assert "error" in answer   # its client lost the connection
    team.start("orchestrator")
    saga_id = team.db("SELECT id FROM SAGA WHERE label = 'desk'")[0][0]
    wait_for(lambda: requests.get(f"{team.url()}/sagas/{saga_id}/status", timeout=5).json()[
        "status"] == "COMPLETED", 30, "the saga to be completed by the new orchestrator")
    assert team.db("SELECT COUNT(*) FROM PAYMENT WHERE saga_id = '%s'" % saga_id) == [(1,)]
    log = requests.get(f"{team.url()}/sagas/{saga_id}", timeout=5).json()["log"]
    assert any(r["status"] == "RESUMED" or "resumed" in (r["message"] or "") for r in log)
