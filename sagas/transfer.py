"""The money transfer (seed 002): debit one account (undone by a refund), then credit
another (the pivot: once sent it is never undone, only retried until it lands; only a
recorded refusal leads to the refund). Each service holds one account, its own letter;
a new database opens them with A = 1000.00, B = 500.00, C = 250.00. No balance is ever
negative, and money is conserved: at quiet each balance is its opening plus the
COMPLETED transfers in, minus those out."""

import json
from decimal import Decimal

import mysql.connector
from flask import Blueprint, jsonify

from saga.common import SERVICES
from saga.participant.operations import Operation, Refusal
from saga.fields import amount, choice
from saga.model import SagaType, Step, StepKind
from saga.validation import ApiError, amount_field, text_field


def account_operations(service: str) -> tuple[Operation, Operation]:
    """Debit (undone by a refund) and credit (a pivot) on this service's account."""

    def read(body):
        account = text_field(body, "account", 1)
        if account != service:
            raise ApiError(f"account {account!r} is not held here; service {service} holds "
                           f"account {service}", "account", status=422)
        return {"account": account, "amount": amount_field(body)}

    def balance(cur):
        cur.execute("SELECT balance FROM ACCOUNT WHERE id = %s", (service,))
        row = cur.fetchone()
        if row is None:
            raise Refusal(f"account {service} does not exist", "account")
        return row["balance"]

    def debit(cur, saga_id, values):
        # Conditional, so concurrent debits can never take the balance below zero: the
        # row lock orders them and each re-checks the balance it sees.
        cur.execute("UPDATE ACCOUNT SET balance = balance - %s WHERE id = %s AND balance >= %s",
                    (values["amount"], service, values["amount"]))
        if cur.rowcount != 1:
            raise Refusal(f"insufficient funds: account {service} holds {balance(cur)}, "
                          f"the debit is {values['amount']}", "amount")
        return {"account": service, "debited": values["amount"], "balance": str(balance(cur))}

    def refund(cur, saga_id, values, answer):
        cur.execute("UPDATE ACCOUNT SET balance = balance + %s WHERE id = %s",
                    (values["amount"], service))
        return {"undone": f"refunded {values['amount']} to {service}",
                "balance": str(balance(cur))}

    def credit(cur, saga_id, values):
        try:
            cur.execute("UPDATE ACCOUNT SET balance = balance + %s WHERE id = %s",
                        (values["amount"], service))
        except mysql.connector.DataError:
            raise Refusal(f"account {service} cannot hold that much", "amount") from None
        if cur.rowcount != 1:
            raise Refusal(f"account {service} does not exist", "account")
        return {"account": service, "credited": values["amount"], "balance": str(balance(cur))}

    fields = ("account", "amount")
    return (Operation("debit", (service,), fields, read, debit, refund),
            Operation("credit", (service,), fields, read, credit))


def money(value) -> str:
    return str(Decimal(value).quantize(Decimal("0.01")))


def read_accounts(cur, service: str) -> list[dict]:
    cur.execute("SELECT id, opening, balance FROM ACCOUNT WHERE id = %s", (service,))
    return [{"id": r["id"], "service": service, "balance": money(r["balance"]),
             "opening": money(r["opening"])} for r in cur.fetchall()]


def service_routes(service: str, db) -> Blueprint:
    """The service's own account: GET /accounts and GET /balance."""
    routes = Blueprint(f"accounts_{service}", __name__)

    @routes.get("/accounts")
    def accounts():
        with db.transaction() as cur:
            return jsonify({"accounts": read_accounts(cur, service)})

    @routes.get("/balance")
    def balance():
        with db.transaction() as cur:
            account, = read_accounts(cur, service)
        return jsonify({"account": account["id"], "balance": account["balance"]})

    return routes


def orchestrator_routes(reads) -> Blueprint:
    """GET /accounts at the orchestrator: every service's account, read from the service
    that owns it, and their total; `in_flight` is the money of transfers between their
    debit and their credit (or refund), which the total does not hold meanwhile. The
    balances are read one service after the other, not as one snapshot."""
    routes = Blueprint("transfer_accounts", __name__)

    @routes.get("/accounts")
    def accounts():
        listed, complete = [], True
        for service in reads.services:
            answer = reads.get(service, "/accounts")
            if "accounts" in answer:
                listed += [{k: a[k] for k in ("id", "service", "balance")}
                           for a in answer["accounts"]]
            else:
                complete = False
                listed.append({"id": service, "service": service, "balance": None,
                               "error": answer.get("error", "unavailable")})
        total = str(sum(Decimal(a["balance"]) for a in listed)) if complete else None
        in_flight = sum((Decimal(data["amount"])
                         for data in reads.store.inputs_in_flight("transfer")),
                        Decimal("0.00"))
        return jsonify({"accounts": listed, "total": total, "in_flight": str(in_flight),
                        "complete": complete})

    return routes


def money_conserved(cur) -> list[str]:
    cur.execute("SELECT id, opening, balance FROM ACCOUNT")
    accounts = cur.fetchall()
    expected = {a["id"]: Decimal(a["opening"]) for a in accounts}
    cur.execute("SELECT input FROM SAGA WHERE type = 'transfer' AND status = 'COMPLETED'")
    for row in cur.fetchall():
        moved = json.loads(row["input"])
        expected[moved["from"]] -= Decimal(moved["amount"])
        expected[moved["to"]] += Decimal(moved["amount"])
    return [f"account {a['id']} holds {a['balance']}, expected {expected[a['id']]}"
            for a in accounts if Decimal(a["balance"]) != expected[a["id"]]] + \
        [f"account {a['id']} is negative" for a in accounts if Decimal(a["balance"]) < 0]


def different_accounts(data: dict) -> None:
    if data["from"] == data["to"]:
        raise ApiError(f"to must be another account than from ({data['from']})", "to")


def sample(rng) -> dict:
    """A varied transfer, for the chaos harness: any two accounts, 0.01 to 300.00 (so
    some find the funds short), now and then as a JSON number, the seed's spelling."""
    source, target = rng.sample(SERVICES, 2)
    cents = rng.randint(1, 30000)
    return {"from": source, "to": target, "amount": cents / 100 if rng.random() < 0.25
            else f"{cents // 100}.{cents % 100:02d}"}


SCHEMA = """\
-- The money of the transfer saga: one account per service, id = the service's letter.
-- Exact decimals; the CHECK is the database's own guard that no balance goes negative
-- (the debit is also a conditional UPDATE, so a short balance is a refusal, not an error).
CREATE TABLE IF NOT EXISTS ACCOUNT (
  id CHAR(1) NOT NULL PRIMARY KEY,
  opening DECIMAL(14,2) NOT NULL,
  balance DECIMAL(14,2) NOT NULL,
  updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
  CONSTRAINT account_never_negative CHECK (balance >= 0)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT IGNORE INTO ACCOUNT (id, opening, balance) VALUES
  ('A', 1000.00, 1000.00), ('B', 500.00, 500.00), ('C', 250.00, 250.00);
"""

TRANSFER = SagaType(
    name="transfer",
    summary="Move money: debit one account, then credit another (refund if refused)",
    fields=(choice("from", SERVICES, default="A"), choice("to", SERVICES, default="B"),
            amount()),
    steps=(
        Step("debit", "debit", lambda data: data["from"], lambda data, results: {
            "account": data["from"], "amount": data["amount"]}),
        # The credit is the pivot: reversing a credit that may already be spent is how
        # sagas overdraw accounts, so once sent it is only ever retried.
        Step("credit", "credit", lambda data: data["to"], lambda data, results: {
            "account": data["to"], "amount": data["amount"]}, StepKind.RETRIABLE),
    ),
    operations=tuple(op for service in SERVICES for op in account_operations(service)),
    label=lambda data: f"{data['from']}→{data['to']} {data['amount']}",
    check=different_accounts,
    # A refund that gave up would leave the money nowhere: it is retried until it lands.
    compensation_gives_up=False,
    schema=SCHEMA,
    tables=("ACCOUNT",),
    reset=("UPDATE ACCOUNT SET balance = opening",),
    invariant=money_conserved,
    start_path="/transfer",
    routes=service_routes,
    orchestrator_routes=orchestrator_routes,
    colour="#059669",
    example={"from": "A", "to": "B", "amount": "100.00"},
    sample=sample,
)
