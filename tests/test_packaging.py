"""The library a team installs: `pip install .` gives the engine, the participant kit and
the orchestrator's app (package `saga`), with the engine's tables; the demo's schema.sql
is made from the engine's tables and the demo's saga types."""

import os
import subprocess
import sys

from conftest import ROOT
from saga.definitions import SAGA_TYPES
from saga.schema import schema_sql


def test_schema_sql_is_the_engines_tables_and_the_demo_types():
    with open(os.path.join(ROOT, "schema.sql"), encoding="utf-8") as f:
        assert f.read() == schema_sql(SAGA_TYPES.values()), (
            "regenerate it: SAGA_TYPE_MODULES=sagas.registration,sagas.transfer,sagas.order "
            ".venv/bin/python -m saga.schema --print > schema.sql")


def test_the_wheel_holds_the_library_and_not_the_demo(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), ROOT], check=True, cwd=tmp_path)
    wheel, = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    import zipfile
    names = zipfile.ZipFile(os.path.join(tmp_path, wheel)).namelist()
    for expected in ("saga/engine.py", "saga/api.py", "saga/participant/app.py",
                     "saga/schema.sql", "saga/common.py"):
        assert expected in names
    assert not [n for n in names if n.startswith(("sagas/", "tools/", "tests/"))
                or n in ("orchestrator.py", "common.py", "service_a.py")]
