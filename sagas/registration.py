"""The registration (seed 000): A stores the user, B the address, C the payment method,
one row per saga in each service's table; undone in reverse by deleting the rows. It
runs orchestrated (POST /start) or choreographed by the services (POST /register at A).
All or nothing: a COMPLETED saga has one row in each table, any other none."""

from saga.participant.operations import table_row
from saga.fields import always, text
from saga.model import Choreographed, SagaType, Step
from saga.validation import int_field, text_field

TABLES = ("TABLE_C", "TABLE_B", "TABLE_A")


def all_or_nothing(cur) -> list[str]:
    wrong = []
    cur.execute("SELECT s.id, s.status, (SELECT COUNT(*) FROM TABLE_A WHERE saga_id = s.id) "
                "AS a, (SELECT COUNT(*) FROM TABLE_B WHERE saga_id = s.id) AS b, "
                "(SELECT COUNT(*) FROM TABLE_C WHERE saga_id = s.id) AS c "
                "FROM SAGA s WHERE s.type = 'registration'")
    for row in cur.fetchall():
        rows = (row["a"], row["b"], row["c"])
        expected = {"COMPLETED": (1, 1, 1), "COMPENSATED": (0, 0, 0)}.get(row["status"])
        if row["status"] != "FAILED" and rows != expected:
            wrong.append(f"registration {row['id']} {row['status']} has rows {rows}")
    for table in TABLES:
        cur.execute(f"SELECT COUNT(*) AS n FROM {table} t LEFT JOIN SAGA s "
                    "ON s.id = t.saga_id WHERE s.id IS NULL")
        if cur.fetchone()["n"]:
            wrong.append(f"{table} has rows of no saga")
    return wrong


PAYMENTS = ("Visa", "Mastercard", "Amex", "IBAN DE89 3704", "💳 card")


def sample(rng) -> dict:
    """A varied registration, for the chaos harness's clients."""
    n = rng.randrange(10 ** 6)
    return {"username": f"user-{n}", "address": f"{n} Chaos Street, Zoë-Stadt",
            "payment": rng.choice(PAYMENTS)}


SCHEMA = """\
-- Business tables, one per service, as in the seed, plus the saga that made each row.
-- saga_id is UNIQUE: one saga makes at most one row per table.
CREATE TABLE IF NOT EXISTS TABLE_A (
  id INT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  username VARCHAR(255) NOT NULL,
  UNIQUE KEY table_a_saga (saga_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS TABLE_B (
  id INT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  user_id INT NOT NULL,
  address VARCHAR(255),
  UNIQUE KEY table_b_saga (saga_id),
  FOREIGN KEY (user_id) REFERENCES TABLE_A(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS TABLE_C (
  id INT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  user_id INT NOT NULL,
  payment_method VARCHAR(255),
  UNIQUE KEY table_c_saga (saga_id),
  FOREIGN KEY (user_id) REFERENCES TABLE_A(id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
"""

REGISTRATION = SagaType(
    name="registration",
    summary="Register a user: A stores the user, B the address, C the payment method",
    fields=(text("username"), text("address"), text("payment")),
    steps=(
        Step("A", "user", always("A"), lambda data, results: {
            "username": data["username"]}),
        Step("B", "address", always("B"), lambda data, results: {
            "user_id": results["A"]["user_id"], "address": data["address"]}),
        Step("C", "payment", always("C"), lambda data, results: {
            "user_id": results["A"]["user_id"], "payment_method": data["payment"]}),
    ),
    operations=(
        table_row("user", "A", "TABLE_A", "user_id", {"username": text_field}),
        table_row("address", "B", "TABLE_B", "address_id",
                  {"user_id": int_field, "address": text_field}),
        table_row("payment", "C", "TABLE_C", "payment_id",
                  {"user_id": int_field, "payment_method": text_field}),
    ),
    label=lambda data: data["username"],
    label_param="username",
    schema=SCHEMA,
    tables=TABLES,
    invariant=all_or_nothing,
    start_path="/start",
    choreography=Choreographed("/register"),
    colour="#2563eb",
    example={"username": "john_doe", "address": "123 Main St", "payment": "Visa"},
    sample=sample,
)
