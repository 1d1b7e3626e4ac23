"""Service A (port 5001): owns TABLE_A, the registered users."""

from common import text_field
from participant import Part, create_service_app, run

PART = Part(
    service="A",
    table="TABLE_A",
    id_name="user_id",
    read_input=lambda body: {"username": text_field(body, "username")},
    insert_sql="INSERT INTO TABLE_A (saga_id, username) VALUES (%s, %s)",
)


def create_app(settings=None, faults=None):
    return create_service_app(PART, settings, faults)


if __name__ == "__main__":
    run(PART, create_app)
