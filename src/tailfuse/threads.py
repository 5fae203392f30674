"""How many CPU threads this process's torch work uses, and what each stage records about it.

The count, in order of precedence: ``--threads N`` (every command takes it), then ``OMP_NUM_THREADS`` (torch reads it
itself), then torch's default: the cores of the machine. With ``--processes N`` and neither given, each process takes
its share of the CPUs this process may use (``os.sched_getaffinity``). Inter-op threads follow the same count.

Stages made of many small operations (the sparse model's training, the prior's, the evaluation's classifiers, the
report's features) adapt the count while they run when the user chose none (``adaptive``): every second or so they
read how much of the allowed CPUs other processes used, and run on the CPUs left free (at least one). With more
threads than free cores, each small operation waits at its end for a thread that another job holds: on a 2-core
machine beside one other CPU-bound job, ``train`` ran many times slower on two threads than on one, while on an idle
machine two threads are about a third faster (benchmarks/results/contention.md). The small logistic regressions of
the evaluation and the report run on one thread (``one_thread``): there one thread is faster even on an idle machine.

Every stage records the count it ran with, the CPUs it could use and the load average when it started
(``runtime`` in ``<run>/stages/<stage>.json``; ``tailfuse info`` shows them), so a slow run can explain itself: on a
2-core machine beside another CPU-bound job, the small networks of ``train`` slowed down many times (issue 28).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time

import torch

_explicit: int | None = None  # --threads, when given


def _allowed() -> set[int]:
    """The CPUs this process may run on (its affinity mask; a container's or taskset's limit)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cpus_allowed() -> int:
    """How many CPUs this process may run on, at least 1."""
    return max(1, len(_allowed()))


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


# --- adapting the count to the CPUs other processes leave free

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds the given CPUs spent busy since boot (all processes; steal counts as busy), from /proc/stat; None
    where it cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu") and not ln.startswith("cpu ")]
    except OSError:
        return None
    busy = 0
    for parts in lines:
        if int(parts[0][3:]) in cpus:
            v = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
            busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return busy / _CLK_TCK


class _FreeCpus:
    """How many of this process's allowed CPUs other processes left free since the previous reading."""

    def __init__(self):
        self.cpus = _allowed()
        self._last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        busy = _busy_seconds(self.cpus)
        return None if busy is None else (time.monotonic(), busy, time.process_time())

    def since_last(self) -> float | None:
        """Free CPUs over the time since the previous call (None: unknown, or too short a time to tell)."""
        now = self._read()
        if now is None or self._last is None or now[0] - self._last[0] < 0.05:
            return None
        (t0, b0, own0), (t1, b1, own1) = self._last, now
        self._last = now
        others = max(0.0, (b1 - b0) - (own1 - own0)) / (t1 - t0)  # busy seconds that were not this process's
        return max(0.0, len(self.cpus) - others)


INTERVAL = 1.0  # seconds between two readings of the free CPUs in an adaptive stage


class _Governor:
    def __init__(self):
        self.free = _FreeCpus()
        self.next = 0.0
        self.counts: list[int] = []
        self.pools_before: dict = {}  # BLAS / OpenMP library path -> (controller, its count before the stage)

    def adapt(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next:
            return
        self.next = now + INTERVAL
        free = self.free.since_last()
        if free is None:
            return
        n = max(1, min(len(self.free.cpus), int(free + 0.25)))  # a core counts as free when 3/4 of it is
        if not self.counts or self.counts[-1] != n:
            torch.set_num_threads(n)
            self.counts.append(n)
        self._pools(n)

    def _pools(self, n: int) -> None:
        """The BLAS of numpy / scipy / scikit-learn (the logistic regressions) and the OpenMP of faiss follow the same
        count; libraries loaded since the last look (scipy's, on first use) included."""
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return
        for lib in ThreadpoolController().select(user_api=["blas", "openmp"]).lib_controllers:
            if lib.filepath not in self.pools_before:
                self.pools_before[lib.filepath] = (lib, lib.num_threads)
            if lib.num_threads != n:
                lib.set_num_threads(n)

    def restore(self) -> None:
        for lib, n in self.pools_before.values():
            lib.set_num_threads(n)


_governor: _Governor | None = None


def adaptive(fn):
    """Decorator for a stage of many small operations: unless the user chose a count (``--threads``,
    ``OMP_NUM_THREADS``), its torch, BLAS and OpenMP work runs on the allowed CPUs that other processes leave free,
    read when it starts (over a fifth of a second) and again at ``adapt()`` calls, at most every ``INTERVAL`` seconds.
    The counts in force before are restored after."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        global _governor
        if chosen() or _governor is not None:  # the user's count; or an adaptive stage inside another
            return fn(*args, **kwargs)
        before = torch.get_num_threads()
        _governor = _Governor()
        time.sleep(0.2)
        _governor.adapt(force=True)
        try:
            return fn(*args, **kwargs)
        finally:
            _governor.restore()
            _governor = None
            torch.set_num_threads(before)

    return run


def adapt() -> None:
    """Inside an ``adaptive`` stage: re-read the free CPUs (at most every INTERVAL seconds) and follow them. Call it
    once per batch; elsewhere (and inside ``one_thread``) it does nothing."""
    if _governor is not None and not _single:
        _governor.adapt()


_single = 0  # depth of one_thread blocks


@contextlib.contextmanager
def one_thread():
    """Torch, the BLAS and every OpenMP runtime (scikit-learn's loss functions, faiss) on one thread inside the block,
    unless the user chose a count. For work that one thread does best even on an idle machine: the logistic
    regressions of the evaluation and the report's scorer, whose OpenMP regions over a few hundred rows cost more
    than they share (the linear evaluation alone: 9.5 s so, 12.9 s on two threads; contention.md)."""
    global _single
    if chosen():
        yield
        return
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    _single += 1
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        _single -= 1
        torch.set_num_threads(before)


def adapted_counts() -> list[int] | None:
    """The thread counts the running adaptive stage has used so far, in order of change (None outside one)."""
    return list(_governor.counts) if _governor is not None else None
