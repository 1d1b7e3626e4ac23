"""Service B (port 5002): owns TABLE_B, each user's address."""

from common import int_field, text_field
from participant import Part, create_service_app, run

PART = Part(
    service="B",
    table="TABLE_B",
    id_name="address_id",
    read_input=lambda body: {"user_id": int_field(body, "user_id"),
                             "address": text_field(body, "address")},
    insert_sql="INSERT INTO TABLE_B (saga_id, user_id, address) VALUES (%s, %s, %s)",
)


def create_app(settings=None, faults=None):
    return create_service_app(PART, settings, faults)


if __name__ == "__main__":
    run(PART, create_app)
