"""The chaos harness's fault injection: which faults it sets, and setting them on every
process of a service (the harness's own system) or through the orchestrator's
PUT /faults/<service> (a running system, with its operator token)."""

import time

import requests

from chaos_system import SERVICES
from saga import faults

# Every fault mode but "off": those that change an outcome, and the stalls that only
# delay one (a "slow" service stalls within the read timeout, a "hanging" one past it).
FAULT_MODES = tuple(m for m in faults.FAULT_MODES if m != "off")
TRIGGERS = ("every", "rate", "next")
ACTIONS = ("invoke", "compensate", "both")


def make_fault(mode, trigger, every, rate, nxt, on, seconds) -> dict:
    """The PUT /faults body of one fault, from values drawn in advance (so that a seed
    draws the same numbers whatever fault it turns out to be)."""
    fault = {"mode": mode, "on": on, trigger: {"every": every, "rate": rate, "next": nxt}[trigger]}
    if mode == "hang":
        fault["seconds"] = seconds
    elif mode == "slow":
        fault["seconds"] = round(seconds / 4, 2)    # under the 1 s read timeout
    return fault


class FaultInjector:
    """Sets faults on the services: on each process of the harness's own system, or,
    with no system (--url), through the orchestrator's API."""

    def __init__(self, system, url=None, token=None):
        self.system, self.url, self.token = system, url, token

    def headers(self):
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def put(self, svc, fault, skip=()):
        """Set the fault on every process of service `svc` that can take it now (not
        those in `skip`: down, restart pending). Returns (the processes that took it,
        those alive that could not: frozen, or too busy to answer)."""
        if self.system is None:
            try:
                resp = requests.put(self.url + f"/faults/{svc}", json=fault,
                                    headers=self.headers(), timeout=3)
                if resp.status_code == 200:
                    return [svc], []
            except requests.RequestException:
                pass
            return [], [svc]
        took, missed = [], []
        for name in self.system.instances(svc):
            if name in skip or not self.system.alive(name):
                continue   # it comes back without a fault
            if name in self.system.frozen:
                missed.append(name)
                continue
            try:
                resp = requests.put(self.system.url(name) + "/faults", json=fault, timeout=1)
                (took if resp.status_code == 200 else missed).append(name)
            except requests.RequestException:
                missed.append(name)
        return took, missed

    def all_off(self):
        """Every fault off, on every process of every service; raises if one will not."""
        targets = [(svc, name) for svc in SERVICES for name in
                   (self.system.instances(svc) if self.system is not None else [None])]
        for svc, name in targets:
            resp = None
            for _ in range(20):
                try:
                    if self.system is not None:
                        resp = requests.put(self.system.url(name) + "/faults",
                                            json={"mode": "off"}, timeout=2)
                    else:
                        resp = requests.put(self.url + f"/faults/{svc}", json={"mode": "off"},
                                            headers=self.headers(), timeout=5)
                    if resp.status_code == 200:
                        break
                    if resp.status_code == 401:
                        raise RuntimeError("PUT /faults needs the operator token: pass "
                                           "--token or set SAGA_API_TOKEN")
                except requests.RequestException:
                    pass
                time.sleep(0.5)
            else:
                detail = (f"HTTP {resp.status_code}: {resp.text[:200]}" if resp is not None
                          else "no answer")
                raise RuntimeError(f"could not turn faults off on {name or 'service ' + svc} "
                                   f"({detail})")
