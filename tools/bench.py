"""Benchmark the saga system the way a load generator sees it: POST a saga's body at
several concurrency levels with wrk (or a Python client), count completed sagas (200
answers only), latency percentiles, errors by status, and CPU milliseconds per saga for
every process, the database, the brokers and the load generator; optionally side by side
with a faithful copy of the seed's naive design (bench/naive/), interleaved in one run.

    # ours vs the seed's code, wrk at 8 connections, 3 rounds of 8 s, order flipped each round
    .venv/bin/python tools/bench.py --with-naive --concurrency 8 --duration 8 --repeat 3

    # the full comparison: 1, 8 and 32 connections; both clients
    .venv/bin/python tools/bench.py --with-naive --repeat 3
    .venv/bin/python tools/bench.py --with-naive --repeat 3 --client python

    # ours only: the transfer saga, Kafka transport, choreography over RabbitMQ
    .venv/bin/python tools/bench.py --no-naive --saga transfer
    .venv/bin/python tools/bench.py --no-naive --transport kafka
    .venv/bin/python tools/bench.py --no-naive --mode choreography

    # a system that is already running (faults are set through its API)
    .venv/bin/python tools/bench.py --url http://127.0.0.1:5000 --concurrency 1,8,32

    # variants of ours side by side (settings, or a copy of the code elsewhere)
    .venv/bin/python tools/bench.py --with-naive --variant 'w2;SAGA_WEB_WORKERS=2' \\
        --variant 'exp;dir=/tmp/exp'

    # where ours spends its CPU at 8 connections (py-spy: .venv/bin/pip install py-spy)
    .venv/bin/python tools/bench.py --no-naive --concurrency 8 --profile /tmp/prof

    # 100,000 sagas / 1,000,000 log rows vs an empty database
    .venv/bin/python tools/bench.py --scale-check

Every load run is bounded by --duration seconds per level; all traffic goes to 127.0.0.1.
"""

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))      # tools
ROOT = os.path.dirname(HERE)                            # the project
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "bench"))

from cpu import CpuMeter  # noqa: E402
from load import Result, find_wrk, run_load  # noqa: E402
from systems import (DB_COUNTERS, Naive, Ours, Running, broker_pids, db_status,  # noqa: E402
                     start_mariadb)


# --- one measured run --------------------------------------------------------------------------

def measured(target, concurrency, args, tag, warmup=None):
    """Warm up (unmeasured), then one load run with the CPU of every process group, the
    machine's busy cores and the database's counters read before and after."""
    warmup = args.warmup if warmup is None else warmup
    if warmup > 0:
        run_load(args.client, target.url, concurrency, warmup, target.saga, tag + "w",
                 args.wrk_threads)
    meter = CpuMeter(target.cpu_groups())
    server = getattr(target, "server", None)
    before, db_before, t0 = meter.sample(), db_status(server), time.monotonic()
    r = run_load(args.client, target.url, concurrency, args.duration, target.saga,
                 target.label, args.wrk_threads)
    wall = time.monotonic() - t0
    after, db_after = meter.sample(), db_status(server)
    r.wall = wall
    if db_before:
        # The status query itself is one connection and one statement: leave it out.
        r.db = {k: db_after[k] - db_before[k] - (1 if k in ("Questions", "Connections") else 0)
                for k in DB_COUNTERS}
    r.cpu, r.busy_cores = CpuMeter.diff(before, after, wall)
    r.cpu[f"client ({r.client})"] = r.client_cpu
    r.other_cores = max(0.0, r.busy_cores - sum(r.cpu.values()) / max(wall, 1e-9))
    return r


# --- reporting ---------------------------------------------------------------------------------

def fmt_codes(codes):
    return ", ".join(f"{k}:{v}" for k, v in sorted(codes.items(), key=lambda kv: str(kv[0]))) or "0"


def short(name):
    return (name.replace("service_", "").replace("orchestrator", "orch")
            .replace("client (", "").replace(")", ""))


def print_result(r):
    per = max(r.ok, 1)
    cpu = " ".join(f"{short(k)}={v / per * 1000:.2f}" for k, v in r.cpu.items())
    print(f"  {r.label:>8} c={r.concurrency:<3} {r.rate:7.1f} sagas/s  p50 {r.pct[50]:6.1f}  "
          f"p90 {r.pct[90]:6.1f}  p99 {r.pct[99]:7.1f} ms  ok {r.ok:6d}  errors "
          f"{fmt_codes(r.errors())}  | cpu ms/saga {cpu} | busy {r.busy_cores:.2f} cores, "
          f"{r.other_cores:.2f} other", flush=True)


def summarize(results):
    """One (system, level) over its rounds: median rate and percentiles, CPU and
    database work per completed saga over all rounds."""
    m = Result(results[0].label, results[0].concurrency, results[0].client)
    for r in results:
        m.codes.update(r.codes)
    m.rates = [r.rate for r in results]
    m.median_rate = statistics.median(m.rates)
    m.pct = {p: statistics.median(r.pct[p] for r in results) for p in (50, 90, 99)}
    m.p99s = [r.pct[99] for r in results]
    total_ok = sum(r.ok for r in results) or 1
    keys = list(dict.fromkeys(k for r in results for k in r.cpu))
    m.cpu_per_saga = {k: sum(r.cpu.get(k, 0) for r in results) / total_ok * 1000 for k in keys}
    m.db_per_saga = ({k: sum(r.db.get(k, 0) for r in results) / total_ok for k in DB_COUNTERS}
                     if any(r.db for r in results) else {})
    m.busy = statistics.mean(r.busy_cores for r in results)
    m.other = statistics.mean(r.other_cores for r in results)
    return m


def print_table(rounds, labels, levels, faults, base):
    """rounds: (label, level) -> [Result per round]."""
    what = ("the seed's pattern: A fails every 2nd call, B crashes after every 2nd commit"
            if faults == "seed" else "no injected faults")
    print(f"\n=== faults {faults} ({what}) ===")
    head = (f"{'c':>3} {'system':>8} {'sagas/s':>8} {'ratio':>6} {'p50 ms':>7} {'p90 ms':>7} "
            f"{'p99 ms':>7}  {'rounds sagas/s':<20} {'rounds ratio':<18} errors")
    print(head)
    print("-" * len(head))
    summary = {}
    for c in levels:
        ref = rounds.get((base, c))
        for label in labels:
            rs = rounds.get((label, c))
            if not rs:
                continue
            m = summary[(label, c)] = summarize(rs)
            ratios = []
            if ref and label != base:
                # Round i of each system ran back to back: their ratio is the fair one.
                ratios = [r.rate / b.rate if b.rate else float("nan") for r, b in zip(rs, ref)]
            ratio = f"{statistics.median(ratios):6.2f}" if ratios else f"{'':6}"
            print(f"{c:>3} {label:>8} {m.median_rate:8.1f} {ratio} {m.pct[50]:7.1f} "
                  f"{m.pct[90]:7.1f} {m.pct[99]:7.1f}  "
                  f"{'/'.join(f'{x:.0f}' for x in m.rates):<20} "
                  f"{'/'.join(f'{x:.2f}' for x in ratios):<18} {fmt_codes(m.errors())}")
    print("  (sagas/s and percentiles: median over rounds; ratio: median of the per-round "
          f"ratios to {base}; latency of every answer)")
    print("\n  CPU ms per completed saga (all rounds); machine busy cores, of which other "
          "processes:")
    for c in levels:
        for label in labels:
            m = summary.get((label, c))
            if m is None:
                continue
            parts = " ".join(f"{short(k)}={v:.2f}" for k, v in m.cpu_per_saga.items())
            servers = sum(v for k, v in m.cpu_per_saga.items() if not k.startswith("client"))
            print(f"  c={c:<3} {label:>8}: {parts}  | system total={servers:.2f}  "
                  f"busy={m.busy:.2f} other={m.other:.2f}")
    if any(m.db_per_saga for m in summary.values()):
        print("\n  Database work per completed saga:")
        for c in levels:
            for label in labels:
                m = summary.get((label, c))
                if m is None or not m.db_per_saga:
                    continue
                d = m.db_per_saga
                print(f"  c={c:<3} {label:>8}: statements={d['Questions']:.1f} "
                      f"pings={d['Com_admin_commands']:.1f} commits={d['Com_commit']:.1f} "
                      f"insert={d['Com_insert']:.1f} update={d['Com_update']:.1f} "
                      f"select={d['Com_select']:.1f} connections={d['Connections']:.2f} "
                      f"fsyncs={d['Innodb_data_fsyncs']:.2f}")
    return summary


# --- the comparison ----------------------------------------------------------------------------

def compare(systems, args, levels, faults_modes):
    """Per fault mode: for each round and level, every system back to back, the order
    flipped each round so background load and warm caches favour none."""
    labels = [s.label for s in systems]
    for faults in faults_modes:
        print(f"\n--- faults {faults}, client {args.client}, saga {systems[-1].saga}, "
              f"{args.repeat} round(s) of {args.duration:g} s (+{args.warmup:g} s warmup) ---",
              flush=True)
        rounds = collections.defaultdict(list)
        for i in range(args.repeat):
            for c in levels:
                order = systems if i % 2 == 0 else list(reversed(systems))
                for s in order:
                    s.set_faults(faults)
                    s.settle()
                    r = measured(s, c, args, f"{s.label}-{faults}-{c}-{i}")
                    print_result(r)
                    rounds[(s.label, c)].append(r)
                    s.settle()
        for s in systems:
            s.set_faults("off")
        print_table(rounds, labels, levels, faults, labels[0])


# --- profiling ---------------------------------------------------------------------------------

def profile_run(ours, args, outdir):
    """py-spy on every process of ours during one run at --profile-level: samples of the
    thread holding the GIL (where the Python CPU goes), then, in a second run, of every
    thread, idle ones included (where they wait)."""
    pyspy = shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep
                         + os.environ.get("PATH", ""))
    if not pyspy:
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return
    os.makedirs(outdir, exist_ok=True)
    kinds = (("gil", ["--gil"]), ("wall", ["--idle"])) if args.profile_wall else (("gil", ["--gil"]),)
    for kind, extra in kinds:
        if args.warmup > 0:
            run_load(args.client, ours.url, args.profile_level, args.warmup, ours.saga)
        spies = []
        for name, pid in ours.root_pids().items():
            out = os.path.join(outdir, f"{name}.{kind}.txt")
            spies.append(subprocess.Popen(
                [pyspy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
                 "--rate", str(args.profile_rate), "--format", "raw",
                 "--duration", str(int(args.duration) + 1), "-o", out, *extra],
                stdout=subprocess.DEVNULL, stderr=open(out + ".log", "wb")))
        time.sleep(1.0)
        r = measured(ours, args.profile_level, args, f"prof-{kind}", warmup=0)
        r.label = f"prof-{kind}"
        print_result(r)
        for s in spies:
            try:
                s.wait(30)
            except subprocess.TimeoutExpired:
                s.terminate()
                s.wait(10)
    import profile_report
    for kind, _ in kinds:
        for name in ours.root_pids():
            path = os.path.join(outdir, f"{name}.{kind}.txt")
            if os.path.exists(path) and os.path.getsize(path):
                profile_report.report(path, top=args.profile_top)
            else:
                print(f"\n(no samples for {name}: see {path}.log)")


# --- main --------------------------------------------------------------------------------------

def parse_variant(spec):
    """'label;dir=/path;KEY=VALUE;...' -> (label, code_dir, env)."""
    parts = [p for p in spec.split(";") if p]
    label, code_dir, env = parts[0], ROOT, {}
    for p in parts[1:]:
        key, _, value = p.partition("=")
        if key == "dir":
            code_dir = os.path.abspath(value)
        else:
            env[key] = value
    return label, code_dir, env


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--client", choices=("wrk", "python"), default="wrk",
                   help="load generator: Debian's wrk with bench/start.lua (default), or "
                        "Python threads")
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk -t (at most -c)")
    p.add_argument("--saga", choices=("registration", "transfer"), default="registration")
    p.add_argument("--transport", choices=("http", "kafka"), default="http",
                   help="ours: how the orchestrator calls the services (kafka: a private "
                        "Kafka-protocol broker is started)")
    p.add_argument("--mode", choices=("orchestration", "choreography"), default="orchestration",
                   help="ours: choreography POSTs /register on service A (a private "
                        "RabbitMQ is started)")
    p.add_argument("--url", default="http://127.0.0.1:5000",
                   help="a running orchestrator (when no private setup is asked for)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first")
    p.add_argument("--repeat", type=int, default=3, help="rounds (order flips each round)")
    p.add_argument("--faults", default="off", help="off, seed or off,seed")
    p.add_argument("--with-naive", action="store_true",
                   help="start a private MariaDB, the seed's naive design and ours; compare")
    p.add_argument("--no-naive", action="store_true",
                   help="the same private setup, ours (and its variants) only")
    p.add_argument("--naive-driver", default="cext",
                   help="the naive side's mysql-connector: its C extension, loaded first "
                        "(cext, the default), or what `python service_a.py` loads on Debian 12 "
                        "(pure); 'cext,pure' runs both (the first is the ratios' base)")
    p.add_argument("--variant", action="append", default=[],
                   help="'label;dir=PATH;ENV=VALUE;...' a variant of ours (repeatable)")
    p.add_argument("--scale-check", action="store_true")
    p.add_argument("--scale-sagas", type=int, default=100_000)
    p.add_argument("--scale-log-rows", type=int, default=1_000_000)
    p.add_argument("--reads", type=int, default=50, help="GETs per path in the scale check")
    p.add_argument("--profile", metavar="DIR", help="py-spy profile of ours into DIR")
    p.add_argument("--profile-level", type=int, default=8)
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--profile-wall", action="store_true",
                   help="also a wall-clock profile (idle threads included)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, database)")
    args = p.parse_args()
    if args.duration > 120 or args.warmup > 60:
        p.error("keep runs bounded: --duration at most 120 s, --warmup at most 60 s")
    if args.mode == "choreography" and (args.saga != "registration" or args.transport != "http"):
        p.error("choreography runs the registration over RabbitMQ only")
    if not set(args.naive_driver.split(",")) <= {"cext", "pure"}:
        p.error("--naive-driver: cext, pure or a comma-separated list of them")
    if args.client == "wrk":
        find_wrk()
    return args


def main():
    args = parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x]
    faults_modes = [x for x in args.faults.split(",") if x]

    if not (args.with_naive or args.no_naive or args.scale_check or args.profile):
        target = Running(args.url, args.saga)
        for faults in faults_modes:
            print(f"\n=== {args.url} faults {faults} ===", flush=True)
            if not target.set_faults(faults):
                print("  (could not set faults; skipping)")
                continue
            rounds = collections.defaultdict(list)
            for c in levels:
                for i in range(args.repeat):
                    r = measured(target, c, args, f"{faults}{c}r{i}")
                    print_result(r)
                    rounds[(target.label, c)].append(r)
                target.settle()
            print_table(rounds, [target.label], levels, faults, target.label)
        target.set_faults("off")
        return

    variants = [parse_variant(v) for v in args.variant] or [("ours", ROOT, {})]
    tmp = tempfile.mkdtemp(prefix="saga-bench-")
    logdir = os.path.join(tmp, "logs")
    os.makedirs(logdir)
    print(f"temp dir {tmp} (logs in {logdir})", flush=True)
    server, systems, brokers = None, [], {}
    try:
        server = start_mariadb(os.path.join(tmp, "mariadb"))
        print(f"private MariaDB on 127.0.0.1:{server.port}", flush=True)
        brokers = start_brokers(args, tmp)
        if args.with_naive or args.no_naive or args.profile:
            if args.with_naive and not args.no_naive:
                if args.saga == "registration":
                    for i, driver in enumerate(args.naive_driver.split(",")):
                        systems.append(Naive(server, f"naive_db_{i}", logdir,
                                             "naive" if i == 0 else f"naive-{driver}",
                                             driver).start())
                else:
                    print("(the seed's code has no transfer saga: no naive side)")
            for i, (label, code_dir, env) in enumerate(variants):
                systems.append(Ours(label, server, f"ours_db_{i}", logdir, code_dir, env,
                                    args.saga, args.mode, args.transport,
                                    brokers.get("kafka"), brokers.get("rabbitmq")))
            for s in systems:
                s.ready()
            print("systems: " + ", ".join(f"{s.label} at {s.url}" for s in systems)
                  + describe_setup(args, brokers), flush=True)
            if levels and args.repeat > 0:
                compare(systems, args, levels, faults_modes)
                print("\n  After all runs (all or nothing? money kept?):")
                for s in systems:
                    try:
                        print(f"  {s.label:>8}: {s.consistency()}")
                    except Exception as exc:
                        print(f"  {s.label:>8}: could not check: {exc!r}")
            if args.profile:
                ours = next(s for s in systems if isinstance(s, Ours))
                for s in systems:
                    if isinstance(s, Naive):
                        s.stop()
                print(f"\n##### profile of {ours.label} at c={args.profile_level} #####")
                profile_run(ours, args, args.profile)
            for s in systems:
                s.stop()
            systems = []
        if args.scale_check:
            import scale
            scale.scale_check(server, logdir, args, variants[0], measured, print_result)
    finally:
        for s in systems:
            try:
                s.stop()
            except Exception as exc:
                print(f"stopping {s.label}: {exc!r}", file=sys.stderr)
        for broker in brokers.values():
            broker.stop()
        if server is not None:
            server.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def start_brokers(args, tmp):
    from brokers import PrivateKafka, PrivateRabbitMQ
    brokers = {}
    if args.transport == "kafka":
        brokers["kafka"] = PrivateKafka(os.path.join(tmp, "brokers")).start()
        print(f"private Kafka (Tansu) on {brokers['kafka'].bootstrap}", flush=True)
    if args.mode == "choreography":
        brokers["rabbitmq"] = PrivateRabbitMQ(os.path.join(tmp, "brokers")).start()
        print(f"private RabbitMQ on {brokers['rabbitmq'].url}", flush=True)
    return brokers


def describe_setup(args, brokers):
    parts = [f"client {args.client}", f"saga {args.saga}", f"mode {args.mode}",
             f"transport {args.transport}"]
    if brokers:
        parts.append("brokers " + ", ".join(f"{k} pids {broker_pids(b)[:3]}"
                                            for k, b in brokers.items()))
    return " (" + "; ".join(parts) + ")"


if __name__ == "__main__":
    main()
