"""What a service does for a saga: an operation is a business write and (unless it is a
pivot) its undo, plain functions run inside the transaction the participant opens and
that get its cursor. Each saga type declares its operations in its own module (sagas/);
table_row is the common kind: one row per saga in a table."""

from dataclasses import dataclass
from typing import Callable

import mysql.connector
from mysql.connector import errorcode


class Refusal(Exception):
    """The service's business "no": final, recorded in the ledger, nothing written."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class Operation:
    name: str
    services: tuple[str, ...]                          # the services that run it
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
    # False for a step after the saga's pivot: nothing before it can be undone any more,
    # so it must not say no (an injected "reject" strikes it as a failure instead).
    refuses: bool = True


def table_row(name: str, service: str, table: str, id_name: str, readers: dict) -> Operation:
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

    return Operation(name, (service,), tuple(readers), read, apply, undo, insert, id_name,
                     refusal)
