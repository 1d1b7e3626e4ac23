"""Service B (port 5002): its part of every registered saga type; in the demo it
owns TABLE_B (each user's address), account B and the customers."""

import common  # noqa: F401  (first: the database driver, and the demo's saga types)

from saga.participant.app import create_service_app, run_service

SERVICE = "B"


def create_app(settings=None, faults=None):
    return create_service_app(SERVICE, settings, faults)


if __name__ == "__main__":
    run_service(SERVICE)
