"""Demo benchmark (issue 4): wall time of `tailfuse demo` from an empty run folder (bar: under 15 minutes on 2 cores).

    python benchmarks/bench_demo.py [--vae ../shared/models/taesd]

Runs `tailfuse demo --vae <vae> --run <fresh temporary folder>` in a subprocess, then reads each stage's time from
the run folder's stage records and counts what the demo wrote. Writes benchmarks/results/demo.json and demo.md.
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


def main() -> None:
    ap = parser(__doc__, threads=None, vae=True,
                threads_help="torch threads of this process, and OMP_NUM_THREADS of the `tailfuse demo` it runs")
    args = parse(ap)
    run = Path(tempfile.mkdtemp(prefix="tailfuse-demo-")) / "run"
    load = Load()
    t = time.time()
    subprocess.run([sys.executable, "-m", "tailfuse", "demo", "--vae", args.vae, "--run", str(run), "--quiet"], check=True,
                   env=child_env(args.threads))
    wall = time.time() - t
    stages = {}
    for f in sorted((run / "stages").glob("*.json")):
        rec = json.loads(f.read_text())
        stages[f.stem] = rec.get("seconds")
    man = (run / "synthetic" / "manifest.csv").read_text().splitlines()
    labels = json.loads((run / "labels.json").read_text())
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    result = {
        **provenance(load, args),
        "wall_seconds": round(wall, 1),
        "stage_seconds": stages,
        "n_images_encoded": sum(1 for _ in (run / "samples.csv").read_text().splitlines()) - 1,
        "tail_labels": labels["tail_labels"],
        "n_synthetic": len(man) - 1,
        "n_png": len(list((run / "synthetic" / "images").glob("*.png"))),
    }
    md = ["# demo benchmark", "", f"Command: `{result['command']}` (runs `tailfuse demo` into an empty folder).", "",
          f"Machine: {machine}. Wall time {wall / 60:.1f} min (bar: 15 min), process start and model loading "
          f"included; the ELPV package itself was already installed.", "",
          f"{result['n_images_encoded']} images encoded; tail labels {', '.join(result['tail_labels'])}; "
          f"{result['n_synthetic']} synthetic images ({result['n_png']} PNG files).", "",
          "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v if v is None else round(v, 1)} |" for k, v in stages.items()]
    md += ["", f"{platform.platform()}; {load.footer()}."]
    write_results(args.out, "demo", result, md)
    shutil.rmtree(run.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
