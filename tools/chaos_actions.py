"""The chaos itself: a seeded thread that, at random moments, kills (-9), freezes
(SIGSTOP) or stops (SIGTERM) a process and starts it again, sets a fault on a service
for a while (chaos_faults), kills, stops or freezes the run's broker, and restarts the
database --db-restarts times over the run. Every process is killed and frozen, and
every service given a fault, at least once if the run lasts long enough."""

import heapq
import json
import os
import queue
import random
import signal
import threading
import time
import traceback
from collections import Counter, defaultdict

from brokers import list_descendants
from chaos_faults import ACTIONS, FAULT_MODES, TRIGGERS, FaultInjector, make_fault
from chaos_system import SERVICES, log_deadlocks, say


class Chaos(threading.Thread):
    """Seeded chaos: one action every --interval seconds on average, plus the timed
    events that undo them (restart, thaw, fault off). Each tick draws the same random
    numbers whatever the outcome, so a seed replays the same sequence of actions."""

    def __init__(self, args, rng, system, server, clients, actions_log, broker=None):
        super().__init__(name="chaos", daemon=True)
        self.args, self.rng, self.system, self.server = args, rng, system, server
        # The run's message broker (RabbitMQ for a choreography, Kafka for that
        # transport), killed, stopped and frozen like a process, under its kind's name.
        self.broker = broker
        self.broker_name = broker.kind if broker else None
        self.broker_thread = None
        self.broker_freezes = 0
        self.broker_frozen = False
        self.broker_restarts = []            # (how, downtime, seconds to serve again)
        self.broker_windows = []             # (down, up) in time.monotonic()
        self.clients, self.actions_log = clients, actions_log
        self.stop_event = threading.Event()
        self.events = []                     # heap of (due, seq, kind, name, generation)
        self.seq = 0
        self.dead = set()                    # killed or stopped by us, restart pending
        self.fault_generation = Counter()
        self.freezes = Counter()             # which freeze a thaw event belongs to
        self.counts = defaultdict(Counter)   # counts[target][action]
        self.unexpected_exits = []
        self.db_restarts = []                # (mode, downtime, seconds to accept again)
        self.db_windows = []                 # (down, up) in time.monotonic()
        self.db_thread = None
        self.db_rng = random.Random(f"{args.seed}-db")
        # The unlucky kills after a broker restart draw from their own generator, so the
        # seeds of runs without them replay as before. Planned in the broker's thread,
        # scheduled by the chaos thread (the event heap is the chaos thread's own).
        self.unlucky_rng = random.Random(f"{args.seed}-unlucky")
        self.unlucky_planned = queue.SimpleQueue()
        self.unlucky_rounds = 0
        self.faults = FaultInjector(system, args.url[0] if args.url else None, args.token)
        self.db_thresholds = [(j + 1) * args.sagas / (args.db_restarts + 1)
                              for j in range(args.db_restarts)]
        self.errors = []
        self.started = time.monotonic()
        self.covered_at = None               # seconds into the run when coverage was done
        names = system.names if system else []
        self.coverage = [(a, n) for n in names for a in ("kill", "freeze")]
        if system:
            self.coverage += [("fault", svc) for svc in SERVICES]
        if broker:
            self.coverage += [("kill", self.broker_name), ("freeze", self.broker_name)]
        self.rng.shuffle(self.coverage)

    # -- bookkeeping

    def note(self, text):
        now = time.time()
        clock = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
        line = f"{clock} {time.monotonic() - self.started:8.2f}s {text}"
        self.actions_log.write(line + "\n")
        self.actions_log.flush()
        if self.args.verbose:
            say("  chaos:", text)

    def schedule(self, delay, kind, name, generation=0):
        self.seq += 1
        heapq.heappush(self.events, (time.monotonic() + delay, self.seq, kind, name, generation))

    # -- the loop

    def run(self):
        next_action = time.monotonic() + self.rng.uniform(0.2, 1.0) * self.args.interval
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                while not self.unlucky_planned.empty():
                    delay, name, restart_in = self.unlucky_planned.get()
                    # The event's last field, a generation elsewhere, is its restart delay.
                    self.schedule(delay, "unlucky_kill", name, restart_in)
                self.run_due_events(now)
                self.maybe_restart_database()
                if now >= next_action:
                    self.act(self.draw())
                    next_action = now + self.rng.uniform(0.3, 1.7) * self.args.interval
                self.stop_event.wait(0.05)
        except Exception:
            self.errors.append(traceback.format_exc())
            say("chaos thread crashed:\n" + traceback.format_exc())

    def draw(self):
        """One action, drawn with a fixed number of random numbers."""
        r = self.rng.random()
        names = self.system.names if self.system else []
        target = self.rng.choice(names) if names else None
        svc = self.rng.choice(tuple(SERVICES))
        mode = self.rng.choice(FAULT_MODES)
        trigger = self.rng.choice(TRIGGERS)
        every = self.rng.randint(2, 5)
        rate = round(self.rng.uniform(0.1, 0.5), 2)
        nxt = self.rng.randint(1, 5)
        on = self.rng.choices(ACTIONS, (0.6, 0.2, 0.2))[0]
        seconds = round(self.rng.uniform(1.5, 3.0), 2)
        delay = self.rng.uniform(0.1, 2.0)
        freeze_for = self.rng.uniform(0.5, 3.0)
        fault_for = self.rng.uniform(1.0, 6.0)
        take_coverage = self.rng.random() < 0.7
        # Drawn only when there is a broker, so the seeds of runs without one replay
        # as before.
        broker_roll = self.rng.random() if self.broker else 1.0
        broker_how = self.rng.choices(("kill", "stop"), (0.8, 0.2))[0] if self.broker else None
        broker_down = self.rng.uniform(0.5, 3.0) if self.broker else 0.0
        covering = False
        if self.system is None:
            kind = "fault"
        elif take_coverage and self.coverage:
            kind, target = self.coverage.pop()
            covering = True
            if kind == "fault":
                svc = target
        elif broker_roll < self.args.broker_share:
            # Mostly a kill or a graceful stop, now and then a freeze.
            kind = "freeze" if broker_roll < self.args.broker_share / 4 else broker_how
            target = self.broker_name
        elif r < 0.30:
            kind = "kill"
        elif r < 0.55:
            kind = "freeze"
        elif r < 0.65:
            kind = "term"
        else:
            kind = "fault"
        fault = make_fault(mode, trigger, every, rate, nxt, on, seconds)
        return {"kind": kind, "target": target, "svc": svc, "fault": fault, "delay": delay,
                "freeze_for": freeze_for, "fault_for": fault_for, "covering": covering,
                "broker_down": broker_down}

    def act(self, a):
        if not self._act(a) and a["covering"]:
            # A covering action that cannot be done now (its target is down or frozen)
            # goes back on the list, behind the others, to be tried again later.
            self.coverage.insert(0, (a["kind"], a["target"]))
        elif a["covering"] and not self.coverage and self.covered_at is None:
            self.covered_at = time.monotonic() - self.started
            self.note("every process killed and frozen, every service given a fault")

    def _act(self, a):
        kind, name = a["kind"], a["target"]
        s = self.system
        if kind == "fault":
            return self.set_fault(a["svc"], a["fault"], a["fault_for"])
        if name == self.broker_name:
            return self.act_on_broker(kind, a["broker_down"], a["freeze_for"])
        if name in self.dead or not s.alive(name):
            return self.note(f"skip {kind} {name}: it is down")
        if name in s.frozen and kind != "kill":
            return self.note(f"skip {kind} {name}: it is frozen")
        if kind == "kill":
            s.kill(name)
            self.dead.add(name)
            self.counts[name]["kill"] += 1
            self.note(f"kill -9 {name}; restart in {a['delay']:.2f}s")
            self.schedule(a["delay"], "restart", name)
        elif kind == "freeze":
            s.freeze(name)
            self.counts[name]["freeze"] += 1
            self.freezes[name] += 1
            self.note(f"SIGSTOP {name} for {a['freeze_for']:.2f}s")
            self.schedule(a["freeze_for"], "thaw", name, self.freezes[name])
        elif kind == "term":
            # Like `kill <pid>`: the server's master stops its workers gracefully.
            os.kill(s.procs[name].pid, signal.SIGTERM)
            self.dead.add(name)
            self.counts[name]["term"] += 1
            self.note(f"SIGTERM {name}; start again in 4s (kill -9 if still running)")
            self.schedule(4.0, "restart", name)
        return True

    def run_due_events(self, now):
        while self.events and self.events[0][0] <= now:
            _, _, kind, name, generation = heapq.heappop(self.events)
            if kind == "thaw" and name == self.broker_name:
                if self.broker_frozen and self.broker_freezes == generation:
                    self.signal_broker(signal.SIGCONT)
                    self.broker_frozen = False
                    self.note(f"SIGCONT {name}")
            elif kind == "thaw":
                if (name in self.system.frozen and self.freezes[name] == generation
                        and self.system.alive(name)):
                    self.system.thaw(name)
                    self.note(f"SIGCONT {name}")
            elif kind == "restart":
                self.restart(name)
            elif kind == "unlucky_kill":
                self.unlucky_kill(name, generation)
            elif kind == "fault_off":
                if self.fault_generation[name] == generation:
                    _, missed = self.faults.put(name, {"mode": "off"}, self.dead)
                    if missed:
                        # Frozen (or too busy to answer): its fault would last to the end
                        # of the run; try again shortly.
                        self.note(f"fault off on {name}: {missed} not reachable, again in 0.5s")
                        self.schedule(0.5, "fault_off", name, generation)
                    else:
                        self.note(f"fault off on {name}")

    def unlucky_kill(self, name, restart_in):
        s = self.system
        if name in self.dead or not s.alive(name):
            return self.note(f"skip kill -9 {name} after the broker's return: it is down")
        s.kill(name)
        self.dead.add(name)
        self.counts[name]["kill after broker"] += 1
        self.note(f"kill -9 {name} (after the broker's return); restart in {restart_in:.2f}s")
        self.schedule(restart_in, "restart", name)

    def restart(self, name):
        s = self.system
        if s.alive(name):
            s.kill(name)
            self.counts[name]["term forced to kill"] += 1
            self.note(f"{name} still running after SIGTERM: kill -9")
        s.spawn(name)
        self.dead.discard(name)
        self.counts[name]["start"] += 1
        self.note(f"start {name}")

    def check_processes(self):
        """Processes that died without us: a process must never exit on its own."""
        if self.system is None:
            return
        if self.broker and not self.broker_busy() and not self.broker.alive():
            rc = self.broker.proc.returncode if self.broker.proc else None
            self.unexpected_exits.append((self.broker_name, rc))
            self.note(f"{self.broker_name} exited on its own with {rc}; starting it again")
            self.broker_thread = threading.Thread(target=self.restart_broker,
                                                  args=("start", 0.0), daemon=True)
            self.broker_thread.start()
        for name in self.system.names:
            if name not in self.dead and name in self.system.procs and not self.system.alive(name):
                rc = self.system.procs[name].returncode
                self.unexpected_exits.append((name, rc))
                self.note(f"{name} exited on its own with {rc}; starting it again in 1s")
                self.dead.add(name)
                self.schedule(1.0, "restart", name)

    # -- faults

    def set_fault(self, svc, fault, lifetime):
        took, _ = self.faults.put(svc, fault, self.dead)
        if took:
            self.fault_generation[svc] += 1
            self.counts[f"service_{svc.lower()}"]["fault"] += 1
            where = "" if took == [SERVICES[svc]] or self.system is None else f" ({', '.join(took)})"
            self.note(f"fault on {svc}{where}: {json.dumps(fault)} for {lifetime:.2f}s")
            self.schedule(lifetime, "fault_off", svc, self.fault_generation[svc])
            return True
        self.note(f"skip fault on {svc}: {json.dumps(fault)} (service not reachable)")
        return False

    # -- the broker

    def broker_busy(self):
        return bool(self.broker_thread and self.broker_thread.is_alive())

    def act_on_broker(self, kind, downtime, freeze_for):
        name = self.broker_name
        if self.broker_busy() or not self.broker.alive():
            return self.note(f"skip {kind} {name}: it is down")
        if self.broker_frozen and kind != "kill":
            return self.note(f"skip {kind} {name}: it is frozen")
        if kind == "freeze":
            self.signal_broker(signal.SIGSTOP)
            self.broker_frozen = True
            self.broker_freezes += 1
            self.counts[name]["freeze"] += 1
            self.note(f"SIGSTOP {name} for {freeze_for:.2f}s")
            self.schedule(freeze_for, "thaw", name, self.broker_freezes)
            return True
        self.broker_frozen = False
        self.counts[name][kind] += 1
        self.broker_thread = threading.Thread(target=self.restart_broker, args=(kind, downtime),
                                              name="broker-restart", daemon=True)
        self.broker_thread.start()
        return True

    def signal_broker(self, sig):
        """The broker's process group and every descendant (some call setsid)."""
        pid = self.broker.proc.pid
        for child in [pid] + list_descendants(pid):
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass

    def restart_broker(self, how, downtime):
        """kill -9 (or stop gracefully) the broker, wait `downtime`, start it again on
        its port; a RabbitMQ node keeps its durable queues, a memory-only Kafka broker
        comes back empty."""
        name = self.broker_name
        try:
            began = time.monotonic()
            if how != "start":
                self.note(f"{name}: {'kill -9' if how == 'kill' else 'stop'}, start again "
                          f"{downtime:.2f}s later")
                self.broker_windows.append((began, None))
                self.broker.kill() if how == "kill" else self.broker.stop()
                time.sleep(downtime)
            for attempt in range(1, 4):
                try:
                    self.broker.start()
                    break
                except RuntimeError:
                    if attempt == 3:
                        raise
                    self.note(f"{name} did not start (attempt {attempt}); trying again")
                    time.sleep(1)
            took = time.monotonic() - began
            if how != "start":
                self.broker_windows[-1] = (began, time.monotonic())
                self.broker_restarts.append((how, round(downtime, 2), round(took, 2)))
            self.counts[name]["start"] += 1
            self.note(f"{name} serving again ({took:.2f}s after {how})")
            if how != "start":
                self.plan_unlucky_kills()
        except Exception:
            self.errors.append(f"{name} restart failed:\n" + traceback.format_exc())
            self.note(f"{name} restart failed")

    def plan_unlucky_kills(self):
        """With probability --unlucky, one or two service processes to kill -9 in the
        seconds after the broker is back (a fixed number of draws each time)."""
        rng, services = self.unlucky_rng, [n for n in self.system.names
                                           if n.startswith("service_")]
        roll, count = rng.random(), rng.choice((1, 2))
        victims = rng.sample(services, min(count, len(services)))
        plans = [(rng.uniform(0.2, 4.0), name, rng.uniform(0.1, 2.0)) for name in victims]
        if roll >= self.args.unlucky:
            return
        self.unlucky_rounds += 1
        self.note("after the broker's return: kill -9 " + ", ".join(
            f"{name} in {delay:.2f}s" for delay, name, _ in plans))
        for plan in plans:
            self.unlucky_planned.put(plan)

    def finish_broker(self):
        """After the chaos: the broker thawed, and running."""
        if self.broker is None:
            return
        if self.broker_thread:
            self.broker_thread.join(120)
        if self.broker_frozen:
            self.signal_broker(signal.SIGCONT)
            self.broker_frozen = False
        if not self.broker.alive():
            self.unexpected_exits.append((self.broker_name, self.broker.proc.returncode))
            self.broker.start()

    def broker_was_down(self, at, margin=5.0):
        return any(down - 0.5 <= at <= (up or float("inf")) + margin
                   for down, up in self.broker_windows)

    # -- the database

    def unfinished(self):
        """Whether some promised chaos has not happened yet: a process not yet killed or
        frozen, a service without a fault, a database restart still to come."""
        return bool(self.coverage or self.db_thresholds
                    or (self.db_thread and self.db_thread.is_alive()) or self.broker_busy())

    def maybe_restart_database(self):
        self.check_processes()
        if not self.db_thresholds or (self.db_thread and self.db_thread.is_alive()):
            return
        if self.clients.finished >= self.db_thresholds[0]:
            self.db_thresholds.pop(0)
            mode = self.db_rng.choice(("stop", "kill"))
            downtime = self.db_rng.uniform(0.5, 3.0)
            self.db_thread = threading.Thread(target=self.restart_database, args=(mode, downtime),
                                              name="db-restart", daemon=True)
            self.db_thread.start()

    def restart_database(self, mode, downtime):
        try:
            self.note(f"database: {'kill -9' if mode == 'kill' else 'stop'}, "
                      f"start again {downtime:.2f}s later")
            began = time.monotonic()
            self.db_windows.append((began, None))
            self.server.kill() if mode == "kill" else self.server.stop()
            time.sleep(downtime)
            self.server.start()
            log_deadlocks(self.server)
            took = time.monotonic() - began
            self.db_windows[-1] = (began, time.monotonic())
            self.db_restarts.append((mode, round(downtime, 2), round(took, 2)))
            self.note(f"database accepting connections again ({took:.2f}s after {mode})")
        except Exception:
            self.errors.append("database restart failed:\n" + traceback.format_exc())
            self.note("database restart failed")

    def db_was_down(self, at, margin=5.0):
        """Whether `at` falls in a database outage (or the seconds after it, while pools
        reconnect)."""
        return any(down - 0.5 <= at <= (up or float("inf")) + margin
                   for down, up in self.db_windows)

    def finish_database(self):
        if self.db_thread:
            self.db_thread.join(120)
