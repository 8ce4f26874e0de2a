"""CPU-seconds of every process of a server, by role, read from ``/proc/<pid>/stat``.

A server is one or more root processes (pagewire: redis-server, worker, scheduler, router;
vLLM: its API server) and everything they spawned (vLLM's engine core and model worker). Each
process is named by its role: the name the bench gave its root, or the process title vLLM sets
(``VLLM::EngineCore``, ``VLLM::Worker``); helpers without one (vLLM's multiprocessing resource
tracker, compile workers) count as ``<root>-other``. utime + stime cover all of a process's
threads; a process that starts during a run counts from zero, one that ends during it is lost
(only short-lived helpers do).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds; 0 if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces; the rest follows its closing parenthesis.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def parent_map() -> dict[int, list[int]]:
    """ppid -> child pids, for every process on the machine."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children[ppid].append(int(entry.name))
    return children


def descendants(root: int, children: dict[int, list[int]]) -> list[int]:
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def process_title(pid: int) -> str:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def role_of(pid: int, root_role: str) -> str:
    title = process_title(pid)
    if title.startswith("VLLM::"):
        return title.removeprefix("VLLM::")
    return f"{root_role}-other"


def processes(roots: dict[str, int]) -> dict[int, str]:
    """pid -> role for the named roots and all their descendants."""
    children = parent_map()
    out: dict[int, str] = {}
    for role, pid in roots.items():
        out[pid] = role
        for child in descendants(pid, children):
            out[child] = role_of(child, role)
    return out


def snapshot(roots: dict[str, int]) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU-seconds so far) for the roots' whole process trees."""
    return {pid: (role, cpu_seconds(pid)) for pid, role in processes(roots).items()}


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
                ) -> dict[str, float]:
    """CPU-seconds each role used between two snapshots (summed over its processes)."""
    used: dict[str, float] = defaultdict(float)
    for pid, (role, t) in after.items():
        used[role] += max(0.0, t - before.get(pid, (role, 0.0))[1])
    return dict(used)


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine has been busy (all cores; /proc/stat minus idle and iowait)."""
    fields = [int(x) for x in (PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK
