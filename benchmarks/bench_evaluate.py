"""Evaluation benchmark (issue 5): the full downstream table of one run folder, copied into benchmarks/results/.

    python benchmarks/bench_evaluate.py --run runs/bench-isic --tag isic2018_lt [--threads 2] [-- evaluate flags]

Needs a run folder with a finished encode and a trained 'train' model (see bench_train.py); the
'train-no-imitation' model is trained by `tailfuse evaluate` when missing (its time is reported apart, outside the
evaluation budget). Runs `tailfuse evaluate --run <run>` with the default protocol (all arms, seeds 0,1,2, linear
head on frozen EfficientNet-Lite0 features) plus any flags given after `--`, then copies

    <run>/eval/results.json -> benchmarks/results/evaluate-<tag>.json
    <run>/eval/results.md   -> benchmarks/results/evaluate-<tag>.md
    <run>/eval/*.png        -> benchmarks/results/evaluate-<tag>-<plot>.png

with the command that made them, the machine, and wall time per arm written into both files. ``--fresh`` deletes
the cached arm results first (features stay cached), so the timings are those of a full evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from tailfuse.evaluate.cli_args import add_evaluate_parser, cmd_evaluate  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run folder (encode + train done)")
    ap.add_argument("--tag", required=True, help="name of the result files (e.g. isic2018_lt)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--fresh", action="store_true", help="drop cached arm results first (features stay cached)")
    ap.add_argument("--out", default=str(HERE / "results"), help="results folder (default benchmarks/results)")
    ap.add_argument("--note", help="a sentence written into both result files (conditions of the measurement)")
    a = ap.parse_args(argv)
    run = Path(a.run)
    if a.fresh and (run / "eval" / "cache").is_dir():
        shutil.rmtree(run / "eval" / "cache")
    p = argparse.ArgumentParser(prog="tailfuse")
    add_evaluate_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["evaluate", "--run", str(run), "--threads", str(a.threads), *extra])
    t = time.time()
    rc = cmd_evaluate(args)
    wall = time.time() - t
    if rc:
        return rc
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = json.loads((run / "eval" / "results.json").read_text())
    bench_cmd = "python benchmarks/bench_evaluate.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    res["benchmark"] = {
        "command": bench_cmd,
        "evaluate_command": res.get("command"),
        "wall_seconds": round(wall, 1),
        # CPU time of this process (user + system); with 2 cores and no other load, wall ~ cpu / 2
        "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "load_average_at_end": os.getloadavg(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch_threads": a.threads},
        "seconds_per_arm": {arm: e.get("seconds") for arm, e in res["arms"].items()},
        "note": a.note,
    }
    (out / f"evaluate-{a.tag}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = (run / "eval" / "results.md").read_text()
    note = (f"\nProduced by `{bench_cmd}` (wall {wall / 60:.1f} min on {os.cpu_count()} CPUs, {a.threads} torch "
            f"threads; {platform.platform()}; CPU time {res['benchmark']['cpu_seconds'] / 60:.1f} min; load average at the "
            f"end {', '.join(f'{x:.1f}' for x in os.getloadavg())}).\n" + (f"\n{a.note}\n" if a.note else ""))
    (out / f"evaluate-{a.tag}.md").write_text(md + note)
    for png in sorted((run / "eval").glob("*.png")):
        shutil.copy(png, out / f"evaluate-{a.tag}-{png.name}")
    print(f"benchmark: wrote {out / f'evaluate-{a.tag}.json'} and .md ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
