"""Failure simulation at the services: what a fault setting is, how it is validated, and
the shared counter that decides which call it strikes. The same settings apply to a call
whether it arrives over HTTP, as a Kafka command or as a RabbitMQ event."""

import json
import logging
import mmap
import multiprocessing
import os
import random
import time

from saga.validation import ApiError, reject_unknown_fields

log = logging.getLogger("saga")


class FaultMode:
    """One way a service misbehaves on purpose, the same whatever carried the call.
    `before` runs before the call's transaction and says whether to go on, fail (500:
    nothing written, worth a retry) or refuse (a business "no", recorded like a real
    one); `after_commit` runs once the work is committed and its answer decided, and
    asks the carrier (an HTTP connection, a Kafka command, a RabbitMQ delivery) to
    crash or to drop the answer, so the caller never hears it."""
    name = "off"
    description = "no injected fault"
    strikes = None        # "before" the transaction, "after" its commit, or None
    commits = True        # whether the call's work is written

    def before(self, fault: dict, read_timeout: float) -> str:
        return GO_ON

    def after_commit(self, carrier: "Carrier") -> None:
        pass

    def __repr__(self):
        return f"<fault {self.name}>"


GO_ON, FAIL, REFUSE = "go on", "fail", "refuse"


class Fail(FaultMode):
    name, strikes, commits = "fail", "before", False
    description = "answers 500 before its transaction; the orchestrator retries"

    def before(self, fault, read_timeout):
        return FAIL


class Reject(FaultMode):
    name, strikes, commits = "reject", "before", False
    description = "answers 422, a business “no”; not retried, the saga compensates"

    def before(self, fault, read_timeout):
        return REFUSE


class Stall(FaultMode):
    """Sleeps before the transaction for `seconds`, or its default, then carries on."""
    strikes = "before"

    def __init__(self, name: str, description: str, default):
        self.name, self.description, self.default = name, description, default

    def before(self, fault, read_timeout):
        time.sleep(fault.get("seconds", self.default(read_timeout)))
        return GO_ON


class Drop(FaultMode):
    name, strikes = "drop", "after"
    description = "commits, then drops the connection; the caller never hears"

    def after_commit(self, carrier):
        log.warning("injected drop after commit: the answer is not sent")
        carrier.drop()


class Crash(FaultMode):
    name, strikes = "crash", "after"
    description = "commits, then its worker process exits (and is restarted)"

    def after_commit(self, carrier):
        log.warning("injected crash after commit: exiting")
        carrier.crash()


class Carrier:
    """What carried a call, as an after-commit fault sees it."""

    def crash(self) -> None:
        os._exit(1)

    def drop(self) -> None:
        raise NotImplementedError


OFF = FaultMode()
MODES = {mode.name: mode for mode in (
    OFF, Fail(), Reject(), Drop(), Crash(),
    Stall("hang", "sleeps past the orchestrator's read timeout (seconds)",
          lambda read_timeout: read_timeout * 2),
    Stall("slow", "sleeps a little before answering (seconds)", lambda read_timeout: 0.2))}
FAULT_MODES = tuple(MODES)
FAULT_TARGETS = ("invoke", "compensate", "both")
FAULT_FIELDS = ("mode", "every", "rate", "next", "seconds", "on")

# The demo's failure pattern: A fails every 2nd call before its transaction, B dies
# after committing every 2nd call, so repeating one curl shows retries at work.
SEED_FAULTS = {"A": {"mode": "fail", "every": 2}, "B": {"mode": "crash", "every": 2}}


def parse_fault(body) -> dict:
    """A validated, normalized fault setting, or ApiError naming the field."""
    if not isinstance(body, dict):
        raise ApiError("fault setting must be a JSON object")
    reject_unknown_fields(body, FAULT_FIELDS)
    mode = body.get("mode", "off")
    if mode not in FAULT_MODES:
        raise ApiError(f"mode must be one of {', '.join(FAULT_MODES)}", "mode")
    on = body.get("on", "invoke")
    if on not in FAULT_TARGETS:
        raise ApiError(f"on must be one of {', '.join(FAULT_TARGETS)}", "on")
    triggers = [k for k in ("every", "rate", "next") if body.get(k) is not None]
    if len(triggers) > 1:
        raise ApiError("give at most one of every, rate, next", triggers[1])
    fault = {"mode": mode, "on": on}
    if "rate" in triggers:
        rate = body["rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ApiError("rate must be a number from 0 to 1", "rate")
        fault["rate"] = float(rate)
    elif "next" in triggers:
        fault["next"] = _count(body, "next", low=0)
    else:
        fault["every"] = _count(body, "every", low=1) if "every" in triggers else 1
    seconds = body.get("seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                or not 0 <= seconds <= 300:
            raise ApiError("seconds must be a number from 0 to 300", "seconds")
        fault["seconds"] = float(seconds)
    return fault


def _count(body, name, low):
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1_000_000:
        raise ApiError(f"{name} must be an integer from {low} to 1000000", name)
    return value


def initial_fault(faults_setting: str, service: str) -> dict:
    if faults_setting == "seed" and service in SEED_FAULTS:
        return parse_fault(SEED_FAULTS[service])
    return parse_fault({"mode": "off"})


class FaultStore:
    """The fault setting and its call counter, in memory shared by a server's master and
    its workers: a worker that crashes on purpose is replaced by one that keeps counting
    (so 'every 2nd call' stays true) and keeps what was set at run time."""

    SIZE = 4096

    def __init__(self, initial: dict):
        self._lock = multiprocessing.Lock()
        self._mem = mmap.mmap(-1, self.SIZE)
        self._write({"fault": initial, "calls": 0})

    def _read(self):
        length = int.from_bytes(self._mem[:4], "big")
        return json.loads(self._mem[4:4 + length])

    def _write(self, state):
        data = json.dumps(state).encode()
        self._mem[:4 + len(data)] = len(data).to_bytes(4, "big") + data

    def get(self) -> dict:
        with self._lock:
            return self._read()

    def set(self, fault: dict) -> None:
        with self._lock:
            self._write({"fault": fault, "calls": 0})

    def armed(self, action: str) -> bool:
        """Whether a fault is set for this kind of call (without counting a call)."""
        with self._lock:
            fault = self._read()["fault"]
        return fault["mode"] != "off" and fault["on"] in (action, "both")

    def next_fault(self, action: str) -> tuple[FaultMode, dict]:
        """Count this call and return (the mode to apply to it, OFF for none; the
        setting it came from)."""
        with self._lock:
            state = self._read()
            fault = state["fault"]
            if fault["mode"] == "off" or fault["on"] not in (action, "both"):
                return OFF, fault
            state["calls"] += 1
            if "rate" in fault:
                hit = random.random() < fault["rate"]
            elif "next" in fault:
                hit = fault["next"] > 0
                if hit:
                    fault["next"] -= 1
            else:
                hit = state["calls"] % fault["every"] == 0
            self._write(state)
            return (MODES[fault["mode"]] if hit else OFF), fault
