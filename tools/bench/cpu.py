"""CPU seconds of groups of processes, read from /proc, and of the whole machine.

CPU per completed saga depends much less on what else the machine runs than sagas/s
does, so it is the figure to compare between runs on a shared machine."""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_stats():
    """pid -> (session id, CPU ticks of the process and its reaped children)."""
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2:].split()
        session = int(rest[3])
        ticks = sum(int(x) for x in rest[11:15])   # utime stime cutime cstime
        stats[int(name)] = (session, ticks)
    return stats


def machine_ticks():
    """CPU ticks spent busy by every core since boot (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


class CpuMeter:
    """Each group is a list of session leaders: every process in their sessions counts
    (a gunicorn worker that crashed and was replaced included), or plain pids."""

    def __init__(self, groups):
        self.groups = groups          # name -> list of pids

    def sample(self):
        stats = proc_stats()
        out = {}
        for name, pids in self.groups.items():
            pids = set(pids)
            out[name] = sum(t for pid, (sess, t) in stats.items() if pid in pids or sess in pids)
        out["_machine"] = machine_ticks()
        return out

    @staticmethod
    def diff(before, after, wall):
        """(group -> CPU seconds, average cores busy machine-wide)."""
        cpu = {k: (after[k] - before[k]) / CLK_TCK for k in after if not k.startswith("_")}
        busy = (after["_machine"] - before["_machine"]) / CLK_TCK / max(wall, 1e-9)
        return cpu, busy
