"""The chaos harness, short: sagas from concurrent clients while every process is killed
and frozen, faults come and go and the database restarts; afterwards every saga is
all-or-nothing and every answer a client got is true. The long run is
`python tools/chaos.py --sagas 10000 --clients 16 --db-restarts 3`."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_chaos(tmp_path, *args, timeout=150):
    out = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "chaos.py"), *args,
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    summary = json.loads(out.read_text()) if out.exists() else None
    return proc, summary


def test_sagas_stay_all_or_nothing_through_kills_freezes_faults_and_a_database_restart(tmp_path):
    proc, summary = run_chaos(tmp_path, "--seed", "4242", "--sagas", "100", "--clients", "16",
                              "--orchestrators", "2", "--db-restarts", "1", "--interval", "0.3")
    violations = summary["violations"] if summary else None
    report = f"violations: {violations}\n...{proc.stdout[-5000:]}{proc.stderr[-3000:]}"
    assert proc.returncode == 0, report
    assert summary is not None and summary["violations"] == [], report
    chaos = summary["chaos"]
    # The chaos really happened: both orchestrators and every service were killed and
    # frozen, every service had a fault set, and the database went down and came back.
    assert summary["coverage_left"] == [], report
    for name in ("orchestrator", "orchestrator2", "service_a", "service_b", "service_c"):
        assert chaos[name].get("kill", 0) >= 1 and chaos[name].get("freeze", 0) >= 1, report
    for name in ("service_a", "service_b", "service_c"):
        assert chaos[name].get("fault", 0) >= 1, report
    assert len(summary["db_restarts"]) == 1, report
    # Every saga request ended somewhere, and the database holds each one settled.
    assert summary["stuck"] == 0 and summary["failed"] == 0, report
    assert summary["completed"] + summary["compensated"] == summary["sagas_in_db"], report
    assert summary["completed"] > 0 and summary["answers"].get("200", 0) > 0, report
