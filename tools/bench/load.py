"""The two load generators of tools/bench.py, both POSTing a saga's body over kept-alive
connections and counting only 200 answers as completed sagas:

* wrk (Debian's /usr/bin/wrk, a C client) with start.lua: what a user's load generator
  shows; it takes little CPU away from the systems under test on a 2-core machine.
* a Python client (threads with http.client), the historical one: it competes with the
  systems for the CPU, so it understates what the faster of them can do.

Each returns a Result with the rate of completed sagas, latency percentiles (of every
answer, as wrk reports them), answers by status code and the client's own CPU seconds.
"""

import collections
import http.client
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
LUA = os.path.join(HERE, "start.lua")
PERCENTILES = (50, 90, 99)
# Longer than SAGA_START_WAIT (30 s): wrk leaves a slower answer out of its latency
# histogram (it only counts it as a timeout), which would hide the tail we measure.
WRK_TIMEOUT = "35s"

REGISTRATION_BODY = {"username": "john_doe", "address": "123 Main St", "payment": "Visa"}
TRANSFER_CIRCLE = (("A", "B"), ("B", "C"), ("C", "A"))


def bodies(saga):
    """The bodies a client cycles through, as start.lua does: the seed's curl body; or
    0.01 around the circle A->B->C->A, so no balance ever runs out."""
    if saga == "transfer":
        return [json.dumps({"from": a, "to": b, "amount": "0.01"}) for a, b in TRANSFER_CIRCLE]
    return [json.dumps(REGISTRATION_BODY)]


class Result:
    def __init__(self, label, concurrency, client):
        self.label, self.concurrency, self.client = label, concurrency, client
        self.codes = collections.Counter()    # status code (int) or exception name -> n
        self.elapsed = 0.0                    # seconds the load ran
        self.pct = {}                         # 50/90/99 -> ms, every answer
        self.client_cpu = 0.0                 # CPU seconds of the load generator
        self.cpu = {}                         # process group -> CPU seconds
        self.busy_cores = 0.0                 # machine-wide, average cores busy
        self.other_cores = 0.0                # of which not the processes measured
        self.db = {}                          # database server counters during the run
        self.wall = 0.0                       # seconds between the CPU samples

    @property
    def ok(self):
        return self.codes.get(200, 0)

    @property
    def rate(self):
        return self.ok / self.elapsed if self.elapsed else 0.0

    def errors(self):
        return {code: n for code, n in self.codes.items() if code != 200}


# --- wrk ---------------------------------------------------------------------------------

def find_wrk():
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk not found: apt-get install wrk (or use --client python)")
    return found


def run_wrk(url, concurrency, duration, saga, label="", threads=2):
    """One wrk run; its CPU comes from the kernel's accounting of the reaped process."""
    r = Result(label, concurrency, "wrk")
    threads = max(1, min(threads, concurrency))
    cmd = [find_wrk(), f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
           "--timeout", WRK_TIMEOUT, "-s", LUA, url, "--", saga]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_chunks = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    out = b"".join(out_chunks).decode(errors="replace")
    r.client_cpu = usage.ru_utime + usage.ru_stime
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(cmd)}\n{out}\n"
                           f"{err.decode(errors='replace')}")
    data = json.loads(line[len("BENCH_JSON "):])
    r.elapsed = data["duration_us"] / 1e6
    r.codes.update({int(k): n for k, n in data["codes"].items()})
    lat = data["latency_us"]
    r.pct = {p: lat[f"p{p}"] / 1000 for p in PERCENTILES}
    r.pct["max"] = lat["max"] / 1000
    # Socket errors never reach response(): list them by wrk's names.
    for kind in ("connect", "read", "write", "timeout"):
        if data["errors"][kind]:
            r.codes[f"wrk-{kind}"] += data["errors"][kind]
    return r


# --- Python client -------------------------------------------------------------------------

def run_python(url, concurrency, duration, saga, label="", timeout=120):
    """POST from `concurrency` threads, each with its own kept-alive connection, for
    `duration` seconds. Its CPU is this process's, which does nothing else meanwhile."""
    parts = urllib.parse.urlsplit(url)
    host, port, path = parts.hostname, parts.port or 80, parts.path or "/"
    payloads = [b.encode() for b in bodies(saga)]
    r = Result(label, concurrency, "python")
    numbers = itertools.count()
    cpu0 = sum(os.times()[:2])
    started = time.monotonic()
    stop_at = started + duration
    lock = threading.Lock()
    latencies, ends = [], []

    def worker():
        conn = None
        mine, codes = [], collections.Counter()
        while time.monotonic() < stop_at:
            n = next(numbers)
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                conn.request("POST", path, body=payloads[n % len(payloads)],
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                code = resp.status
                if resp.will_close:
                    conn.close()
                    conn = None
            except Exception as exc:  # a dropped or refused connection is a result too
                code = type(exc).__name__
                if conn is not None:
                    conn.close()
                conn = None
            mine.append(time.perf_counter() - t0)
            codes[code] += 1
        if conn is not None:
            conn.close()
        with lock:
            latencies.extend(mine)
            r.codes.update(codes)
            ends.append(time.monotonic())

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    r.elapsed = (max(ends) if ends else time.monotonic()) - started
    r.client_cpu = sum(os.times()[:2]) - cpu0
    latencies.sort()
    for p in PERCENTILES:
        r.pct[p] = percentile(latencies, p) * 1000
    r.pct["max"] = (latencies[-1] if latencies else float("nan")) * 1000
    return r


def percentile(data, q):
    """Nearest-rank percentile of sorted data."""
    if not data:
        return float("nan")
    k = min(len(data) - 1, max(0, int(round(q / 100 * len(data) + 0.5)) - 1))
    return data[k]


def run_load(client, url, concurrency, duration, saga, label="", wrk_threads=2):
    if client == "wrk":
        return run_wrk(url, concurrency, duration, saga, label, wrk_threads)
    return run_python(url, concurrency, duration, saga, label)
