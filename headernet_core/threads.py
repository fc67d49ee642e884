"""How many intra-op threads torch uses for a run on the CPU.

On a small or shared CPU the thread count matters more than anything else: an OpenMP thread
that waits for a core another process holds stalls every parallel op, so 2 threads on a 2-core
machine with one core busy ran a frozen tiny epoch 2.6x slower than 1 thread, and 2 threads
next to 2 busy loader workers ~20x slower. The policy (`--threads` unset):

1. `OMP_NUM_THREADS` set (Ray sets it per trial from the trial's CPUs): leave torch as it is.
2. Otherwise use the cores that are idle right now (>= 90% idle over half a second of
   /proc/stat, only the cores this process may run on), less one per loader thread, at least 1.

So an idle 2-core machine gets 2 threads and a busy one 1, which is never slower than
`OMP_NUM_THREADS=1` (measured in docs/performance.md). `--threads N` fixes the count.
"""
from __future__ import annotations

import os
import time

SAMPLE_S = 0.5


def usable_cpus() -> list[int]:
    """The CPU ids this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over `cpus`, or None without /proc/stat."""
    try:
        with open("/proc/stat") as fp:
            lines = fp.read().splitlines()
    except OSError:
        return None
    idle = total = 0.0
    for line in lines:
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        numbers = [float(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
        idle += numbers[3] + numbers[4]
        total += sum(numbers)
    return (idle, total) if total else None


def idle_cpus(sample_s: float = SAMPLE_S) -> float | None:
    """How many of the usable cores were idle over the next `sample_s` seconds (None if unknown)."""
    cpus = set(usable_cpus())
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(sample_s)
    after = _cpu_times(cpus)
    if after is None or after[1] <= before[1]:
        return None
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def choose_threads(requested: int | None, num_workers: int, ranks: int = 1) -> tuple[int | None, str]:
    """(threads to set, or None to leave torch's choice; why) for a CPU run; `ranks`: DDP
    processes on this node, which share its idle cores."""
    if requested is not None:
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, "OMP_NUM_THREADS"
    cores = len(usable_cpus())
    idle = idle_cpus()
    # A core counts as idle when it was at least 90% idle: an OpenMP thread on a core that
    # another process wants even half the time stalls every parallel op.
    free = cores if idle is None else min(cores, int(idle + 0.1))
    shared = f", {ranks} processes" if ranks > 1 else ""
    why = f"{cores} cores, {'?' if idle is None else f'{idle:.1f}'} idle, {num_workers} loader threads{shared}"
    return max(1, free // ranks - num_workers), why


def apply_thread_policy(requested: int | None, num_workers: int, ranks: int = 1) -> str:
    """Set torch's intra-op threads for a CPU run; returns a line saying what and why."""
    import torch

    threads, why = choose_threads(requested, num_workers, ranks)
    if threads is not None:
        torch.set_num_threads(threads)
    return f"cpu threads: {torch.get_num_threads()} ({why})"
