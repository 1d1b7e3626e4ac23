"""Service A (port 5001): its part of every registered saga type; in the demo it
owns TABLE_A (the users), account A and the orders."""

import common  # noqa: F401  (first: the database driver, and the demo's saga types)

from saga.participant.app import create_service_app, run_service

SERVICE = "A"


def create_app(settings=None, faults=None):
    return create_service_app(SERVICE, settings, faults)


if __name__ == "__main__":
    run_service(SERVICE)
