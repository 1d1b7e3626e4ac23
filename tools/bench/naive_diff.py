"""Show, line by line, how bench/naive/ differs from the seed's own code: the seed's
walkthrough (the document the project was created from) holds its four Python files
and its SQL in fenced blocks; this prints a unified diff of each against the copy here.

    .venv/bin/python tools/bench/naive_diff.py SEED.txt

Every difference it prints is listed, with its reason, in tools/bench/README.md.
"""

import difflib
import os
import re
import sys

NAIVE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "naive")
FILES = ("common.py", "service_a.py", "service_b.py", "service_c.py", "orchestrator.py")


def seed_blocks(text):
    """file name -> the seed's code for it (the SQL block is schema.sql)."""
    out = {name: m.group(1) for name, m in (
        (name, re.search(rf"Create `{re.escape(name)}`.*?```python\n(.*?)```", text, re.S))
        for name in FILES) if m}
    sql = re.search(r"```sql\n(CREATE DATABASE.*?)```", text, re.S)
    if sql:
        out["schema.sql"] = sql.group(1)
    return out


def main(argv):
    if len(argv) != 2:
        raise SystemExit(__doc__)
    with open(argv[1], encoding="utf-8") as f:
        blocks = seed_blocks(f.read())
    changed = 0
    for name in (*FILES, "schema.sql"):
        if name not in blocks:
            print(f"!! {name}: not found in {argv[1]}")
            changed += 1
            continue
        with open(os.path.join(NAIVE_DIR, name), encoding="utf-8") as f:
            ours = f.read()
        diff = list(difflib.unified_diff(blocks[name].splitlines(), ours.splitlines(),
                                         f"seed/{name}", f"naive/{name}", lineterm="", n=1))
        print("\n".join(diff) if diff else f"== {name}: identical")
        changed += bool(diff)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
