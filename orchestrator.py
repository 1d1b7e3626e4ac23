"""The orchestrator (port 5000): runs the demo's sagas (the registration A -> B -> C, the
money transfer, the order) step by step over HTTP or Kafka, compensates in reverse on
failure, and serves the API and ui.html. The app itself is the saga library's
(saga/api.py); this file is the demo's wiring."""

import common  # noqa: F401  (first: the database driver, and the demo's saga types)

from saga.api import create_app, main  # noqa: E402,F401  (create_app: for tests and WSGI)

if __name__ == "__main__":
    main()
