"""The database's tables: the engine's (saga/schema.sql) and each registered saga type's
own (its SCHEMA). `python -m saga.schema` applies them all to SAGA_DB_* (re-appliable);
`--print` writes them as one SQL file instead: the demo's schema.sql is exactly that
for the demo's saga types."""

import argparse
import os
import sys

from saga.common import Database, load_settings  # first: it loads the database driver

HEADER = """\
-- The saga database. Re-appliable (IF NOT EXISTS) and names no database:
--   mariadb saga_db < schema.sql
-- Made by `python -m saga.schema --print` from the engine's tables (saga/schema.sql) and
-- each saga type's own (its module's SCHEMA); edit those, not this file.
-- A database made by an earlier version (SAGA with username/address/payment columns) is
-- moved to this layout by `./run.sh upgrade` (tools/upgrade.py); see the README.
-- utf8mb4 everywhere, so any username (Zoë 名前 😀) round-trips exactly; saga ids
-- compare byte for byte (utf8mb4_bin), so 'S-1' and 's-1' are two sagas.
-- Every DATETIME is UTC: each connection of ours sets time_zone = '+00:00'.
"""


def engine_sql() -> str:
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql"),
              encoding="utf-8") as f:
        return f.read().split("\n\n", 1)[1]   # without its own header


def schema_sql(saga_types) -> str:
    """The whole database: the types' tables first (a reader meets the seed's first),
    then the engine's."""
    return "\n".join([HEADER, *(t.schema for t in saga_types if t.schema), engine_sql()])


def statements(sql: str) -> list[str]:
    """Split on the semicolons that end a line (no statement of ours has one inside)."""
    body = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    return [s.strip() for s in body.split(";\n") if s.strip().rstrip(";")]


def apply_schema(db: Database, saga_types) -> None:
    with db.transaction() as cur:
        for sql in statements(schema_sql(saga_types)):
            cur.execute(sql.rstrip(";"))


def main(argv=None) -> int:
    from saga.definitions import SAGA_TYPES
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="write the SQL to stdout")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(schema_sql(SAGA_TYPES.values()))
        return 0
    settings = load_settings()
    apply_schema(Database(settings, 1), SAGA_TYPES.values())
    print(f"{settings.db_name}: tables of the engine and of "
          f"{', '.join(SAGA_TYPES) or 'no saga type'} are there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
