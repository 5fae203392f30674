"""Encode benchmark: time and peak memory of `tailfuse encode` on a real dataset, and kill-and-resume.

    python benchmarks/bench_encode.py [--data ../shared/data/isic2018_lt/manifest.csv] [--vae ../shared/models/taesd]

Writes benchmarks/results/encode.json and encode.md. Runs `tailfuse encode` three times in subprocesses: once
uninterrupted (timed, peak RSS), once killed (SIGKILL) after about half the shards and then resumed; then checks
that the resumed run redid no finished shard and that its latents equal the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

from _results import Load, child_env, parse, parser, provenance, write_results  # noqa: E402


def _cmd(args, run):
    return [sys.executable, "-m", "tailfuse", "encode", "--data", args.data, "--vae", args.vae, "--run", str(run), "--quiet"]


def _timed(cmd, env):
    t = time.time()
    subprocess.run(cmd, check=True, env=env)
    # peak RSS of the largest child so far (this is the first child), in MB on Linux (ru_maxrss is in KB)
    return time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    ap = parser(__doc__, threads=None, vae=True, data="isic2018_lt/manifest.csv", data_help="a manifest",
                threads_help="torch threads of this process, and OMP_NUM_THREADS of the `tailfuse encode` runs")
    args = parse(ap)
    sys.path.insert(0, str(HERE.parent / "src"))
    from tailfuse.store import RunStore

    env = child_env(args.threads)
    load = Load()
    tmp = Path(tempfile.mkdtemp(prefix="tailfuse-bench-"))
    secs, rss = _timed(_cmd(args, tmp / "whole"), env)
    whole = RunStore(tmp / "whole")
    n = whole.stage("encode")["n_encoded"]

    proc = subprocess.Popen(_cmd(args, tmp / "killed"), env=env)
    rec_path = tmp / "killed" / "stages" / "encode.json"
    n_shards = whole.stage("encode")["n_shards"]
    while proc.poll() is None:
        try:
            if len(json.loads(rec_path.read_text())["shards"]) >= max(1, n_shards // 2):
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rec = json.loads(rec_path.read_text())
    kept = {k: (tmp / "killed" / v["file"]).stat().st_mtime_ns for k, v in rec["shards"].items()}
    t = time.time()
    subprocess.run(_cmd(args, tmp / "killed"), check=True, env=env)
    resume_secs = time.time() - t
    redone = [k for k, m in kept.items() if (tmp / "killed" / rec["shards"][k]["file"]).stat().st_mtime_ns != m]
    ids_a, lat_a = whole.latents().load_all()
    ids_b, lat_b = RunStore(tmp / "killed").latents().load_all()
    identical = bool((ids_a == ids_b).all() and torch.equal(lat_a, lat_b))

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    result = {
        **provenance(load, args),
        "data": args.data,
        "vae": args.vae,
        "n_latents": n,
        "latent_shape": list(lat_a.shape[1:]),
        "seconds": round(secs, 1),
        "images_per_second": round(n / secs, 2),
        "peak_rss_mb": round(rss, 1),
        "killed_after_shards": len(kept),
        "n_shards": n_shards,
        "resume_seconds": round(resume_secs, 1),
        "finished_shards_redone": redone,
        "resumed_latents_identical": identical,
    }
    md = [
        "# encode benchmark",
        "",
        f"Command: `{result['command']}`",
        "",
        "| latents | shape | seconds | images/s | peak RSS (MB) | killed after | resume s | shards redone | identical |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {n} | {'x'.join(map(str, result['latent_shape']))} | {result['seconds']} | {result['images_per_second']} | "
        f"{result['peak_rss_mb']} | {len(kept)}/{n_shards} shards | {result['resume_seconds']} | {len(redone)} | {identical} |",
        "",
        f"Machine: {machine}; {load.footer()}.",
    ]
    write_results(args.out, "encode", result, md)


if __name__ == "__main__":
    main()
