"""Evaluation benchmark: the full downstream table of one run folder, copied into benchmarks/results/.

    python benchmarks/bench_evaluate.py --run runs/bench-isic --tag isic2018_lt [--threads 2] [-- evaluate flags]
    python benchmarks/bench_evaluate.py --data ../shared/data/isic2018_lt/manifest.csv --vae ../shared/models/taesd \
        --run runs/bench-isic --tag isic2018_lt-5fold -- --folds 5 --budgets 0.5,1,2,5
    python benchmarks/bench_evaluate.py --data elpv --vae ../shared/models/taesd --run runs/bench-elpv --tag elpv

With ``--data`` (a manifest, or ``elpv`` for the whole ELPV set of the PyPI package elpv-dataset, its cell type as
metadata), the run folder is prepared first when needed: `tailfuse encode` and `tailfuse train` with defaults (each
skipped when done). The 'train-no-imitation' model is trained by `tailfuse evaluate` when an arm needs it (its time
is reported apart). Runs `tailfuse evaluate --run <run>` with the default protocol plus any flags given after `--`,
then copies

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
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from _results import Load, child_env, parse, parser, provenance, write_results  # noqa: E402
from tailfuse.cli import setup_logging  # noqa: E402
from tailfuse.evaluation.cli_args import add_evaluate_parser, cmd_evaluate  # noqa: E402


def prepare(run: Path, data: str, vae: str | None, threads: int) -> dict:
    """encode + train with defaults into ``run`` (each skipped when done); the ELPV manifest when data == 'elpv'."""
    import subprocess

    if data == "elpv":
        from tailfuse.demo import elpv_manifest

        data = str(elpv_manifest(run.parent / f"{run.name}-data" / "manifest.csv", head_cap=None))
        extra = ["--metadata-columns", "cell_type"]
    else:
        extra = []
    env = child_env(threads)
    out = {"data": data}
    for stage, args in (("encode", ["--data", data, *extra, *(["--vae", vae] if vae else [])]), ("train", [])):
        t = time.time()
        subprocess.run([sys.executable, "-m", "tailfuse", stage, "--run", str(run), *args, "--quiet"], check=True, env=env)
        out[f"{stage}_wall_seconds_this_call"] = round(time.time() - t, 1)
    return out


def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = parser(__doc__, threads=2,
                threads_help="torch threads (this process, `tailfuse evaluate --threads`, and OMP_NUM_THREADS of "
                             "the encode and train that --data runs)")
    ap.add_argument("--run", required=True, help="run folder (encode + train done, or made with --data)")
    ap.add_argument("--data", help="manifest to encode into --run first (or 'elpv': the whole ELPV set)")
    ap.add_argument("--vae", help="VAE folder for --data (default $TAILFUSE_VAE)")
    ap.add_argument("--tag", required=True, help="name of the result files (e.g. isic2018_lt)")
    ap.add_argument("--fresh", action="store_true", help="drop cached arm results first (features stay cached)")
    ap.add_argument("--note", help="a sentence written into both result files (conditions of the measurement)")
    a = parse(ap, argv)  # sets torch's thread count to --threads
    run = Path(a.run)
    load = Load()
    prep = prepare(run, a.data, a.vae, a.threads) if a.data else None
    if a.fresh and (run / "eval" / "cache").is_dir():
        shutil.rmtree(run / "eval" / "cache")
    p = argparse.ArgumentParser(prog="tailfuse")
    add_evaluate_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["evaluate", "--run", str(run), "--threads", str(a.threads), *extra])
    setup_logging(args)  # as tailfuse's own CLI does
    t = time.time()
    rc = cmd_evaluate(args)
    wall = time.time() - t
    if rc:
        return rc
    out = Path(a.out)
    res_dir = Path(getattr(args, "output", None) or run / "eval")  # cmd_evaluate records where it wrote (folds: a subfolder)
    res = json.loads((res_dir / "results.json").read_text())
    # the evaluation's own "command" (tailfuse evaluate ...) stays at the top; this script's record is "benchmark"
    res["benchmark"] = {
        **provenance(load, a),
        "evaluate_command": res.get("command"),
        "wall_seconds": round(wall, 1),
        # CPU time of this process (user + system); with 2 cores and no other load, wall ~ cpu / 2
        "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "prepared": prep,
        "seconds_per_arm": {arm: e.get("seconds") for arm, e in res["arms"].items()},
        "note": a.note,
    }
    bench_cmd = res["benchmark"]["command"]
    md = (res_dir / "results.md").read_text().rstrip("\n").split("\n")
    md += ["", f"Produced by `{bench_cmd}` (wall {wall / 60:.1f} min on {os.cpu_count()} CPUs, {a.threads} torch "
               f"threads; {platform.platform()}; CPU time {res['benchmark']['cpu_seconds'] / 60:.1f} min; "
               f"{load.footer()})."] + (["", a.note] if a.note else [])
    write_results(out, f"evaluate-{a.tag}", res, md, echo=False, provenance_in=res["benchmark"])
    for png in sorted(Path(x) for x in res.get("plots") or []):  # this evaluation's plots, not older ones beside them
        shutil.copy(png, out / f"evaluate-{a.tag}-{png.name}")
    print(f"benchmark: wrote {out / f'evaluate-{a.tag}.json'} and .md ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
