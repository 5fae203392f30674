"""Fault harness: SIGKILL every stage at random points, resume, and compare with an uninterrupted run.

Used by benchmarks/bench_faults.py (the reliability table) and tests/test_faults.py (CI). For each stage (encode,
train, fuse, decode, evaluate) on a small real run (ISIC2018-LT images, TAESD):

1. a reference run goes through every stage uninterrupted (its wall time per stage is T);
2. ``kills`` times: a copy of the run as it was before the stage, the stage started as a subprocess, killed with
   SIGKILL at a random moment in (0.05 T, 0.9 T), then the same command run again to the end;
3. the stage's outputs are compared with the reference's, byte for byte (evaluate: every test prediction and every
   metric; its timings are not outputs), and no temporary file may be left anywhere in the run folder.

A kill that comes after the stage already finished is reported as such and not counted as survived.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

CONFIG = """\
encode: {batch_size: 4, shard_size: 8}
train: {generations: 2, epochs: 2, imitation_epochs: 1, k: 16, batch_size: 16}
fuse: {per_class: 12, shard_size: 8, batch_size: 4}
decode: {shard_size: 8, batch_size: 4}
"""

STAGES = {
    "encode": {"args": ["encode"], "outputs": ["latents/*", "samples.csv", "labels.json"]},
    "train": {"args": ["train"], "outputs": ["train/gen-*/model.safetensors", "train/gen-*/config.json"]},
    "fuse": {"args": ["fuse"], "outputs": ["synthetic/latents/*", "synthetic/samples.csv", "saliency/*/*.safetensors"]},
    "decode": {"args": ["decode"], "outputs": ["synthetic/images/*", "synthetic/manifest.csv", "synthetic/provenance.jsonl"]},
    "evaluate": {"args": ["evaluate", "--arms", "real,oversample,tailfuse", "--seeds", "0,1", "--no-quality", "--per-class", "6",
                          "--bootstrap", "50"], "outputs": ["eval/scores.npz", "eval/results.json"]},
}
# results.json fields that describe the run (times, the moment it was written, where it lives), not its results
VOLATILE = {"created_at", "timings", "seconds", "finished_at", "started_at", "run", "output", "command", "folder", "runs",
            "plots"}


# torch threads of every tailfuse process the harness starts (bench_faults.py --threads sets it)
THREADS = 2


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS)}


def command(stage: str, run: Path, manifest: Path, vae: Path, config: Path) -> list[str]:
    args = list(STAGES[stage]["args"])
    if stage == "encode":
        args += ["--data", str(manifest), "--vae", str(vae)]
    if stage != "evaluate":
        args += ["--config", str(config)]
    return [sys.executable, "-m", "tailfuse", *args, "--run", str(run), "--quiet"]


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def outputs(run: Path, stage: str) -> dict[str, str]:
    """Digest of every output file of the stage (results.json without its volatile fields)."""
    out = {}
    for pattern in STAGES[stage]["outputs"]:
        for p in sorted(run.glob(pattern)):
            if not p.is_file():
                continue
            data = p.read_bytes()
            if p.name == "results.json":
                data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
            out[str(p.relative_to(run))] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(run: Path) -> list[str]:
    """Temporary files left behind (atomic writes use '.<name>.tmp-<pid>')."""
    return [str(p.relative_to(run)) for p in run.rglob("*") if ".tmp-" in p.name]


def reference(root: Path, manifest: Path, vae: Path) -> tuple[Path, dict[str, Path], dict[str, float]]:
    """The uninterrupted run; a snapshot of the run folder before each stage; each stage's wall time."""
    config = root / "config.yaml"
    config.write_text(CONFIG)
    run = root / "reference"
    snaps, secs = {}, {}
    for stage in STAGES:
        snap = root / f"before-{stage}"
        if run.exists():
            shutil.copytree(run, snap)
        else:
            snap.mkdir()
        snaps[stage] = snap
        t = time.time()
        r = subprocess.run(command(stage, run, manifest, vae, config), env=env(), capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"reference {stage} failed:\n{r.stderr[-3000:]}")
        secs[stage] = time.time() - t
    return run, snaps, secs


def kill_and_resume(root: Path, stage: str, snap: Path, ref: Path, seconds: float, manifest: Path, vae: Path,
                    rng: random.Random, i: int) -> dict:
    run = root / f"{stage}-kill{i}"
    shutil.rmtree(run, ignore_errors=True)
    if any(snap.iterdir()):
        shutil.copytree(snap, run)
    cmd = command(stage, run, manifest, vae, root / "config.yaml")
    at = rng.uniform(0.05, 0.9) * seconds
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + at
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if r.returncode:
        return {"stage": stage, "kill_at_s": round(at, 2), "killed": killed, "resumed": False, "error": r.stderr[-2000:]}
    want, got = outputs(ref, stage), outputs(run, stage)
    diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    left = leftovers(run)
    shutil.rmtree(run, ignore_errors=True)
    return {"stage": stage, "kill_at_s": round(at, 2), "killed": killed, "resumed": True, "files_compared": len(want),
            "different": diff, "leftover_temporary_files": left, "identical": not diff and not left}


def run_harness(root: Path, manifest: Path, vae: Path, kills: int = 5, seed: int = 0, stages=None) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    ref, snaps, secs = reference(root, manifest, vae)
    rng = random.Random(seed)
    rows = []
    for stage in stages or STAGES:
        for i in range(kills):
            rows.append(kill_and_resume(root, stage, snaps[stage], ref, secs[stage], manifest, vae, rng, i))
    return {"reference_seconds": {k: round(v, 1) for k, v in secs.items()}, "trials": rows,
            "kills": sum(r["killed"] for r in rows),
            "kills_survived_identical": sum(r["killed"] and r.get("identical", False) for r in rows),
            "files_compared": sum(r.get("files_compared", 0) for r in rows)}
