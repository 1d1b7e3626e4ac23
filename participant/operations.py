"""What a service does for a saga: its operations, each a business write and (unless it
is a pivot) its undo, run inside the transaction the participant opens. The registration
operations keep one row per saga in the service's table; the account operations move
money in the service's own account."""

from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

import mysql.connector
from mysql.connector import errorcode

from validation import ApiError, amount_field, int_field, text_field


class Refusal(Exception):
    """The service's business "no": final, recorded in the ledger, nothing written."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class Operation:
    name: str
    fields: tuple[str, ...]
    read: Callable[[dict], dict]                       # checked call fields (ApiError)
    apply: Callable[[object, str, dict], dict]         # (cursor, saga_id, values) -> answer
    # (cursor, saga_id, values, answer) -> what was undone; None: a pivot, never undone.
    undo: Callable[[object, str, dict, dict], dict] | None = None
    # For an operation that is one INSERT answered by its new row's id: the statement
    # and the answer's field, so the participant can send it with the ledger entry and
    # the COMMIT in one round trip; `refusal` turns its IntegrityError into a Refusal.
    insert: Callable[[str, dict], tuple[str, tuple]] | None = None
    id_name: str | None = None
    refusal: Callable[[Exception, dict], "Refusal | None"] = lambda exc, values: None


def table_row(name: str, table: str, id_name: str, readers: dict) -> Operation:
    """One row per saga in `table`: insert on invoke, delete on compensate."""
    columns = ", ".join(readers)
    marks = ", ".join(["%s"] * (len(readers) + 1))

    def insert(saga_id, values):
        return (f"INSERT INTO {table} (saga_id, {columns}) VALUES ({marks})",
                (saga_id, *values.values()))

    def refusal(exc, values):
        if getattr(exc, "errno", None) == errorcode.ER_NO_REFERENCED_ROW_2 \
                and "user_id" in values:
            return Refusal(f"user_id {values['user_id']} does not exist in TABLE_A",
                           "user_id")
        return None

    def apply(cur, saga_id, values):
        try:
            cur.execute(*insert(saga_id, values))
        except mysql.connector.IntegrityError as exc:
            refused = refusal(exc, values)
            if refused:
                raise refused from None
            raise
        return {id_name: cur.lastrowid}

    def undo(cur, saga_id, values, answer):
        cur.execute(f"DELETE FROM {table} WHERE saga_id = %s", (saga_id,))
        return {"removed": cur.rowcount,
                "undone": f"rows removed: {cur.rowcount}"}

    def read(body):
        return {field: reader(body, field) for field, reader in readers.items()}

    return Operation(name, tuple(readers), read, apply, undo, insert, id_name, refusal)


def account_operations(service: str) -> tuple[Operation, Operation]:
    """Debit (undone by a refund) and credit (a pivot) on this service's account, whose
    id is the service's letter."""

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
    return (Operation("debit", fields, read, debit, refund),
            Operation("credit", fields, read, credit))


def read_accounts(cur, service: str) -> list[dict]:
    cur.execute("SELECT id, opening, balance FROM ACCOUNT WHERE id = %s", (service,))
    return [{"id": r["id"], "service": service, "balance": money(r["balance"]),
             "opening": money(r["opening"])} for r in cur.fetchall()]


def money(value) -> str:
    return str(Decimal(value).quantize(Decimal("0.01")))


# The registration operations of each service, keyed by its letter.
REGISTRATION_OPERATIONS = {
    "A": table_row("user", "TABLE_A", "user_id", {"username": text_field}),
    "B": table_row("address", "TABLE_B", "address_id",
                   {"user_id": int_field, "address": text_field}),
    "C": table_row("payment", "TABLE_C", "payment_id",
                   {"user_id": int_field, "payment_method": text_field}),
}
