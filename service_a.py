"""Service A (port 5001): owns TABLE_A (the users) and account A."""

import common  # noqa: F401  (first: it loads the database driver, see common.py)

from participant.app import create_service_app, run_service
from participant.operations import REGISTRATION_OPERATIONS, account_operations

SERVICE = "A"
OPERATIONS = (REGISTRATION_OPERATIONS[SERVICE], *account_operations(SERVICE))


def create_app(settings=None, faults=None):
    return create_service_app(SERVICE, OPERATIONS, settings, faults)


if __name__ == "__main__":
    run_service(SERVICE, create_app)
