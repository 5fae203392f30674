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
`tailfuse [--processes 2] ...` with OMP_NUM_THREADS=1 (--threads). Peak RSS is read per process from /proc: its high-water mark
VmHWM, polled every 0.2 s over the whole process tree (so only the last 0.2 s of a process can be missed). The
neighbour index is the head pool's saliency maps (float32), whose size is stated. Writes
benchmarks/results/scale[-<tag>].json and .md.

The whole table takes hours on 2 cores, so it can be made in parts: `--fused-run W/run-p1` times decode alone, of the
fused set an earlier run of this script left in that folder (fused output is the same for any process count; its
decoded images and round trips are removed before each timing, so nothing is reused), and `--merge earlier.json`
folds an earlier result file's figures into this one's table (this run's own figures win where both have one), so
the speed-ups compare 1 and 2 processes even when they were measured by separate calls; every call's command and
load averages are kept. A decode too long for one sitting can be split: `--segment SECONDS` stops it after that long
(as a kill would: finished shards and round trips stay) and `--resume` goes on with it; its time is then the sum of
the segments' wall times, each segment's start-up and the shard a stop left unfinished included, and each segment
(wall time, images and round trips done, load averages) is listed in the JSON and its wall time in the table.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
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

from _results import Load, child_env, command_line, parse, parser, provenance, write_results  # noqa: E402
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
    return {**child_env(threads), "PYTHONPATH": str(HERE.parent / "src")}


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


def timed(cmd: list[str], env: dict, stop_after: float | None = None) -> dict:
    """Wall time and the peak RSS of every python process of the command's tree. ``stop_after`` (seconds): stop
    the command then with SIGTERM, as a kill would (tailfuse, with one process or several, keeps its finished
    shards); ``stopped`` says whether it was."""
    t = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: dict[int, int] = {}
    stop = threading.Event()
    stopped = threading.Event()

    def poll():
        while not stop.is_set():
            for p, r in _tree_rss(proc.pid).items():
                peak[p] = max(peak.get(p, 0), r)
            if stop_after is not None and time.time() - t > stop_after and not stopped.is_set():
                stopped.set()
                proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode and not stopped.is_set():
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    workers = sorted(peak.values(), reverse=True)
    return {"seconds": round(time.time() - t, 1), "peak_rss_bytes_per_process": workers, "stopped": stopped.is_set()}


def _clear_decode(run: Path) -> None:
    """Remove what an earlier decode timing left in ``run`` (images, its stage record, the round trips), so the next
    timing does all of decode's work."""
    for d in (run / "dec", run / "roundtrip"):
        shutil.rmtree(d, ignore_errors=True)
    for f in (run / "stages").glob("*"):
        if f.name.startswith(("decode-dec", "sample-dec")):
            shutil.rmtree(f) if f.is_dir() else f.unlink()


def _decode(run: Path, pre: list[str], count: int, resume: bool = False, segment: float | None = None,
            dtype: str | None = None, threads: int = 1) -> dict | None:
    """Time `tailfuse decode` of the first ``count`` fused latents of ``run`` (a set of that size made from the fused
    one, with the fusion masks, so decode does what it does on any fused set: pixel detail on by default).

    ``segment`` (seconds): stop decode after that long (it keeps its finished shards and round trips) and return
    None; ``resume``: go on with a decode stopped so, instead of starting afresh. The timing is then the sum of the
    segments' wall times (each segment's start-up and any shard it left unfinished included), and every segment is
    kept in ``run/dec-segments.json`` and in the result. ``dtype``: the VAE's (decode's --dtype; default float32).
    ``threads``: torch threads of each decode process."""
    from tailfuse.latentset import LatentSet

    log_file = run / "dec-segments.json"
    ids = pd.read_csv(run / "synthetic" / "samples.csv").head(count)
    if len(ids) < count:
        raise SystemExit(f"{run} has {len(ids)} fused latents, fewer than --decode {count}")
    if resume:
        if not log_file.is_file() or len(pd.read_csv(run / "dec" / "samples.csv")) != count:
            raise SystemExit(f"--resume: {run} holds no stopped decode of {count} images to go on with")
        segments = json.loads(log_file.read_text())
    else:
        _clear_decode(run)
        segments = []
        sub = run / "dec"
        (sub / "latents").mkdir(parents=True)
        fused_set = LatentSet.open(RunStore(run), "synthetic").shards
        z, mask = fused_set.get(ids["synth_id"].to_numpy()), fused_set.get(ids["synth_id"].to_numpy(), key="mask")
        save_tensors_atomic(sub / "latents" / "00000.safetensors",
                            {"latents": z, "mask": mask, "synth_id": torch.from_numpy(ids["synth_id"].to_numpy().copy())})
        ids.to_csv(sub / "samples.csv", index=False)
        write_json_atomic(run / "stages" / "sample-dec.json", {"stage": "sample-dec", "status": "done", "config_hash": "scale",
                                                               "files": ["latents/00000.safetensors"], "n_synthetic": len(ids)})

    def done() -> dict:
        return {"images": sum(1 for _ in (run / "dec").glob("images/**/*.png")),
                "round_trips": sum(1 for _ in (run / "roundtrip").glob("*.png"))}

    load0, before = os.getloadavg(), done()
    dec = timed([*pre, "decode", "--run", str(run), "--name", "dec", "--quiet", *(["--dtype", dtype] if dtype else [])],
                _env(threads), stop_after=segment)
    segments.append({**dec, "command": command_line(),
                     "before": before, "after": done(), "load_average_at_start": load0,
                     "load_average_at_end": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_json_atomic(log_file, segments)
    if dec["stopped"]:
        return None
    seconds = round(sum(x["seconds"] for x in segments), 1)
    peaks = max((x["peak_rss_bytes_per_process"] for x in segments), key=lambda v: v[:1])
    rec = RunStore(run).stage("decode-dec")
    return {"seconds": seconds, "peak_rss_bytes_per_process": peaks, "images": len(ids),
            "images_per_second": round(len(ids) / seconds, 2), "round_trips": done()["round_trips"],
            "settings": rec.get("settings", {}), "dtype": rec.get("vae", {}).get("dtype", "float32"),
            **({"segments": segments} if len(segments) > 1 else {})}


def _measure(a, work: Path, base: Path, p: int, per: int, n_fused: int) -> dict:
    """Fuse (in a fresh copy of ``base``) and decode with ``p`` processes, or decode alone with ``--fused-run``."""
    pre = [sys.executable, "-m", "tailfuse"] + (["--processes", str(p)] if p > 1 else [])
    if a.fused_run:
        run = Path(a.fused_run)
        dec = _decode(run, pre, a.decode, a.resume, a.segment, a.dtype, a.threads)
        return {"decode": {**dec, "fused_set_of": str(run)}} if dec else {}
    run = work / f"run-p{p}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(base, run, ignore=shutil.ignore_patterns("saliency", "synthetic"))
    for f in (run / "stages").glob("*"):
        if f.name.startswith(("saliency", "fuse", "decode")):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    fuse = timed([*pre, "fuse", "--run", str(run), "--per-class", str(per), "--quiet"], _env(a.threads))
    dec = _decode(run, pre, a.decode, dtype=a.dtype, threads=a.threads) if a.decode else None
    n_train = int((pd.read_csv(run / "samples.csv")["split"] == "train").sum())
    maps = RunStore(run).stage(next(k for k in RunStore(run).stages() if k.startswith("saliency")))
    n_head = int((pd.read_csv(next((run / "saliency").glob("*/maps.csv")))["role"] == "head").sum())
    return {
        "fuse": {**fuse, "latents": a.n, "train_latents_with_maps": maps["n_maps"], "fused": n_fused,
                 "maps_per_second": round(maps["n_maps"] / fuse["seconds"], 1),
                 "neighbour_index_bytes": n_head * 64 * 64 * 4, "n_train": n_train},
        **({"decode": dec} if dec else {}),
    }


def _mib(rss: list[int], p: int) -> str:
    return ", ".join(str(round(b / 2**20)) for b in rss[: p + 2])


def main() -> int:
    ap = parser(__doc__, threads=1,
                threads_help="torch threads of each timed tailfuse process (OMP_NUM_THREADS) and of this one")
    ap.add_argument("--source", required=True, help="an encoded run (ISIC2018-LT, TAESD) whose latents are tiled")
    ap.add_argument("--work", required=True, help="scratch folder for the big runs")
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--fuse-count", type=int, default=2000, help="fused latents made (spread over the tail labels)")
    ap.add_argument("--decode", type=int, default=2000, help="fused latents decoded (0: time fuse only)")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--fused-run", help="time decode alone, of the fused set in this folder (a run-pN an earlier "
                                        "call left in --work); fuse is not run")
    ap.add_argument("--segment", type=float, metavar="SECONDS",
                    help="with --fused-run and one process count: stop decode after this long (its finished shards "
                         "stay) and write no table; --resume goes on with it")
    ap.add_argument("--resume", action="store_true", help="with --fused-run: go on with a decode --segment stopped")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="decode's VAE dtype (default float32)")
    ap.add_argument("--merge", action="append", default=[], metavar="JSON",
                    help="an earlier result file of this script whose figures join this table (repeatable)")
    ap.add_argument("--tag", default="", help="suffix of the result files: scale-<tag>.json / .md")
    a = parse(ap)
    if a.fused_run and not a.decode:
        ap.error("--fused-run times decode alone: give --decode N (N >= 1)")
    if (a.segment or a.resume) and (not a.fused_run or "," in a.processes):
        ap.error("--segment and --resume need --fused-run and one process count")
    work = Path(a.work)
    base = build_run(Path(a.source), work, a.n)
    train_small(base, work)
    tail = json.loads((base / "labels.json").read_text())["tail_labels"]
    per = max(1, a.fuse_count // len(tail))
    command = command_line()
    load = Load()
    results: dict[int, dict] = {}
    for p in [int(x) for x in a.processes.split(",")]:
        got = _measure(a, work, base, p, per, int(per * len(tail)))
        if not got:
            seg = json.loads((Path(a.fused_run) / "dec-segments.json").read_text())
            print(f"decode stopped after {seg[-1]['seconds']} s ({seg[-1]['after']}); the same command with --resume "
                  f"(and without --segment, or with another) goes on with it. No table written.")
            return 3
        results[p] = {k: {**v, "command": command} for k, v in got.items()}
        print(json.dumps({p: results[p]}, indent=1))
    calls = [{"command": command, **load.record()}]
    for f in a.merge:  # earlier calls: their figures where this one has none
        old = json.loads(Path(f).read_text())
        calls += old.get("calls") or [{k: old[k] for k in ("command", "load_average_at_start", "load_average_at_end")}]
        for p, r in old["results"].items():
            r = {k: {"command": old["command"], **v} if isinstance(v, dict) else v for k, v in r.items()}
            results[int(p)] = {**r, **results.get(int(p), {})}
    results = dict(sorted(results.items()))
    r1, r2 = results.get(1, {}), results.get(2, {})
    speed = {k: round(r1[k]["seconds"] / r2[k]["seconds"], 2) for k in ("fuse", "decode") if k in r1 and k in r2}
    res = {**provenance(load, a), "calls": calls, "results": results, "speedup_2_over_1": speed}
    n_dec = {r["decode"]["images"] for r in results.values() if "decode" in r}
    what = f", decode {', '.join(f'{x:,}' for x in sorted(n_dec))} of them" if n_dec else " (no decode: --decode 0)"
    md = [f"# Large run: fuse over {a.n:,} latents of 4 x 64 x 64{what} (processes: "
          f"{', '.join(map(str, results))}; {'one thread' if a.threads == 1 else f'{a.threads} threads'} each)", ""]
    md += ([f"Command: `{command}`"] if len(calls) == 1 else
           ["Made in parts (each stage's figures carry their call in the JSON); the calls and their load averages:", ""]
           + [f"- `{c['command']}`: {Load(c['load_average_at_start']).footer(c['load_average_at_end'])}." for c in calls])
    md += ["",
           "| processes | stage | wall (s) | throughput | peak RSS per process (MiB) |", "|---|---|---|---|---|"]
    index = None
    for p, r in results.items():
        if "fuse" in r:
            f = r["fuse"]
            index = index or f.get("neighbour_index_bytes", r.get("neighbour_index_bytes"))
            md.append(f"| {p} | fuse ({f['train_latents_with_maps']} saliency maps, {f['fused']} fused) | {f['seconds']} | "
                      f"{f['maps_per_second']} maps/s | {_mib(f['peak_rss_bytes_per_process'], p)} |")
        if "decode" in r:
            d = r["decode"]
            extra = (", pixel detail" if d["settings"].get("pixel_detail") else "") \
                + (f", {d['dtype']}" if d.get("dtype", "float32") != "float32" else "")
            parts = f"; {len(d['segments'])} segments: {' + '.join(str(x['seconds']) for x in d['segments'])} s" \
                if d.get("segments") else ""
            md.append(f"| {p} | decode ({d['images']} images, 512 px{extra}{parts}) | {d['seconds']} | "
                      f"{d['images_per_second']} images/s | {_mib(d['peak_rss_bytes_per_process'], p)} |")
    md += ["", f"Speed-up of 2 one-thread processes over 1: {speed}."
           + (f" Neighbour index (the head pool's maps, float32): {index / 2**20:.0f} MiB." if index else "")
           + f" {platform.platform()}" + ("." if len(calls) > 1 else f"; {load.footer()}.")]
    write_results(a.out, f"scale{'-' + a.tag if a.tag else ''}", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
