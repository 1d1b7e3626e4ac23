"""Ledger: every statement on STEP_LEDGER, the service's memory of what it did for each
(saga, operation). Both an invoke and a compensation write its key first, so the
database orders them: whichever commits second sees the other."""

import json

from saga.common import commit_with

INVOKED, REFUSED, COMPENSATED = "invoked", "refused", "compensated"


class Ledger:
    def __init__(self, service: str):
        self.service = service

    def find(self, cur, saga_id: str, op: str, lock: str = "") -> dict | None:
        """The entry, with request and answer decoded; `lock` is '', 'FOR UPDATE' or
        'LOCK IN SHARE MODE'."""
        cur.execute("SELECT state, request, answer FROM STEP_LEDGER WHERE service = %s "
                    f"AND saga_id = %s AND op = %s {lock}", (self.service, saga_id, op))
        row = cur.fetchone()
        if row is None:
            return None
        return {"state": row["state"], "request": _load(row["request"]),
                "answer": _load(row["answer"])}

    def record_with_insert(self, cur, insert: tuple[str, tuple], saga_id: str, op: str,
                           request: dict, answer: dict, id_name: str) -> int:
        """The business INSERT, then the 'invoked' entry whose answer gets the new row's
        id (LAST_INSERT_ID()) under `id_name`, then COMMIT: one round trip. Returns the
        new row's id; IntegrityError as for either INSERT."""
        sql, params = insert
        _, row_id = commit_with(
            cur, f"{sql}; INSERT INTO STEP_LEDGER (service, saga_id, op, state, request, "
                 "answer) VALUES (%s, %s, %s, 'invoked', %s, JSON_SET(%s, %s, LAST_INSERT_ID()))",
            (*params, self.service, saga_id, op, _dump(request), _dump(answer), f"$.{id_name}"))
        return row_id

    def record(self, cur, saga_id: str, op: str, request: dict, answer: dict,
               commit: bool = False) -> None:
        """The 'invoked' entry, with what was asked and answered (and, with `commit`,
        the transaction's COMMIT in the same round trip); IntegrityError (duplicate key)
        if the step has an entry already."""
        sql = ("INSERT INTO STEP_LEDGER (service, saga_id, op, state, request, answer) "
               "VALUES (%s, %s, %s, 'invoked', %s, %s)")
        params = (self.service, saga_id, op, _dump(request), _dump(answer))
        if commit:
            commit_with(cur, sql, params)
        else:
            cur.execute(sql, params)

    def record_refusal(self, cur, saga_id: str, op: str, request: dict, answer: dict) -> None:
        """IntegrityError (duplicate key) if the step has an entry already."""
        cur.execute("INSERT INTO STEP_LEDGER (service, saga_id, op, state, request, answer) "
                    "VALUES (%s, %s, %s, 'refused', %s, %s)",
                    (self.service, saga_id, op, _dump(request), _dump(answer)))

    def place_tombstone(self, cur, saga_id: str, op: str, answer: dict) -> bool:
        """Mark a step that never ran as compensated, so it never will: True if this
        wrote the tombstone, False if the step has an entry already."""
        cur.execute("INSERT IGNORE INTO STEP_LEDGER (service, saga_id, op, state, answer) "
                    "VALUES (%s, %s, %s, 'compensated', %s)",
                    (self.service, saga_id, op, _dump(answer)))
        return cur.rowcount == 1

    def mark_compensated(self, cur, saga_id: str, op: str, answer: dict) -> None:
        cur.execute("UPDATE STEP_LEDGER SET state = 'compensated', answer = %s "
                    "WHERE service = %s AND saga_id = %s AND op = %s",
                    (_dump(answer), self.service, saga_id, op))

    def purge(self, cur, older_than_days: float, batch: int = 500) -> int:
        """Forget entries older than the retention whose saga is gone (purged by its
        own retention, or never known here): while a saga's row exists, a late or
        repeated call, or an operator's compensation, may still need its tombstone or
        its first answer."""
        cur.execute("DELETE FROM STEP_LEDGER WHERE service = %s AND updated_at < "
                    "NOW(3) - INTERVAL %s MICROSECOND AND NOT EXISTS (SELECT 1 FROM SAGA "
                    "WHERE SAGA.id = STEP_LEDGER.saga_id) LIMIT %s",
                    (self.service, int(older_than_days * 86400e6), batch))
        return cur.rowcount


def _dump(value) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _load(text):
    return None if text is None else json.loads(text)
