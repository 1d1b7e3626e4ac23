"""What the demo's processes share, imported first by each of them: the saga library's
foundation (saga/common.py: the settings, read from the environment, and the database;
its driver's C extension must load before anything loads the system's OpenSSL), and the
demo's saga types (sagas/), registered unless SAGA_TYPE_MODULES names others."""

import os

import saga.common  # noqa: F401  (first: it loads the database driver)

DEMO_SAGA_TYPES = "sagas.registration,sagas.transfer,sagas.order"
os.environ.setdefault("SAGA_TYPE_MODULES", DEMO_SAGA_TYPES)
