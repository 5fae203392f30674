"""Where `tailfuse fuse` holds its memory: resident set size over time, per phase (saliency maps, neighbour search,
fusion), in one process of one thread. A diagnostic for benchmarks/results/scale-memory.md.

    python benchmarks/fuse_memory_timeline.py RUN [--trim]

RUN: an encoded run with a trained model (e.g. a bench_scale.py base run; a fused set named `probe` is (re)made in
it). --trim calls gc.collect() and glibc's malloc_trim(0) after every Grad-CAM batch, to tell memory in use from
memory the allocator retains (the figures measured before fuse did so itself; it now trims after every batch and
collects after every shard, see release_memory in tailfuse/fusion/saliency.py). VmRSS is polled every 0.3 s from
/proc/self/status; prints the peak of each phase.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import tailfuse.fusion.stage as fs  # noqa: E402
from _results import commit_line, parse, parser, provenance  # noqa: E402  (benchmarks/, beside this script)
from tailfuse.config import FuseConfig  # noqa: E402
from tailfuse.fusion.saliency import release_memory  # noqa: E402


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def main() -> int:
    ap = parser(__doc__, threads=1, out=False)  # prints its figures; writes no result file
    ap.add_argument("run")
    ap.add_argument("--trim", action="store_true")
    ap.add_argument("--per-class", type=int, default=125)
    a = parse(ap)  # sets torch's thread count to --threads
    samples: list[tuple[float, int]] = []
    marks: list[tuple[str, float]] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            samples.append((time.time(), rss_mb()))
            time.sleep(0.3)

    threading.Thread(target=poll, daemon=True).start()
    compute_maps = fs.compute_maps

    def maps(*args, **kw):
        out = compute_maps(*args, **kw)
        if a.trim:
            release_memory(collect=True)
        return out

    def phase(name, fn):
        def wrapped(*args, **kw):
            marks.append((f"{name} start", time.time()))
            out = fn(*args, **kw)
            marks.append((f"{name} end", time.time()))
            return out
        return wrapped

    fs.compute_maps = maps
    fs.run_saliency = phase("saliency", fs.run_saliency)
    fs.run_neighbours = phase("neighbours", fs.run_neighbours)
    print(f"RSS before fuse: {rss_mb()} MB")
    t0 = time.time()
    fs.run_fuse(a.run, FuseConfig(per_class=a.per_class, name="probe"), force=True, progress=False)
    marks.append(("fuse end", time.time()))
    stop.set()
    edges = [("start", t0), *marks]
    for (n1, t1), (n2, t2) in zip(edges, edges[1:]):
        seg = [r for t, r in samples if t1 <= t <= t2]
        print(f"{n1:>18} -> {n2:<18} {t2 - t1:7.1f} s   peak RSS {max(seg) if seg else '-'} MB")
    print(f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB (trim: {a.trim})")
    p = provenance(None, a)
    print(f"Command: {p['command']} ({a.threads} torch thread(s)). {commit_line(p) or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
