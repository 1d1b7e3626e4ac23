"""Service C (port 5003): owns TABLE_C, each user's payment method."""

from common import int_field, text_field
from participant import Part, create_service_app, run

PART = Part(
    service="C",
    table="TABLE_C",
    id_name="payment_id",
    read_input=lambda body: {"user_id": int_field(body, "user_id"),
                             "payment_method": text_field(body, "payment_method")},
    insert_sql="INSERT INTO TABLE_C (saga_id, user_id, payment_method) VALUES (%s, %s, %s)",
)


def create_app(settings=None, faults=None):
    return create_service_app(PART, settings, faults)


if __name__ == "__main__":
    run(PART, create_app)
