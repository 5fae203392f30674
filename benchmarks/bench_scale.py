"""Large-run benchmark (issue 10): fuse over many 4 x 64 x 64 latents and decode 2,000 fused ones, with 1 and 2
processes of one thread each: wall time, samples/s, peak RSS per process.

    python benchmarks/bench_scale.py --source runs/bench-isic --work runs/bench-scale [--n 50000] [--decode 2000]

The run is synthetic in its latents, real in everything else: Stable Diffusion's native latent size at 512 px is
4 x 64 x 64, so every latent is a real ISIC2018-LT latent (4 x 16 x 16, from --source) tiled 4 x 4 with a small
seeded perturbation (so no two are equal), cycled to --n samples with the real labels and splits; the sparse model
is trained briefly (1 generation, 1 epoch) on a subset of 400 of them and copied into the big run. Each
configuration runs in a fresh copy of the run (the saliency maps are recomputed every time): `tailfuse fuse` (the
Grad-CAM maps of every training latent, the neighbour index, --fuse-count fused latents) and `tailfuse decode` of
--decode of them (with their fusion masks, so pixel detail, decode's default for a fused set, is on; --decode 0 times
fuse alone), each as
`tailfuse [--processes 2] ...` with OMP_NUM_THREADS=1. Peak RSS is read per process from /proc: its high-water mark
VmHWM, polled every 0.2 s over the whole process tree (so only the last 0.2 s of a process can be missed). The
neighbour index is the head pool's saliency maps (float32), whose size is stated. Writes
benchmarks/results/scale[-<tag>].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from tailfuse.store import RunStore, save_tensors_atomic, write_csv_atomic, write_json_atomic  # noqa: E402


def build_run(source: Path, work: Path, n: int, shard: int = 512) -> Path:
    """The big run: tiled, perturbed copies of the source run's latents with its labels and splits."""
    src = RunStore(source)
    run = work / f"base-{n}"
    if (run / "stages" / "encode.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    (run / "stages").mkdir(parents=True)
    samples = src.samples()
    ids, z = src.latents().load_all()
    by_id = dict(zip(ids.tolist(), range(len(ids))))
    order = samples["sample_id"].to_numpy()
    gen = torch.Generator().manual_seed(0)
    rows, files = [], {}
    for si in range(0, n, shard):
        m = min(shard, n - si)
        src_rows = [order[(si + j) % len(order)] for j in range(m)]
        zz = z[[by_id[int(s)] for s in src_rows]].repeat(1, 1, 4, 4)
        zz = zz + 0.05 * torch.randn(zz.shape, generator=gen)
        sid = torch.arange(si, si + m, dtype=torch.int64)
        fname = f"latents/{si // shard:05d}.safetensors"
        save_tensors_atomic(run / fname, {"latents": zz.float(), "sample_id": sid})
        files[str(si // shard)] = {"file": fname, "n": m, "n_rows": m, "skipped": [], "sha256": None}
        part = samples.set_index("sample_id").loc[src_rows].reset_index()
        part["source_sample_id"] = part["sample_id"]
        part["sample_id"] = sid.numpy()
        part["shard"], part["offset"] = si // shard, np.arange(m)
        rows.append(part)
    table = pd.concat(rows, ignore_index=True)
    write_csv_atomic(run / "samples.csv", table)
    info = dict(src.labels())
    info["latent_shape"] = [4, 64, 64]
    info["image_size"] = 512
    labels = info["labels"]
    info["counts"] = {lab: {**{s: int(table.loc[table["split"] == s, lab].sum()) for s in ("train", "val", "test")},
                            "total": int(table[lab].sum())} for lab in labels}
    write_json_atomic(run / "labels.json", info)
    enc = dict(src.stage("encode"))
    enc.update(shards=files, n_encoded=n, n_samples=n, latent_shape=[4, 64, 64], inputs_hash=f"scale-{n}",
               config_hash=f"scale-{n}-{enc['config_hash'][:16]}", status="done")
    write_json_atomic(run / "stages" / "encode.json", enc)
    (run / "run.yaml").write_text((source / "run.yaml").read_text())
    return run


def train_small(run: Path, work: Path) -> None:
    """A briefly trained sparse model (on 400 of the latents), copied into ``run``."""
    if (run / "stages" / "train.json").is_file():
        return
    small = build_run_subset(run, work / "small", 400)
    subprocess.run([sys.executable, "-m", "tailfuse", "train", "--run", str(small), "--generations", "1", "--epochs", "1",
                    "--quiet"], check=True, env=_env(2))
    shutil.copytree(small / "train", run / "train")
    rec = json.loads((small / "stages" / "train.json").read_text())
    write_json_atomic(run / "stages" / "train.json", rec)


def build_run_subset(run: Path, dst: Path, n: int) -> Path:
    if (dst / "stages" / "encode.json").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "stages").mkdir(parents=True)
    shutil.copytree(run / "latents", dst / "latents", ignore=lambda d, names: [x for x in names if int(x[:5]) * 512 >= n])
    t = pd.read_csv(run / "samples.csv").head(n)
    t.to_csv(dst / "samples.csv", index=False)
    shutil.copy(run / "labels.json", dst / "labels.json")
    shutil.copy(run / "run.yaml", dst / "run.yaml")
    enc = json.loads((run / "stages" / "encode.json").read_text())
    enc["shards"] = {k: v for k, v in enc["shards"].items() if int(k) * 512 < n}
    enc["n_encoded"] = n
    write_json_atomic(dst / "stages" / "encode.json", enc)
    return dst


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parent / "src")}


def _tree_rss(pid: int) -> dict[int, int]:
    """Peak RSS so far (bytes; the kernel's high-water mark VmHWM, so spikes between polls count) of a process and
    its descendants, from /proc."""
    out = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        out[p] = int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def timed(cmd: list[str], env: dict) -> dict:
    """Wall time and the peak RSS of every python process of the command's tree."""
    t = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: dict[int, int] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for p, r in _tree_rss(proc.pid).items():
                peak[p] = max(peak.get(p, 0), r)
            time.sleep(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    workers = sorted(peak.values(), reverse=True)
    return {"seconds": round(time.time() - t, 1), "peak_rss_bytes_per_process": workers}



def _decode(run: Path, pre: list[str], count: int) -> dict:
    """Time `tailfuse decode` of the first ``count`` fused latents of ``run`` (a set of that size made from the fused
    one, with the fusion masks, so decode does what it does on any fused set: pixel detail on by default)."""
    from tailfuse.latentset import LatentSet

    ids = pd.read_csv(run / "synthetic" / "samples.csv").head(count)
    sub = run / "dec"
    shutil.rmtree(sub, ignore_errors=True)
    (sub / "latents").mkdir(parents=True)
    fused_set = LatentSet.open(RunStore(run), "synthetic").shards
    z, mask = fused_set.get(ids["synth_id"].to_numpy()), fused_set.get(ids["synth_id"].to_numpy(), key="mask")
    save_tensors_atomic(sub / "latents" / "00000.safetensors",
                        {"latents": z, "mask": mask, "synth_id": torch.from_numpy(ids["synth_id"].to_numpy().copy())})
    ids.to_csv(sub / "samples.csv", index=False)
    write_json_atomic(run / "stages" / "sample-dec.json", {"stage": "sample-dec", "status": "done", "config_hash": "scale",
                                                           "files": ["latents/00000.safetensors"], "n_synthetic": len(ids)})
    dec = timed([*pre, "decode", "--run", str(run), "--name", "dec", "--quiet"], _env(1))
    return {**dec, "images": len(ids), "images_per_second": round(len(ids) / dec["seconds"], 2),
            "settings": RunStore(run).stage("decode-dec").get("settings", {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="an encoded run (ISIC2018-LT, TAESD) whose latents are tiled")
    ap.add_argument("--work", required=True, help="scratch folder for the big runs")
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--fuse-count", type=int, default=2000, help="fused latents made (spread over the tail labels)")
    ap.add_argument("--decode", type=int, default=2000, help="fused latents decoded (0: time fuse only)")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="", help="suffix of the result files: scale-<tag>.json / .md")
    a = ap.parse_args()
    work = Path(a.work)
    base = build_run(Path(a.source), work, a.n)
    train_small(base, work)
    tail = json.loads((base / "labels.json").read_text())["tail_labels"]
    per = max(1, a.fuse_count // len(tail))
    results = {}
    load_start = os.getloadavg()
    for p in [int(x) for x in a.processes.split(",")]:
        run = work / f"run-p{p}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run, ignore=shutil.ignore_patterns("saliency", "synthetic"))
        for f in (run / "stages").glob("*"):
            if f.name.startswith(("saliency", "fuse", "decode")):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        pre = [sys.executable, "-m", "tailfuse"] + (["--processes", str(p)] if p > 1 else [])
        fuse = timed([*pre, "fuse", "--run", str(run), "--per-class", str(per), "--quiet"], _env(1))
        dec = _decode(run, pre, a.decode) if a.decode else None
        n_train = int((pd.read_csv(run / "samples.csv")["split"] == "train").sum())
        maps = RunStore(run).stage(next(k for k in RunStore(run).stages() if k.startswith("saliency")))
        n_head = int((pd.read_csv(next((run / "saliency").glob("*/maps.csv")))["role"] == "head").sum())
        results[p] = {
            "fuse": {**fuse, "latents": a.n, "train_latents_with_maps": maps["n_maps"], "fused": int(per * len(tail)),
                     "maps_per_second": round(maps["n_maps"] / fuse["seconds"], 1)},
            **({"decode": dec} if dec else {}),
            "neighbour_index_bytes": n_head * 64 * 64 * 4, "n_train": n_train,
        }
        print(json.dumps({p: results[p]}, indent=1))
    r1, r2 = results.get(1), results.get(2)
    speed = {k: round(r1[k]["seconds"] / r2[k]["seconds"], 2) for k in ("fuse", "decode") if k in r1} if r1 and r2 else {}
    res = {"command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]), "results": results,
           "speedup_2_over_1": speed, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scale{'-' + a.tag if a.tag else ''}.json").write_text(json.dumps(res, indent=2) + "\n")
    what = f", decode {a.decode:,} of them" if a.decode else " (no decode: --decode 0)"
    md = [f"# Large run: fuse over {a.n:,} latents of 4 x 64 x 64{what} (processes: {a.processes}; one thread each)", "",
          f"Command: `{res['command']}`", "",
          "| processes | stage | wall (s) | throughput | peak RSS per process (MiB) |", "|---|---|---|---|---|"]
    for p, r in results.items():
        md.append(f"| {p} | fuse ({r['fuse']['train_latents_with_maps']} saliency maps, {r['fuse']['fused']} fused) | "
                  f"{r['fuse']['seconds']} | {r['fuse']['maps_per_second']} maps/s | "
                  f"{', '.join(str(round(b / 2**20)) for b in r['fuse']['peak_rss_bytes_per_process'][:p + 2])} |")
        if "decode" not in r:
            continue
        extra = ", pixel detail" if r["decode"]["settings"].get("pixel_detail") else ""
        md.append(f"| {p} | decode ({r['decode']['images']} images, 512 px{extra}) | {r['decode']['seconds']} | "
                  f"{r['decode']['images_per_second']} images/s | "
                  f"{', '.join(str(round(b / 2**20)) for b in r['decode']['peak_rss_bytes_per_process'][:p + 2])} |")
    md += ["", f"Speed-up of 2 one-thread processes over 1: {speed}. Neighbour index (the head pool's maps, float32): "
           f"{results[min(results)]['neighbour_index_bytes'] / 2**20:.0f} MiB. {platform.platform()}; load average at the "
           f"start {', '.join(f'{x:.1f}' for x in load_start)}, at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}."]
    (out / f"scale{'-' + a.tag if a.tag else ''}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
