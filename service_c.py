"""Service C (port 5003): its part of every registered saga type; in the demo it
owns TABLE_C (each user's payment method) and account C."""

import common  # noqa: F401  (first: the database driver, and the demo's saga types)

from saga.participant.app import create_service_app, run_service

SERVICE = "C"


def create_app(settings=None, faults=None):
    return create_service_app(SERVICE, settings, faults)


if __name__ == "__main__":
    run_service(SERVICE)
