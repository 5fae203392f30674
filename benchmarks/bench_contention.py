"""Speed on a shared machine (issue 28): each stage's wall time alone and beside one competing CPU-bound job.

    python benchmarks/bench_contention.py          # --data and --vae default to the shared folder's ISIC and TAESD

Prepares, once (untimed), a small run of --n images (default 340, the issue's 341-image case) at 128 px in --work:
encoded, trained, features cached. Then times each stage (--stages) from a fresh copy of that run, in a subprocess
(`tailfuse <stage> ... --threads T` for each T of --stage-threads), alone and beside each competitor of --competitors:

    numpy1 / numpy2   a numpy matrix-product loop on 1 / 2 threads, started as a job of its own (its own session,
                      as another user's job would be: on Linux with autogroup scheduling that is what shares the
                      cores fairly between jobs)

Writes benchmarks/results/contention.json and .md: each stage's seconds and its slowdown (beside / alone at the same
thread count). A fair share of 2 cores with one competitor is a 2x slowdown. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _results import Load, parse, parser, provenance, write_results  # noqa: E402

COMPETITOR = "import numpy as np\na = np.random.rand(700, 700)\nwhile True:\n    a = (a @ a) / 700.0\n"

# each stage: the command on a copy of the prepared run (the copy holds what the stage needs, nothing it makes)
STAGES = {
    "train": (["train", "--generations", "2", "--epochs", "6", "--imitation-epochs", "2"], "encoded"),
    "fuse": (["fuse", "--per-class", "20"], "trained"),
    "train-prior": (["train-prior", "--epochs", "20"], "encoded"),
    "evaluate-linear": (["evaluate", "--arms", "real,oversample", "--seeds", "0", "--no-quality", "--bootstrap", "200"],
                        "trained"),
    "report": (["report"], "decoded"),
}


def tailfuse(args: list[str], threads: int | None = None, env: dict | None = None, cap: float | None = None) -> float | None:
    """The command's wall time; None when it ran past ``cap`` seconds (it is then stopped)."""
    t = time.time()
    extra = ["--threads", str(threads)] if threads else []
    try:
        subprocess.run([sys.executable, "-m", "tailfuse", *args, *extra, "--quiet"], check=True, timeout=cap,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    except subprocess.TimeoutExpired:
        return None
    return time.time() - t


def prepare(data: str, vae: str, work: Path, n: int) -> dict[str, Path]:
    """encoded -> trained -> decoded copies of one small run (each made once; rerunning reuses them)."""
    work.mkdir(parents=True, exist_ok=True)
    man = pd.read_csv(data)
    base = Path(data).resolve().parent
    sub = man.sample(n=min(n, len(man)), random_state=0).copy()
    path_col = "path" if "path" in sub.columns else sub.columns[0]
    sub[path_col] = [str((base / p).resolve()) for p in sub[path_col]]
    manifest = work / "manifest.csv"
    sub.to_csv(manifest, index=False)
    runs = {k: work / k for k in ("encoded", "trained", "decoded")}
    if not (runs["encoded"] / "stages" / "encode.json").is_file():
        tailfuse(["encode", "--data", str(manifest), "--vae", vae, "--run", str(runs["encoded"]), "--image-size", "128"])
    if not (runs["trained"] / "stages" / "train.json").is_file():
        shutil.rmtree(runs["trained"], ignore_errors=True)
        shutil.copytree(runs["encoded"], runs["trained"])
        tailfuse(["train", "--run", str(runs["trained"]), *STAGES["train"][0][1:]])
        # the evaluation's features and the report's scores are cached per image file: compute them now, untimed
        tailfuse(["evaluate", "--run", str(runs["trained"]), *STAGES["evaluate-linear"][0][1:]])
        shutil.rmtree(runs["trained"] / "eval", ignore_errors=True)
    if not (runs["decoded"] / "synthetic" / "manifest.csv").is_file():
        shutil.rmtree(runs["decoded"], ignore_errors=True)
        shutil.copytree(runs["trained"], runs["decoded"])
        tailfuse(["fuse", "--run", str(runs["decoded"]), "--per-class", "20"])
        tailfuse(["decode", "--run", str(runs["decoded"])])
    return runs


def start_competitor(kind: str) -> subprocess.Popen | None:
    if kind == "none":
        return None
    n = {"numpy1": "1", "numpy2": "2"}[kind]
    env = {**os.environ, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    p = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env, start_new_session=True)
    time.sleep(3)  # running at full speed before the stage starts
    return p


def stop(p: subprocess.Popen | None) -> None:
    if p is not None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _stage_records(run: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (run / "stages").glob("*.json")}


def time_stage(stage: str, runs: dict[str, Path], scratch: Path, threads: int | None,
               cap: float | None = None) -> tuple[float | None, float | None, list | None]:
    """The command's wall time (process start included; None past ``cap``), the seconds its new stage records report
    (None for commands without a stage record: evaluate, report) and the thread counts they record having used."""
    args, source = STAGES[stage]
    run = scratch / f"{stage}-run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(runs[source], run)
    if stage == "report":
        shutil.rmtree(run / "synthetic" / "report", ignore_errors=True)
    before = set(_stage_records(run))
    try:
        wall = tailfuse([args[0], "--run", str(run), *args[1:]], threads, cap=cap)
        if wall is None:
            return None, None, None
        new = [r for k, r in _stage_records(run).items() if k not in before and "seconds" in r]
        used = sorted({n for r in new for n in ((r.get("runtime") or {}).get("threads_used")
                                                or [(r.get("runtime") or {}).get("threads")]) if n})
        return wall, (round(sum(float(r["seconds"]) for r in new), 1) if new else None), used or None
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _summary(rows: list[dict]) -> list[str]:
    """Per stage: idle speed of the default against --threads 2 (the count before), and the worst slowdowns."""
    out = ["", "Per stage: the default's wall time alone against `--threads 2` (before the stages adapted; the median "
           "where a setting was timed alone more than once), and the worst wall slowdown beside a competitor at each "
           "setting.", "",
           "| stage | alone, default (s) | alone, --threads 2 (s) | idle change | worst slowdown, default | "
           "worst slowdown, --threads 2 |", "|---|---|---|---|---|---|"]

    def worst(stage, th):
        vals = [r["wall_slowdown"] for r in rows if r["stage"] == stage and r["threads"] == th
                and r["competitor"] != "none" and r["wall_slowdown"] is not None]
        capped = [v for v in vals if isinstance(v, str)]
        return (max(capped, key=lambda v: float(v[1:])) + "x") if capped else (f"{max(vals)}x" if vals else "–")

    for stage in dict.fromkeys(r["stage"] for r in rows):
        alone = {}  # the median over repeats (and over a setting listed twice in --stage-threads, e.g. 0,2,0,2)
        for th in ("default", 2):
            v = [r["wall_seconds"] for r in rows if r["stage"] == stage and r["threads"] == th
                 and r["competitor"] == "none" and not isinstance(r["wall_seconds"], str)]
            alone[th] = round(statistics.median(v), 1) if v else None
        d, t2 = alone["default"], alone[2]
        change = f"{(d / t2 - 1) * 100:+.0f} %" if d and t2 else "–"
        out.append(f"| {stage} | {d or '–'} | {t2 or '–'} | {change} | {worst(stage, 'default')} | "
                   f"{worst(stage, 2)} |")
    return out


def main() -> int:
    ap = parser(__doc__, threads=None, vae=True, data="isic2018_lt/manifest.csv",
                data_help="manifest of the dataset to subsample")
    ap.add_argument("--n", type=int, default=340, help="images in the small run (default 340)")
    ap.add_argument("--work", default="runs/bench-contention", help="where the prepared run and copies go")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    ap.add_argument("--stage-threads", default="0,2", help="the stages' thread counts to time (0: no --threads, the "
                    "default; 2 on a 2-core machine is what the default was before the stages adapted their count)")
    ap.add_argument("--competitors", default="none,numpy1,numpy2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cap", type=float, default=240, help="stop a stage after this many seconds and record it as "
                    "'over CAP s' (default 240)")
    ap.add_argument("--stem", default="contention")
    a = parse(ap)
    load = Load()
    work = Path(a.work)
    runs = prepare(a.data, a.vae, work, a.n)
    scratch = work / "scratch"
    rows = []
    for stage in a.stages.split(","):
        for th in [int(x) for x in a.stage_threads.split(",")]:
            alone = alone_wall = None
            for comp in a.competitors.split(","):
                for rep in range(a.repeats):
                    l0 = os.getloadavg()[0]
                    p = start_competitor(comp)
                    try:
                        wall, inner, used = time_stage(stage, runs, scratch, th or None, a.cap)
                    finally:
                        stop(p)
                    if wall is None:  # stopped at the cap: the slowdown is at least cap / alone
                        rows.append({"stage": stage, "threads": th or "default", "competitor": comp, "repeat": rep,
                                     "seconds": None, "wall_seconds": f">{a.cap:g}",
                                     "slowdown": None,
                                     "wall_slowdown": f">{a.cap / alone_wall:.1f}" if alone_wall else None,
                                     "threads_used": None, "load_1min_at_start": round(l0, 2)})
                        print(json.dumps(rows[-1]), flush=True)
                        continue
                    s = inner if inner is not None else wall  # the stage's own seconds where it records them
                    if comp == "none" and alone is None:
                        alone, alone_wall = s, wall
                    rows.append({"stage": stage, "threads": th or "default", "competitor": comp, "repeat": rep,
                                 "seconds": round(s, 1), "wall_seconds": round(wall, 1),
                                 "slowdown": round(s / alone, 2) if alone else None,
                                 "wall_slowdown": round(wall / alone_wall, 2) if alone_wall else None,
                                 "threads_used": used, "load_1min_at_start": round(l0, 2)})
                    print(json.dumps(rows[-1]), flush=True)
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    res = {"rows": rows, "sched_autogroup": autogroup.read_text().strip() if autogroup.exists() else None,
           **provenance(load, a)}
    md = ["# Stage speed alone and beside one competing CPU-bound job (issue 28)", "",
          f"Command: `{res['command']}`", "",
          f"A {a.n}-image ISIC2018-LT subset at 128 px. Competitors: a numpy matrix-product loop on 1 or 2 threads, "
          "started as a job of its own. Threads: `default` is no `--threads` (the stages adapt their count to the CPUs "
          "other jobs leave free); 2 is `--threads 2`, a fixed count, which on this 2-core machine is what every stage "
          "ran with before they adapted (torch's default; the BLAS's own default too). Seconds: the stage records' "
          "own (train, fuse, train-prior), else the command's wall time (evaluate, report); wall seconds: the whole "
          "command, process start included. Slowdown: beside the competitor / alone at the same thread setting; a fair "
          "share of 2 cores with one competitor is 2x. Threads used: the counts the stage records it ran with. A stage "
          f"still running after {a.cap:g} s was stopped: its wall slowdown is at least {a.cap:g} s over its wall time "
          "alone.", "",
          "| stage | threads | competitor | seconds | wall seconds | slowdown | wall slowdown | threads used "
          "| load at start |",
          "|---|---|---|---|---|---|---|---|---|"]
    dash = "–"
    for r in rows:
        md.append(f"| {r['stage']} | {r['threads']} | {r['competitor']} | "
                  f"{r['seconds'] if r['seconds'] is not None else dash} | {r['wall_seconds']} | "
                  f"{str(r['slowdown']) + 'x' if r['slowdown'] is not None else dash} | {r['wall_slowdown']}x | "
                  f"{','.join(map(str, r['threads_used'] or [])) or dash} | {r['load_1min_at_start']} |")
    md += _summary(rows)
    md += ["", f"{res['machine']['platform']}, {res['machine']['cpus']} CPUs; autogroup scheduling "
           f"{res['sched_autogroup']}; {load.footer()}."]
    write_results(a.out, a.stem, res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
