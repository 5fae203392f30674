"""Demo benchmark (issue 4): wall time of `tailfuse demo` from an empty run folder (bar: under 15 minutes on 2 cores).

    python benchmarks/bench_demo.py --vae ../shared/models/taesd

Runs `tailfuse demo --vae <vae> --run <fresh temporary folder>` in a subprocess, then reads each stage's time from
the run folder's stage records and counts what the demo wrote. Writes benchmarks/results/demo.json and demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", required=True)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    run = Path(tempfile.mkdtemp(prefix="tailfuse-demo-")) / "run"
    t = time.time()
    subprocess.run([sys.executable, "-m", "tailfuse", "demo", "--vae", args.vae, "--run", str(run), "--quiet"], check=True)
    wall = time.time() - t
    stages = {}
    for f in sorted((run / "stages").glob("*.json")):
        rec = json.loads(f.read_text())
        stages[f.stem] = rec.get("seconds")
    man = (run / "synthetic" / "manifest.csv").read_text().splitlines()
    labels = json.loads((run / "labels.json").read_text())
    result = {
        "command": f"python benchmarks/bench_demo.py --vae {args.vae}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "wall_seconds": round(wall, 1),
        "stage_seconds": stages,
        "n_images_encoded": sum(1 for _ in (run / "samples.csv").read_text().splitlines()) - 1,
        "tail_labels": labels["tail_labels"],
        "n_synthetic": len(man) - 1,
        "n_png": len(list((run / "synthetic" / "images").glob("*.png"))),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# demo benchmark", "", f"Command: `{result['command']}` (runs `tailfuse demo` into an empty folder).", "",
          f"Machine: {result['machine']}. Wall time {wall / 60:.1f} min (bar: 15 min), process start and model loading "
          f"included; the ELPV package itself was already installed.", "",
          f"{result['n_images_encoded']} images encoded; tail labels {', '.join(result['tail_labels'])}; "
          f"{result['n_synthetic']} synthetic images ({result['n_png']} PNG files).", "",
          "| stage | seconds |", "|---|---|"]
    md += [f"| {k} | {v if v is None else round(v, 1)} |" for k, v in stages.items()]
    (out / "demo.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    shutil.rmtree(run.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
