"""Demo benchmark (issue 4): wall time of `tailfuse demo` from an empty run folder (bar: under 15 minutes on 2 cores).

    python benchmarks/bench_demo.py [--vae ../shared/models/taesd]
    python benchmarks/bench_demo.py --beside numpy1 --stem demo-beside-numpy1   # beside one CPU-bound job (issue 28)

Runs `tailfuse demo --vae <vae> --run <fresh temporary folder>` in a subprocess, then reads each stage's time from
the run folder's stage records and counts what the demo wrote. Writes benchmarks/results/demo.json and demo.md
(--stem). --beside starts a competing CPU-bound job first (bench_contention.py's: a numpy matrix-product loop on 1 or
2 threads, in a session of its own) and stops it after.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import Load, child_env, parse, parser, provenance, write_results  # noqa: E402
from bench_contention import start_competitor, stop  # noqa: E402


def main() -> None:
    ap = parser(__doc__, threads=None, vae=True,
                threads_help="torch threads of this process, and OMP_NUM_THREADS of the `tailfuse demo` it runs")
    ap.add_argument("--beside", default="none", choices=["none", "numpy1", "numpy2"],
                    help="a competing CPU-bound job to run beside the demo (default none)")
    ap.add_argument("--stem", default="demo", help="result file names (default demo)")
    args = parse(ap)
    run = Path(tempfile.mkdtemp(prefix="tailfuse-demo-")) / "run"
    load = Load()
    competitor = start_competitor(args.beside)
    try:
        t = time.time()
        subprocess.run([sys.executable, "-m", "tailfuse", "demo", "--vae", args.vae, "--run", str(run), "--quiet"],
                       check=True, env=child_env(args.threads))
        wall = time.time() - t
    finally:
        stop(competitor)
    stages, threads = {}, {}
    for f in sorted((run / "stages").glob("*.json")):
        rec = json.loads(f.read_text())
        stages[f.stem] = rec.get("seconds")
        rt = rec.get("runtime") or {}
        threads[f.stem] = rt.get("threads_used") or [rt.get("threads")]
    man = (run / "synthetic" / "manifest.csv").read_text().splitlines()
    labels = json.loads((run / "labels.json").read_text())
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    result = {
        **provenance(load, args),
        "beside": args.beside,
        "wall_seconds": round(wall, 1),
        "stage_seconds": stages,
        "stage_threads": threads,
        "n_images_encoded": sum(1 for _ in (run / "samples.csv").read_text().splitlines()) - 1,
        "tail_labels": labels["tail_labels"],
        "n_synthetic": len(man) - 1,
        "n_png": len(list((run / "synthetic" / "images").glob("*.png"))),
    }
    md = ["# demo benchmark", "", f"Command: `{result['command']}` (runs `tailfuse demo` into an empty folder).", "",
          f"Machine: {machine}. Wall time {wall / 60:.1f} min (bar: 15 min), process start and model loading "
          f"included; the ELPV package itself was already installed. Beside: "
          f"{'nothing' if args.beside == 'none' else 'a numpy matrix-product loop on ' + args.beside[-1] + ' thread(s), a job of its own'}.", "",
          f"{result['n_images_encoded']} images encoded; tail labels {', '.join(result['tail_labels'])}; "
          f"{result['n_synthetic']} synthetic images ({result['n_png']} PNG files).", "",
          "| stage | seconds | threads used |", "|---|---|---|"]
    md += [f"| {k} | {v if v is None else round(v, 1)} | {','.join(map(str, threads[k]))} |" for k, v in stages.items()]
    md += ["", f"{platform.platform()}; {load.footer()}."]
    write_results(args.out, args.stem, result, md)
    shutil.rmtree(run.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
