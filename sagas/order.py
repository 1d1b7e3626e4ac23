"""The order (seed 003): A is the order service, B the customer service. A stores the
order PENDING; B charges the customer, or refuses (unknown customer, balance too
short), and then A rejects the order; once charged, A marks it FULFILLED. The charge is
the pivot (money taken is never handed back by marking an order rejected: once sent it
is retried until it lands), and so is the fulfilment.

Choreographed as the seed does it (POST /orders at A, the events order.created,
order.fulfilled and order.rejected over RabbitMQ), or orchestrated through
/sagas/start. A new database opens customers 1, 2 and 3 with 500.00, 100.00 and 0.00.
At quiet: the balances plus the price of every FULFILLED order are the opening 600.00,
no balance is negative, no order is PENDING, and an order is FULFILLED exactly when its
saga COMPLETED."""

from decimal import Decimal

from flask import Blueprint, jsonify

from saga.participant.operations import Operation, Refusal
from saga.fields import always, amount, choice, integer
from saga.model import Choreographed, SagaType, Step, StepKind
from saga.validation import ApiError, amount_field, int_field

ORDER_COLUMNS = "id, saga_id, customer_id, product_id, quantity, total_price, status"


def read_order(body: dict) -> dict:
    return {"customer_id": int_field(body, "customer_id"),
            "product_id": int_field(body, "product_id"),
            "quantity": int_field(body, "quantity", 1, 1000),
            "total_price": amount_field(body, "total_price")}


def place(cur, saga_id, values):
    cur.execute("INSERT INTO ORDERS (saga_id, customer_id, product_id, quantity, "
                "total_price, status) VALUES (%s, %s, %s, %s, %s, 'PENDING')",
                (saga_id, values["customer_id"], values["product_id"], values["quantity"],
                 values["total_price"]))
    return {"order_id": cur.lastrowid}


def reject(cur, saga_id, values, answer):
    cur.execute("UPDATE ORDERS SET status = 'REJECTED' WHERE saga_id = %s", (saga_id,))
    return {"removed": cur.rowcount, "undone": f"order rejected ({cur.rowcount} row)"}


def read_charge(body: dict) -> dict:
    return {"customer_id": int_field(body, "customer_id"), "amount": amount_field(body)}


def charge(cur, saga_id, values):
    # Conditional: concurrent charges are ordered by the row lock and each re-checks
    # the balance it sees, so a balance never goes below 0.
    cur.execute("UPDATE CUSTOMER SET balance = balance - %s WHERE id = %s AND balance >= %s",
                (values["amount"], values["customer_id"], values["amount"]))
    if cur.rowcount != 1:
        cur.execute("SELECT balance FROM CUSTOMER WHERE id = %s", (values["customer_id"],))
        row = cur.fetchone()
        if row is None:
            raise Refusal(f"unknown customer {values['customer_id']}", "customer_id")
        raise Refusal(f"insufficient balance: customer {values['customer_id']} has "
                      f"{row['balance']}, the order costs {values['amount']}", "total_price")
    return {"customer_id": values["customer_id"], "charged": values["amount"]}


def read_fulfil(body: dict) -> dict:
    return {"order_id": int_field(body, "order_id")}


def fulfil(cur, saga_id, values):
    # After the charge nothing can be undone: this only ever succeeds (an order of this
    # saga that is FULFILLED already is the same success), or fails and is retried.
    cur.execute("UPDATE ORDERS SET status = 'FULFILLED' WHERE id = %s AND saga_id = %s "
                "AND status IN ('PENDING', 'FULFILLED')", (values["order_id"], saga_id))
    cur.execute("SELECT status FROM ORDERS WHERE id = %s AND saga_id = %s",
                (values["order_id"], saga_id))
    row = cur.fetchone()
    if row is None or row["status"] != "FULFILLED":
        raise RuntimeError(f"order {values['order_id']} of saga {saga_id} cannot be "
                           f"fulfilled: it is {row and row['status']}")
    return {"order_id": values["order_id"], "order_status": "FULFILLED"}


def order_item(row: dict) -> dict:
    return {"id": row["id"], "saga": row["saga_id"], "customer_id": row["customer_id"],
            "product_id": row["product_id"], "quantity": row["quantity"],
            "total_price": str(row["total_price"]), "status": row["status"]}


def service_routes(service: str, db) -> Blueprint | None:
    """The orders at A (GET /orders, newest first, paged; GET /orders/<id>), the
    customers at B (GET /customers)."""
    from saga.validation import query_int
    routes = Blueprint(f"orders_{service}", __name__)
    if service == "A":
        @routes.get("/orders")
        def orders():
            limit = query_int("limit", 100, 1, 1000)
            offset = query_int("offset", 0, 0, 10_000_000)
            with db.transaction() as cur:
                cur.execute(f"SELECT {ORDER_COLUMNS} FROM ORDERS ORDER BY id DESC "
                            "LIMIT %s OFFSET %s", (limit, offset))
                rows = cur.fetchall()
            return jsonify({"orders": [order_item(r) for r in rows], "limit": limit,
                            "offset": offset})

        @routes.get("/orders/<int:order_id>")
        def one_order(order_id):
            with db.transaction() as cur:
                cur.execute(f"SELECT {ORDER_COLUMNS} FROM ORDERS WHERE id = %s", (order_id,))
                row = cur.fetchone()
            if row is None:
                raise ApiError(f"no order with id {order_id}", "order_id", status=404)
            return jsonify(order_item(row))
    elif service == "B":
        @routes.get("/customers")
        def customers():
            with db.transaction() as cur:
                cur.execute("SELECT id, balance FROM CUSTOMER ORDER BY id")
                rows = cur.fetchall()
            return jsonify({"customers": [{"id": r["id"], "balance": str(r["balance"])}
                                          for r in rows]})
    else:
        return None
    return routes


OPENING_TOTAL = Decimal("600.00")


def orders_balance(cur) -> list[str]:
    wrong = []
    cur.execute("SELECT COALESCE(SUM(balance), 0) AS held, COALESCE(MIN(balance), 0) AS low "
                "FROM CUSTOMER")
    customers = cur.fetchone()
    cur.execute("SELECT COALESCE(SUM(total_price), 0) AS paid FROM ORDERS "
                "WHERE status = 'FULFILLED'")
    paid = cur.fetchone()["paid"]
    cur.execute("SELECT SUM(opening) AS opening FROM CUSTOMER")
    opening = cur.fetchone()["opening"] or 0
    if Decimal(customers["held"]) + Decimal(paid) != Decimal(opening):
        wrong.append(f"customers hold {customers['held']} and fulfilled orders {paid}: "
                     f"not the opening {opening}")
    if Decimal(customers["low"]) < 0:
        wrong.append("a customer's balance is negative")
    cur.execute("SELECT o.id, o.status, s.status AS saga FROM ORDERS o LEFT JOIN SAGA s "
                "ON s.id = o.saga_id")
    for row in cur.fetchall():
        if row["status"] == "PENDING" or (row["status"] == "FULFILLED") != (
                row["saga"] == "COMPLETED"):
            wrong.append(f"order {row['id']} is {row['status']}, its saga {row['saga']}")
    return wrong


def sample(rng) -> dict:
    """A varied order, for the chaos harness: mostly small ones (so that customers 1 and
    2 can pay for hundreds), now and then one too dear, and some from customer 3
    (nothing to pay with) or an unknown customer, which are refused."""
    cents = rng.randint(1, 100) if rng.random() < 0.95 else rng.randint(10000, 60000)
    price = cents / 100 if rng.random() < 0.25 else f"{cents // 100}.{cents % 100:02d}"
    order = {"customer_id": rng.choice((1, 1, 2, 2, 3, 9)), "product_id": rng.randint(1, 50),
             "quantity": rng.randint(1, 5), "total_price": price}
    return {**order, "status": "pending"} if rng.random() < 0.5 else order


SCHEMA = """\
-- The order saga (seed 003): A's orders and B's customers. An order is PENDING until it
-- is FULFILLED (its customer was charged) or REJECTED (the charge was refused); one
-- order per saga. Balances are exact and, like the accounts, never negative.
CREATE TABLE IF NOT EXISTS ORDERS (
  id INT AUTO_INCREMENT PRIMARY KEY,
  saga_id VARCHAR(36) COLLATE utf8mb4_bin NOT NULL,
  customer_id INT NOT NULL,
  product_id INT NOT NULL,
  quantity INT NOT NULL,
  total_price DECIMAL(14,2) NOT NULL,
  status ENUM('PENDING', 'FULFILLED', 'REJECTED') NOT NULL,
  created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  UNIQUE KEY orders_saga (saga_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS CUSTOMER (
  id INT NOT NULL PRIMARY KEY,
  opening DECIMAL(14,2) NOT NULL,
  balance DECIMAL(14,2) NOT NULL,
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  CONSTRAINT customer_never_negative CHECK (balance >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT IGNORE INTO CUSTOMER (id, opening, balance) VALUES
  (1, 500.00, 500.00), (2, 100.00, 100.00), (3, 0.00, 0.00);
"""

ORDER = SagaType(
    name="order",
    summary="Place an order: A stores it, B charges the customer, A fulfils it "
            "(rejected if the charge is refused)",
    fields=(integer("customer_id"), integer("product_id"), integer("quantity", 1, 1000),
            amount("total_price"), choice("status", ("pending",), default="pending")),
    steps=(
        Step("order", "order", always("A"), lambda data, results: {
            k: data[k] for k in ("customer_id", "product_id", "quantity", "total_price")}),
        Step("charge", "charge", always("B"), lambda data, results: {
            "customer_id": data["customer_id"], "amount": data["total_price"]},
             StepKind.RETRIABLE),
        Step("fulfil", "fulfil", always("A"), lambda data, results: {
            "order_id": results["order"]["order_id"]}, StepKind.RETRIABLE),
    ),
    operations=(
        Operation("order", ("A",), ("customer_id", "product_id", "quantity", "total_price"),
                  read_order, place, reject),
        Operation("charge", ("B",), ("customer_id", "amount"), read_charge, charge),
        Operation("fulfil", ("A",), ("order_id",), read_fulfil, fulfil, refuses=False),
    ),
    label=lambda data: (f"customer {data['customer_id']}: {data['quantity']} × product "
                        f"{data['product_id']}, {data['total_price']}"),
    schema=SCHEMA,
    tables=("ORDERS", "CUSTOMER"),
    reset=("DELETE FROM ORDERS", "UPDATE CUSTOMER SET balance = opening"),
    invariant=orders_balance,
    choreography=Choreographed("/orders", events={
        "order.order.done": "order.created",
        "order.charge.done": "order.fulfilled",
        "order.charge.failed": "order.rejected"}),
    routes=service_routes,
    views={"orders": ("A", "/orders"), "customers": ("B", "/customers")},
    colour="#d97706",
    example={"customer_id": 1, "product_id": 1, "status": "pending", "quantity": 1,
             "total_price": "50.00"},
    sample=sample,
)
