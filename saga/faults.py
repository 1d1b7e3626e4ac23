"""Failure simulation at the services: what a fault setting is, how it is validated, and
the shared counter that decides which call it strikes. The same settings apply to a call
whether it arrives over HTTP, as a Kafka command or as a RabbitMQ event."""

import json
import mmap
import multiprocessing
import random

from saga.validation import ApiError, reject_unknown_fields

# fail: 500 before the transaction; reject: a business "no" (422), recorded as a refusal;
# drop: commit, then cut the connection (no answer); crash: commit, then the process
# dies; hang: stall past the caller's read timeout, then carry on; slow: a short stall.
FAULT_MODES = ("off", "fail", "reject", "drop", "crash", "hang", "slow")
BEFORE_COMMIT = ("fail", "reject", "hang", "slow")
AFTER_COMMIT = ("drop", "crash")
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

    def next_fault(self, action: str) -> tuple[str, dict]:
        """Count this call and return (the mode to apply to it, 'off' for none; the
        setting it came from)."""
        with self._lock:
            state = self._read()
            fault = state["fault"]
            if fault["mode"] == "off" or fault["on"] not in (action, "both"):
                return "off", fault
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
            return (fault["mode"] if hit else "off"), fault


def stall_seconds(mode: str, fault: dict, read_timeout: float) -> float:
    """How long a hang or slow fault stalls the call."""
    if mode == "hang":
        return fault.get("seconds", read_timeout * 2)
    if mode == "slow":
        return fault.get("seconds", 0.2)
    return 0.0
