"""Summarize a py-spy `--format raw` profile (collapsed stacks): where the samples land,
by function and by library, overall and inside request handling / saga driving.

    python tools/bench/profile_report.py /tmp/prof/orchestrator.cpu.txt [--top 25]
"""

import argparse
import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# Frames that mark "this thread is doing work for a request or a saga".
WORK_MARKERS = ("full_dispatch_request", "_drive ", "handle_request", "run_wsgi")

CATEGORIES = (
    ("mysql/connector", "mysql-connector"),
    ("_mysql_connector", "mysql-connector"),
    ("requests/", "requests"),
    ("urllib3/", "urllib3"),
    ("http/client", "http.client"),
    ("flask/", "flask"),
    ("werkzeug/", "werkzeug"),
    ("gunicorn/", "gunicorn"),
    ("json/", "json"),
    ("logging/", "logging"),
    ("socket.py", "socket"),
    ("ssl.py", "ssl"),
    ("threading.py", "threading"),
    ("concurrent/", "concurrent.futures"),
    ("selectors.py", "selectors"),
    ("multiprocessing/", "multiprocessing"),
    ("email/", "email (http headers)"),
    ("uuid.py", "uuid"),
    ("random.py", "random"),
    ("queue.py", "queue"),
)


def parse(path):
    stacks = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            stacks.append((stack.split(";"), n))
    return stacks


def func_name(frame):
    m = FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    return f"{m.group('func')} ({file.rsplit('/', 1)[-1]})"


def category(frame):
    m = FRAME.match(frame)
    file = m.group("file") if m else frame
    for needle, name in CATEGORIES:
        if needle in file:
            return name
    # py-spy names a file relative to its sys.path entry: saga/engine.py, re/__init__.py
    if file.startswith("<") or not file.endswith(".py"):
        return "native/other"
    if "site-packages" in file:
        return "other library"
    top = file.split("/", 1)[0].removesuffix(".py")
    if os.path.exists(os.path.join(ROOT, file)):
        return "project: " + file
    if top in sys.stdlib_module_names:
        return "stdlib: " + top
    return top


def summarize(stacks, top, title, out):
    total = sum(n for _, n in stacks)
    if not total:
        print(f"  {title}: no samples", file=out)
        return
    own = collections.Counter()
    cats = collections.Counter()
    incl = collections.Counter()
    for frames, n in stacks:
        leaf = frames[-1]
        own[func_name(leaf)] += n
        cats[category(leaf)] += n
        for name in {func_name(f) for f in frames}:
            incl[name] += n
    print(f"  {title}: {total} samples", file=out)
    print("    self time by library:", file=out)
    for name, n in cats.most_common(top):
        print(f"      {100 * n / total:5.1f}%  {name}", file=out)
    print("    self time by function:", file=out)
    for name, n in own.most_common(top):
        print(f"      {100 * n / total:5.1f}%  {name}", file=out)
    print("    inclusive (function anywhere on the stack; wrappers above 97% left out):", file=out)
    shown = 0
    for name, n in incl.most_common():
        if n / total > 0.97 or name.startswith("process ") or name.startswith("thread "):
            continue
        print(f"      {100 * n / total:5.1f}%  {name}", file=out)
        shown += 1
        if shown >= top:
            break


def report(path, top=25, out=None):
    out = out or sys.stdout
    stacks = parse(path)
    print(f"\n== {path}", file=out)
    summarize(stacks, top, "all samples", out)
    working = [(f, n) for f, n in stacks if any(m in fr for fr in f for m in WORK_MARKERS)]
    if working and len(working) != len(stacks):
        summarize(working, top, "inside request handling / saga driving", out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("paths", nargs="+")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    for path in args.paths:
        report(path, args.top)


if __name__ == "__main__":
    main()
