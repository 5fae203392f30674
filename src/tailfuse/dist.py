"""Several processes on one run: which process this is, which shards it owns, and a barrier.

tailfuse runs as one process unless it was started by a distributed launcher: `tailfuse ... --processes N` (which
re-launches itself under ``torch.distributed.run``, through ``tailfuse._torchrun``, and passes a stop on to it),
``torchrun --nproc_per_node N -m tailfuse ...`` or ``accelerate launch -m tailfuse ...``. Then accelerate's
``PartialState`` joins the process group (gloo on CPUs, NCCL on GPUs), and every stage that works in shards hands
shard i to process ``i mod N``. Each shard's output depends on the shard alone (per-sample random generators, fixed
batch boundaries), so N processes write the same bytes as one. The main process alone writes shared records (stage
records, tables, manifests) after a barrier.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    state: object = None  # accelerate.PartialState when several processes run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def owns(self, shard: int) -> bool:
        return shard % self.world == self.rank

    def advance(self, bar, n: int) -> None:
        """Move the main process's progress bar for its own ``n`` items: it shows ``n x world`` as its estimate of
        all processes' work, never past the bar's total (the processes' shares differ by up to a shard)."""
        step = n * self.world
        bar.update(min(step, max(0, bar.total - bar.n)) if bar.total is not None else step)

    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]


_CURRENT: Dist | None = None


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def current(device: str = "cpu") -> Dist:
    """The process group of this run (created on first use)."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if world_size_from_env() <= 1:
        _CURRENT = Dist()
        return _CURRENT
    from accelerate import PartialState

    # a long stage on the main process (training) keeps the others waiting at a barrier: a generous timeout
    state = PartialState(cpu=torch.device(device).type == "cpu", timeout=timedelta(hours=48))
    from .threads import share

    share(state.num_processes)  # unless --threads or OMP_NUM_THREADS chose: share the allowed CPUs
    _CURRENT = Dist(state.process_index, state.num_processes, state)
    return _CURRENT


def reset() -> None:
    """Forget the process group (tests)."""
    global _CURRENT
    _CURRENT = None
