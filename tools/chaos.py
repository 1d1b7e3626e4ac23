#!/usr/bin/env python3
"""Chaos harness: run many sagas while processes die, freeze and come back, faults come
and go, the broker and the database restart; then check, straight from the database,
that every saga is all or nothing, that every registered saga type's invariant holds
and that every client was told the truth.

    python chaos.py                                    # 200 sagas, 8 clients, random seed
    python chaos.py --seed 42 --sagas 1000 --orchestrators 2 --db-restarts 1
    python chaos.py --sagas 10000 --clients 16 --db-restarts 3      # the long run
    python chaos.py --saga transfer --sagas 3000 --clients 16 --orchestrators 2 --db-restarts 2
    python chaos.py --saga order --sagas 1000 --clients 16 --orchestrators 2 --db-restarts 1
    python chaos.py --saga mixed --sagas 2000 --clients 16         # every saga type at once
    python chaos.py --mode choreography --sagas 3000 --second-b --db-restarts 2 \
        --broker-share 0.1
    python chaos.py --transport kafka --saga transfer --sagas 3000 --clients 16 \
        --orchestrators 2 --second-b --db-restarts 2
    python chaos.py --cluster --duration 90 --clients 8 --seed 7    # see cluster.py

--saga picks what the clients run: one registered saga type (registration by default),
or `mixed`, all of them. Nothing here names a type: a type's input comes from its
`sample(rng)` (or its example), its start path from its declaration, and its checks
from its `invariant(cur)` and its steps (see chaos_checks.py).

--mode choreography runs the types that declare a choreography, started at their first
step's service (the registration's POST /register, the order's POST /orders/) and
carried by RabbitMQ events; no orchestrator runs (--with-orchestrator starts it too,
and the chaos hits it like the rest). --transport kafka has the orchestrator(s) send
every step as a Kafka command. Either way the harness starts a private broker for the
run (tools/brokers.py: RabbitMQ, or Tansu speaking Kafka), points every process at it,
and the chaos kills it -9, stops it gracefully or freezes it (--broker-share of the
actions, and at least one kill and one freeze). --second-b adds a second process of B
(service_b2) sharing B's work, its Kafka command partitions or its RabbitMQ queue.

The parts: chaos_system.py starts what the run owns (a private MariaDB, the broker, the
orchestrators and services with SAGA_FAULTS=off and short timeouts and leases);
chaos_actions.py is the seeded chaos thread (kills, freezes, graceful restarts, broker
and database restarts) and chaos_faults.py the faults it sets; chaos_clients.py the
clients, which send every request with an Idempotency-Key (one that got no answer, or
a 503, is sent again with it, and must answer about the one saga the key made);
chaos_checks.py the checks at quiet and the sampler that reads every balance of the
run's money tables every 50 ms during the run (never negative, never a total above the
opening).

After the chaos, frozen processes (and the broker) are thawed, dead ones restarted,
faults turned off; the harness waits (bounded) until no saga is RUNNING or COMPENSATING
(in a choreography: and no OUTBOX event is unpublished and no event queued), waits a
grace period for late requests to land, runs the checks, and prints a summary (seed
and replay command, answers by code, outcomes and refusals per type, balances, chaos
actions per process and on the broker, settle time, violations with the SAGA row,
ledger, SAGA_LOG and OUTBOX of the first few sagas involved). No process may exit on
its own or log an ERROR (an unexpected exception, a 500). It exits 1 on any violation,
2 if the harness itself could not run. The run directory (process logs, the chaos
action log, the database) is removed after a clean run and kept, with its path
printed, after a violation (or with --keep).

Against a running system (--url, repeatable, plus --db-* options or the SAGA_DB_*
variables): the harness cannot kill, freeze or restart processes it did not start, nor
restart the database, so its chaos is fault injection through the orchestrator's API
(PUT /faults/<service>, with --token / SAGA_API_TOKEN if set), and its checks cover the
sagas its own Idempotency-Keys made; the types' invariants are checked only if no one
else's saga is running at the end. It turns every fault off at the end.

Replaying a seed repeats the same sequence of chaos actions and client requests; thread
timing is not replayed exactly, so a replay is likely, not certain, to hit a race again.
"""

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict

import mysql.connector

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.append(ROOT)   # the project's own modules: its saga types, queues and partitions

import common  # noqa: E402,F401  (first: the demo's wiring, which registers its saga types)
from chaos_actions import Chaos  # noqa: E402
from chaos_checks import BalanceSampler, Checker, balance_tables  # noqa: E402
from chaos_clients import ORCHESTRATOR, Clients, first_service  # noqa: E402
from chaos_faults import FaultInjector  # noqa: E402
from chaos_system import (Database, deadlocks, describe_run, recover_everything,  # noqa: E402
                          run_as, say, scan_logs, start_owned, uses_broker,
                          wait_events_drained)
from saga.definitions import SAGA_TYPES  # noqa: E402
from saga.model import MODES, TRANSPORTS as ALL_TRANSPORTS  # noqa: E402

TRANSPORTS = tuple(t for t in ALL_TRANSPORTS if t != "rabbitmq")   # the orchestrator's
# The share of chaos actions aimed at the broker: Kafka (Tansu) is back in a fraction of a
# second, RabbitMQ takes 5-8 s to boot, during which no event moves.
BROKER_SHARE = {False: 0.06, True: 0.03}     # by "is it RabbitMQ"
# The unlucky order (issue 18): after a restart of the Kafka broker, which comes back
# empty, kill -9 one or two service processes while the others are still finding the
# topics created anew. The share of broker restarts followed by such kills, by default.
UNLUCKY = {"kafka": 0.5}
MIXED = "mixed"


def run_types(args):
    """The saga types the clients run: the one named, or every registered one (in a
    choreography, every one that declares a choreography)."""
    if args.saga != MIXED:
        return [SAGA_TYPES[args.saga]]
    return [t for t in SAGA_TYPES.values()
            if args.mode != "choreography" or t.choreography is not None]


# --- the command line ---------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Long runs: python chaos.py --sagas 10000 --clients 16 "
                                       "--db-restarts 3; python chaos.py --saga transfer "
                                       "--sagas 3000 --clients 16 --orchestrators 2 "
                                       "--db-restarts 2; python chaos.py --mode choreography "
                                       "--sagas 3000 --second-b --db-restarts 2 --broker-share "
                                       "0.1; python chaos.py --transport kafka --saga transfer "
                                       "--sagas 3000 --clients 16 --orchestrators 2 --second-b "
                                       "--db-restarts 2")
    p.add_argument("--sagas", type=int, default=200, help="saga requests to make (default 200)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--saga", choices=tuple(SAGA_TYPES) + (MIXED,), default=next(iter(SAGA_TYPES)),
                   help=f"the saga type the clients run (default {next(iter(SAGA_TYPES))}), "
                   "or all of them at once")
    p.add_argument("--seed", type=int, default=None, help="seed for the chaos and the inputs "
                   "(default: random, printed)")
    p.add_argument("--mode", choices=MODES, default="orchestration",
                   help="orchestrated sagas (default), or sagas choreographed by the services "
                   "over a private RabbitMQ, started at their first service with an "
                   "Idempotency-Key; no orchestrator runs unless --with-orchestrator")
    p.add_argument("--transport", choices=TRANSPORTS, default="http",
                   help="how the orchestrator calls the services: HTTP (default) or Kafka "
                   "commands through a private Kafka-protocol broker")
    p.add_argument("--with-orchestrator", action="store_true",
                   help="choreography: run the orchestrator(s) too (its recovery must leave "
                   "choreographed sagas alone), and kill and freeze it like the rest")
    p.add_argument("--second-b", action="store_true",
                   help="a second process of service B (service_b2) sharing its work: its "
                   "Kafka command partitions, or its RabbitMQ queue")
    p.add_argument("--broker-share", type=float, default=None,
                   help="with a broker: the share of chaos actions aimed at it (kill -9, "
                   "graceful stop, freeze; default 0.03 for RabbitMQ, whose restart takes "
                   "5-8 s, and 0.06 for Kafka)")
    p.add_argument("--unlucky", type=float, default=None, metavar="P",
                   help="after a broker restart, with probability P, kill -9 one or two "
                   "service processes 0.2-4 s after the broker is back (default 0.5 with "
                   "--transport kafka, else 0)")
    p.add_argument("--orchestrators", type=int, default=1,
                   help="orchestrator processes sharing the database (default 1)")
    p.add_argument("--db-restarts", type=int, default=0,
                   help="restart the database this many times during the run (default 0)")
    p.add_argument("--interval", type=float, default=0.7,
                   help="mean seconds between chaos actions (default 0.7)")
    p.add_argument("--no-chaos", action="store_true", help="no chaos thread (a baseline run)")
    p.add_argument("--allow-failed", action="store_true",
                   help="a FAILED saga is not a violation (it needs an operator), unless its "
                   "type's compensation never gives up (a transfer's refund)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop sending new sagas after this long (default 120 + sagas/2)")
    p.add_argument("--settle-timeout", type=float, default=180,
                   help="longest wait for quiet after the chaos stops (default 180)")
    p.add_argument("--grace", type=float, default=3.5,
                   help="seconds to wait after quiet for late requests to land (default 3.5)")
    p.add_argument("--dump", type=int, default=5, help="sagas to print in full on a violation")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    p.add_argument("-v", "--verbose", action="store_true", help="print every chaos action")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the processes (repeatable)")
    g = p.add_argument_group("against a running system (fault injection only)")
    g.add_argument("--url", action="append", default=[],
                   help="an orchestrator's URL (repeatable); the harness then starts nothing")
    g.add_argument("--db-host", default=os.environ.get("SAGA_DB_HOST", "127.0.0.1"))
    g.add_argument("--db-port", type=int, default=int(os.environ.get("SAGA_DB_PORT", "3306")))
    g.add_argument("--db-user", default=os.environ.get("SAGA_DB_USER", "saga"))
    g.add_argument("--db-password", default=os.environ.get("SAGA_DB_PASSWORD", "saga"))
    g.add_argument("--db-name", default=os.environ.get("SAGA_DB_NAME", "saga_db"))
    g.add_argument("--token", default=os.environ.get("SAGA_API_TOKEN"),
                   help="bearer token for PUT /faults (default $SAGA_API_TOKEN)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10 ** 6)
    if args.url and args.db_restarts:
        p.error("--db-restarts needs the harness to own the database (no --url)")
    if args.url and args.orchestrators != 1:
        p.error("--orchestrators starts processes; with --url, pass --url once per orchestrator")
    if args.sagas < 1 or args.clients < 1 or args.orchestrators < 1 or args.db_restarts < 0:
        p.error("--sagas, --clients and --orchestrators must be at least 1")
    if args.url and (args.mode != "orchestration" or args.transport != "http" or args.second_b):
        p.error("--mode choreography, --transport kafka and --second-b start a broker and "
                "processes: the harness must own the system (no --url)")
    if args.mode == "choreography":
        if not run_types(args) or any(t.choreography is None for t in run_types(args)):
            p.error("--mode choreography runs the saga types that declare one ("
                    + ", ".join(t.name for t in SAGA_TYPES.values() if t.choreography)
                    + f", or {MIXED}); {args.saga} has none")
        if len({first_service(t) for t in run_types(args)}) > 1:
            p.error("a choreography's sagas all start at one service here")
        if args.transport != "http":
            p.error("a choreography travels over RabbitMQ: --transport does not apply")
        if args.orchestrators != 1 and not args.with_orchestrator:
            p.error("--orchestrators needs --with-orchestrator in a choreography")
    elif args.with_orchestrator:
        p.error("--with-orchestrator is for --mode choreography (orchestrated runs have one)")
    if args.second_b and args.mode == "orchestration" and args.transport == "http":
        p.error("--second-b needs --transport kafka or --mode choreography (over HTTP the "
                "orchestrator calls one URL per service)")
    if args.broker_share is None:
        args.broker_share = BROKER_SHARE[args.mode == "choreography"]
    if not 0 <= args.broker_share <= 1:
        p.error("--broker-share must be from 0 to 1")
    if args.unlucky is None:
        args.unlucky = UNLUCKY.get(run_as(args)[1], 0.0) if uses_broker(args) else 0.0
    if not 0 <= args.unlucky <= 1:
        p.error("--unlucky must be from 0 to 1")
    if args.max_seconds is None:
        args.max_seconds = 120 + args.sagas / 2
    return args


def replay_command(args):
    cmd = ["python chaos.py", f"--seed {args.seed}", f"--sagas {args.sagas}",
           f"--clients {args.clients}"]
    if args.saga != next(iter(SAGA_TYPES)):
        cmd.append(f"--saga {args.saga}")
    if args.mode != "orchestration":
        cmd.append(f"--mode {args.mode}")
    if args.transport != "http":
        cmd.append(f"--transport {args.transport}")
    if args.with_orchestrator:
        cmd.append("--with-orchestrator")
    if args.second_b:
        cmd.append("--second-b")
    if uses_broker(args) and args.broker_share != BROKER_SHARE[args.mode == "choreography"]:
        cmd.append(f"--broker-share {args.broker_share}")
    if uses_broker(args) and args.unlucky != UNLUCKY.get(run_as(args)[1], 0.0):
        cmd.append(f"--unlucky {args.unlucky}")
    if args.orchestrators != 1:
        cmd.append(f"--orchestrators {args.orchestrators}")
    if args.db_restarts:
        cmd.append(f"--db-restarts {args.db_restarts}")
    if args.interval != 0.7:
        cmd.append(f"--interval {args.interval}")
    if args.allow_failed:
        cmd.append("--allow-failed")
    if args.no_chaos:
        cmd.append("--no-chaos")
    for e in args.env:
        cmd.append(f"--env {e}")
    for u in args.url:
        cmd.append(f"--url {u}")
    return " ".join(cmd)


# --- the run ------------------------------------------------------------------------------

def wait_quiet(checker, timeout):
    """Until no saga is running or compensating (and, in a choreography, no event waits
    in OUTBOX); returns (seconds waited, what was still busy at the end)."""
    began = time.monotonic()
    last = None
    while True:
        try:
            last = checker.busy_count()
            if last == 0:
                return time.monotonic() - began, 0
        except mysql.connector.Error:
            pass
        if time.monotonic() - began > timeout:
            return time.monotonic() - began, last
        time.sleep(0.25)


def summarize(args, clients, chaos, checker, outcomes, timing, stuck, extra_notes,
              sampler=None):
    codes = Counter("no answer" if a.code is None else str(a.code) for a in clients.answers)
    codes_by_type = defaultdict(Counter)
    for a in clients.answers:
        codes_by_type[a.kind]["no answer" if a.code is None else str(a.code)] += 1
    balances = {table: {**figures, **(sampler.figures(table) if sampler else {})}
                for table, figures in checker.balances.items()}
    per_process = {name: dict(c) for name, c in sorted(chaos.counts.items())} if chaos else {}
    db_restarts = chaos.db_restarts if chaos else []
    broker = None
    if uses_broker(args):
        acted = chaos.counts.get(chaos.broker_name, {}) if chaos else {}
        broker = {"kind": "rabbitmq" if args.mode == "choreography" else "kafka",
                  "kills": acted.get("kill", 0), "stops": acted.get("stop", 0),
                  "freezes": acted.get("freeze", 0),
                  "restarts": chaos.broker_restarts if chaos else [],
                  "followed_by_service_kills": chaos.unlucky_rounds if chaos else 0}
    mode, transport = run_as(args)
    summary = {
        "seed": args.seed,
        "saga": args.saga,
        "saga_types": [t.name for t in run_types(args)],
        "mode": mode,
        "transport": transport,
        "run": describe_run(args),
        "orchestrator_running": args.mode != "choreography" or args.with_orchestrator,
        "second_b": args.second_b,
        "broker": broker,
        "broker_kills": broker["kills"] if broker else 0,
        "replay": replay_command(args),
        "sagas_requested": args.sagas,
        "sagas_sent": clients.sent(),
        "stopped_early": clients.stopped_early,
        "sagas_in_db": sum(outcomes.values()),
        "answers": dict(sorted(codes.items())),
        "answers_by_type": {k: dict(sorted(c.items())) for k, c in sorted(codes_by_type.items())},
        "repeated_answers": sum(1 for a in clients.answers if a.repeated),
        "retried": dict(clients.retried),
        "gave_up": clients.gave_up,
        "no_answer": len([a for a in clients.answers if a.code is None]),
        "no_answer_saga_exists": extra_notes.get("no_answer_exists", 0),
        "no_answer_kinds": dict(Counter((a.error or "").split(":")[0] for a in clients.answers
                                        if a.code is None)),
        "completed": outcomes.get("COMPLETED", 0),
        "compensated": outcomes.get("COMPENSATED", 0),
        "failed": outcomes.get("FAILED", 0),
        "stuck": stuck,
        "outcomes_by_type": {k: dict(c) for k, c in sorted(checker.outcomes_by_type.items())},
        "refusals_by_type": {k: dict(c.most_common())
                             for k, c in sorted(checker.refusals_by_type.items())},
        "invariants_checked": checker.invariants_checked,
        "balances": balances,
        "sampler": {"reads": sampler.reads, "failed_reads": sampler.failed_reads}
        if sampler else None,
        "chaos": per_process,
        "db_restarts": db_restarts,
        "db_restarts_requested": args.db_restarts,
        "unexpected_exits": chaos.unexpected_exits if chaos else [],
        "coverage_left": chaos.coverage if chaos else [],
        "covered_after": round(chaos.covered_at, 1) if chaos and chaos.covered_at else None,
        "timing": timing,
        "violations": checker.violations,
        "notes": extra_notes.get("notes", []),
    }
    say("")
    say(f"===== chaos summary (seed {args.seed}) =====")
    say(f"replay:      {summary['replay']}")
    say(f"run:         {args.saga} sagas, {summary['run']}")
    say(f"sagas:       {args.sagas} requested, {summary['sagas_sent']} sent"
        f"{' (stopped at --max-seconds)' if clients.stopped_early else ''}, "
        f"{summary['sagas_in_db']} in the database")
    say("answers:     " + "  ".join(f"{k}: {v}" for k, v in summary["answers"].items())
        + f"   (retried: {dict(clients.retried) or 'none'}; gave up: {clients.gave_up}; "
        f"repeated-key answers {summary['repeated_answers']})")
    say(f"no answer:   {summary['no_answer']} (of which {summary['no_answer_saga_exists']} "
        f"sagas were made anyway; all checked like the rest) {summary['no_answer_kinds'] or ''}")
    say(f"outcomes:    completed {summary['completed']}  compensated {summary['compensated']}  "
        f"failed {summary['failed']}  stuck {stuck}")
    for kind, c in summary["outcomes_by_type"].items():
        refused = summary["refusals_by_type"].get(kind)
        say(f"  {kind:<13} " + "  ".join(f"{k.lower()} {v}" for k, v in sorted(c.items()))
            + "   answers " + "  ".join(f"{k}: {v}" for k, v in
                                       summary["answers_by_type"].get(kind, {}).items())
            + (("   refused: " + "; ".join(f"{k} {v}" for k, v in refused.items()))
               if refused else ""))
    for table, b in balances.items():
        say(f"balances:    {table} " + "  ".join(f"{r} {v}" for r, v in b["balances"].items())
            + f"  total {b['total']} (opening {b['opening_total']})"
            + ("; lowest seen " + "  ".join(f"{r} {v}" for r, v in b["min_balance_seen"].items())
               + f", total seen {b['min_total_seen']}..{b['max_total_seen']}"
               if "min_balance_seen" in b else ""))
    if sampler:
        say(f"sampler:     {sampler.reads} reads of every balance "
            f"({sampler.failed_reads} failed while the database was away)")
    if chaos:
        for name, c in per_process.items():
            say(f"chaos:       {name:<14} " + "  ".join(f"{k} {v}" for k, v in sorted(c.items())))
        if chaos.system is None:
            say("chaos:       fault injection only (--url: the harness owns no process)")
        else:
            say(f"database:    {len(db_restarts)} of {args.db_restarts} restart(s) "
                + ", ".join(f"{m} (down {d}s, back after {t}s)" for m, d, t in db_restarts))
        if broker:
            back = [t for _, _, t in broker["restarts"]]
            say(f"broker:      {broker['kind']} killed -9 {broker['kills']}, stopped "
                f"{broker['stops']}, frozen {broker['freezes']} time(s)"
                + (f"; serving again {min(back):.1f}-{max(back):.1f}s after each"
                   if back else "")
                + (f"; {broker['followed_by_service_kills']} restart(s) followed by kill -9 "
                   "of service processes" if broker["followed_by_service_kills"] else ""))
        if chaos.unexpected_exits:
            say(f"exits:       processes that died on their own: {chaos.unexpected_exits}")
    if summary["covered_after"] is not None:
        say(f"coverage:    every process{' and the broker' if broker else ''} killed and "
            f"frozen, every service given a fault, after {summary['covered_after']}s")
    say(f"timing:      chaos phase {timing['chaos_phase']:.1f}s, recovery (thaw/restart) "
        f"{timing['recover']:.1f}s, settle to quiet {timing['settle']:.1f}s "
        f"(from chaos stop), total {timing['total']:.1f}s")
    for note in summary["notes"]:
        say(f"note:        {note}")
    say(f"violations:  {len(checker.violations)}")
    for v in checker.violations[:100]:
        say(f"  - {v}")
    if len(checker.violations) > 100:
        say(f"  ... and {len(checker.violations) - 100} more")
    return summary


def settle(args, checker, broker, env):
    """Wait for quiet, then for late requests and redelivered events; returns (seconds
    to the first quiet, sagas still active at the end)."""
    waited, stuck = wait_quiet(checker, args.settle_timeout)
    if not stuck:
        # Late requests (a hang fault sleeps past the read timeout) land now or never.
        time.sleep(args.grace)
        _, stuck = wait_quiet(checker, args.settle_timeout)
    if not stuck and args.mode == "choreography":
        # Events handed out again after a broker restart are taken as repeats; none
        # may be left waiting (nor change anything: the checks come after).
        queued = wait_events_drained(broker, env, args.settle_timeout / 3)
        for queue, ready in queued.items():
            checker.violation(f"events still queued at quiet: {queue}: {ready}")
        wait_quiet(checker, args.settle_timeout)
    return waited, checker.active_count()


def post_mortem(args, chaos, checker, server, system, answers, notes):
    """What the processes, the chaos thread and the database server say about the run."""
    if chaos:
        for err in chaos.errors:
            checker.violations.append("harness: " + err.strip().splitlines()[-1])
        for name, rc in chaos.unexpected_exits:
            checker.violation(f"process {name} exited on its own (exit code {rc})")
        if len(chaos.db_restarts) < args.db_restarts:
            notes.append(f"only {len(chaos.db_restarts)} of {args.db_restarts} database "
                         "restarts happened (the run ended first)")
        if chaos.coverage:
            notes.append("not every process was killed and frozen, nor every service given "
                         f"a fault; left: {chaos.coverage}")
        odd = [a for a in answers if a.code == 503 and not chaos.db_was_down(a.at)]
        if odd:
            kinds = Counter(re.sub(r"\d{3,}", "N", a.error or "")[:160] for a in odd)
            notes.append(f"{len(odd)} answer(s) 503 while the database was up (retried): "
                         + "; ".join(f"{n}x {k}" for k, n in kinds.most_common(4)))
    if server:
        locks = deadlocks(server)
        if locks:
            notes.append(f"{len(locks)} deadlock(s) in the database (see {server.log_path}): "
                         + "; ".join(f"{n}x {k}" for k, n in Counter(locks).most_common(3)))
    if system:
        app_errors, server_errors = scan_logs(system.logdir)
        for line in app_errors[:20]:
            checker.violation(f"error logged: {line}")
        if len(app_errors) > 20:
            checker.violation(f"... and {len(app_errors) - 20} more errors logged")
        if server_errors:
            notes.append("gunicorn errors: " + "; ".join(
                f"{n}x {text}" for text, n in server_errors.most_common(5)))


def main(argv=None):
    argv = argv if argv is not None else sys.argv[1:]
    if argv[:1] == ["--cluster"]:
        # The whole topology (HAProxy, two of each process, the database pair, three
        # RabbitMQ nodes), its nodes killed in turn: tools/cluster.py's chaos.
        import cluster
        return cluster.main(["chaos", *argv[1:]])
    args = parse_args(argv)
    say(f"chaos seed {args.seed}  (replay: {replay_command(args)})")
    rng = random.Random(args.seed)
    tag = f"chaos{args.seed}-{uuid.uuid4().hex[:6]}"
    owned = not args.url
    rundir = tempfile.mkdtemp(prefix=f"saga-chaos-{args.seed}-")
    keep = args.keep
    server = broker = system = chaos = sampler = None
    env = {}
    types = run_types(args)
    began = time.monotonic()
    try:
        if owned:
            server, broker, system, db, env = start_owned(args, rundir)
            # A choreography starts at its first step's service; the rest at the
            # orchestrators.
            if args.mode == "choreography":
                urls = {first_service(t): [system.url(system.instances(first_service(t))[0])]
                        for t in types}
            else:
                urls = {ORCHESTRATOR: [system.url(n) for n in system.orchestrators]}
            client_timeout = float(env["SAGA_START_WAIT"]) + 30
        else:
            urls = {ORCHESTRATOR: [u.rstrip("/") for u in args.url]}
            db = Database(args.db_host, args.db_port, args.db_user, args.db_password, args.db_name)
            db.query("SELECT 1")
            client_timeout = 90
            FaultInjector(None, urls[ORCHESTRATOR][0], args.token).all_off()   # fails early
        clients = Clients(urls, types, args.mode == "choreography", args.sagas, args.clients,
                          args.seed, tag, client_timeout, time.monotonic() + args.max_seconds,
                          retry_for=120)
        checker = Checker(db, SAGA_TYPES, clients.key_prefix(), shared=not owned,
                          allow_failed=args.allow_failed, run_as=run_as(args) if owned else None)
        money_tables = balance_tables(db, types)
        if money_tables:
            sampler = BalanceSampler(db, money_tables, owned)
            sampler.start()
        actions_log = open(os.path.join(rundir, "chaos-actions.log"), "w")
        if not args.no_chaos:
            chaos = Chaos(args, rng, system, server, clients, actions_log, broker)
            clients.more = chaos.unfinished
        say(f"running {args.sagas} {args.saga} sagas from {args.clients} clients, "
            + (describe_run(args) if owned else f"over {len(args.url)} orchestrator(s)")
            + f"{'' if chaos else ', without chaos'}"
            + (f"; sampling {', '.join(money_tables)} every 50 ms" if sampler else ""))
        chaos_began = time.monotonic()
        clients.start()
        if chaos:
            chaos.start()
        last_print = time.monotonic()
        while clients.running():
            time.sleep(0.2)
            if time.monotonic() - last_print >= 5:
                last_print = time.monotonic()
                say(f"  [{last_print - chaos_began:6.1f}s] {clients.finished}/{args.sagas} done, "
                    f"{len(clients.answers)} answers"
                    + (f", {sum(sum(c.values()) for c in chaos.counts.values())} chaos actions"
                       if chaos else "")
                    + (f", {sampler.reads} balance reads" if sampler else ""))
        stopped = time.monotonic()
        if chaos:
            chaos.stop_event.set()
            chaos.join(30)
            chaos.finish_database()
            chaos.finish_broker()
        recover_began = time.monotonic()
        if system:
            recover_everything(system, chaos)
        FaultInjector(system, urls.get(ORCHESTRATOR, [None])[0], args.token).all_off()
        recovered = time.monotonic()
        _, stuck = settle(args, checker, broker, env)
        settle_total = time.monotonic() - stopped
        if sampler:
            sampler.stop()
            checker.violations.extend(sampler.violations)
            for err in sampler.errors:
                checker.violations.append("harness: sampler: " + err.strip().splitlines()[-1])
        answers = list(clients.answers)
        outcomes = checker.check(answers, money_tables)
        notes = {"notes": list(checker.notes)}
        post_mortem(args, chaos, checker, server, system, answers, notes["notes"])
        keys = {a.key for a in answers if a.code is None}
        if keys:
            notes["no_answer_exists"] = len(keys & set(checker.key_sagas()))
        timing = {"chaos_phase": stopped - chaos_began, "recover": recovered - recover_began,
                  "settle": settle_total, "total": time.monotonic() - began}
        summary = summarize(args, clients, chaos, checker, outcomes, timing, stuck, notes,
                            sampler)
        if checker.suspects and args.dump:
            say("")
            say(f"first {min(args.dump, len(checker.suspects))} saga(s) involved:")
            for sid in checker.suspects[:args.dump]:
                say(f"saga {sid}")
                say(checker.dump(sid))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2, default=str)
        failed = bool(checker.violations)
        if failed:
            keep = True
        return 1 if failed else 0
    except KeyboardInterrupt:
        keep = True
        say("interrupted")
        return 2
    except Exception:
        keep = True
        say("harness error:\n" + traceback.format_exc())
        return 2
    finally:
        stop_everything(chaos, sampler, system, broker, server)
        if keep:
            say(f"run directory kept: {rundir} "
                f"({'logs/, chaos-actions.log, mariadb/' if owned else 'chaos-actions.log'}"
                f"{', broker/' if broker else ''})")
        else:
            shutil.rmtree(rundir, ignore_errors=True)


def stop_everything(chaos, sampler, system, broker, server):
    """Whatever happened: the threads told to stop, the processes, broker and database
    server stopped."""
    if chaos:
        chaos.stop_event.set()
    if sampler:
        sampler.stop_event.set()
    if system:
        try:
            system.stop()
        except Exception:
            pass
    for process in (broker, server):   # stopped gracefully, or else killed
        if process is None:
            continue
        try:
            process.stop()
        except Exception:
            try:
                process.kill()
            except Exception:
                pass


if __name__ == "__main__":
    sys.exit(main())
