"""How many CPU threads this process's torch work uses, and what each stage records about it.

The count, in order of precedence: ``--threads N`` (every command takes it), then ``OMP_NUM_THREADS`` (torch reads it
itself), then torch's default: the cores of the machine. With ``--processes N`` and neither given, each process takes
its share of the CPUs this process may use (``os.sched_getaffinity``). Inter-op threads follow the same count.

Every stage records the count it ran with, the CPUs it could use and the load average when it started
(``runtime`` in ``<run>/stages/<stage>.json``; ``tailfuse info`` shows them), so a slow run can explain itself: on a
2-core machine beside another CPU-bound job, the small networks of ``train`` slowed down many times (issue 28).
"""

from __future__ import annotations

import os

import torch

_explicit: int | None = None  # --threads, when given


def cpus_allowed() -> int:
    """The CPUs this process may run on (its affinity mask; a container's or taskset's limit), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def configure(threads: int | None) -> int:
    """Apply ``--threads`` (None: leave OMP_NUM_THREADS or torch's default). Returns the intra-op count in force."""
    global _explicit
    if threads is not None:
        if int(threads) < 1:
            from .errors import TailfuseError

            raise TailfuseError(f"--threads {threads}: give at least 1.")
        _explicit = int(threads)
        torch.set_num_threads(_explicit)
        try:  # settable once, before any inter-op work; a second call in the same process keeps the first
            torch.set_num_interop_threads(_explicit)
        except RuntimeError:
            pass
    return torch.get_num_threads()


def chosen() -> bool:
    """True when the user set the count (``--threads`` or ``OMP_NUM_THREADS``)."""
    return _explicit is not None or "OMP_NUM_THREADS" in os.environ


def share(processes: int) -> None:
    """With several processes on one machine and no count chosen: each takes its share of the allowed CPUs."""
    if not chosen():
        torch.set_num_threads(max(1, cpus_allowed() // max(1, processes)))


def runtime_record() -> dict:
    """What a stage record says about the CPU work: threads, CPUs allowed, the load average at the stage's start."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpus_allowed": cpus_allowed(), "load_average_at_start": load}

