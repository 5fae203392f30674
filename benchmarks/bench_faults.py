"""Reliability benchmark (issue 11): kills survived by every stage, and the bad-input corpus.

    python benchmarks/bench_faults.py [--isic ../shared/data/isic2018_lt] [--vae ../shared/models/taesd] [--kills 5]

Runs the fault harness (benchmarks/fault_harness.py: SIGKILL at random points, resume, compare with an
uninterrupted run) with --kills kills per stage on a small real run (ISIC2018-LT, 2 images per label and split,
TAESD), then the bad-input corpus (tests/test_corpus.py: images, manifests, options and run folders, each with its
expected message or skip reason and no traceback) and the full-disk test (tests/test_faults.py), and writes
benchmarks/results/reliability.json and .md.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import fault_harness  # noqa: E402
from _results import Load, parse, parser, provenance, write_results  # noqa: E402


def main() -> int:
    ap = parser(__doc__, threads=fault_harness.THREADS, vae=True, data="isic2018_lt", data_flag="--isic",
                data_help="the ISIC2018-LT folder",
                threads_help="torch threads of this process and OMP_NUM_THREADS of every tailfuse process the "
                             "harness starts")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = parse(ap)
    fault_harness.THREADS = a.threads
    from conftest import subset_manifest

    load = Load()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = subset_manifest(Path(a.isic), Path(tmp) / "in" / "m.csv", per_label=2)
        res = fault_harness.run_harness(Path(tmp) / "h", manifest, Path(a.vae), kills=a.kills, seed=a.seed)
    env = {**os.environ, "TAILFUSE_SHARED": str(Path(a.isic).parents[1]), "TAILFUSE_VAE": a.vae,
           "TAILFUSE_REQUIRE_SHARED": "1", "PYTHONPATH": str(HERE.parent / "src")}
    corpus = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(HERE.parent / "tests" / "test_corpus.py"),
                             str(HERE.parent / "tests" / "test_faults.py") + "::test_a_full_disk_fails_with_one_line_and_the_next_run_resumes"],
                            env=env, capture_output=True, text=True, cwd=HERE.parent)
    summary = [x for x in corpus.stdout.splitlines() if "passed" in x or "failed" in x][-1:]
    res = {**provenance(load, a), **res, "corpus_pytest": summary, "corpus_ok": corpus.returncode == 0}
    per = {}
    for t in res["trials"]:
        p = per.setdefault(t["stage"], {"trials": 0, "killed": 0, "identical": 0, "files": 0, "left": 0})
        p["trials"] += 1
        p["killed"] += int(t["killed"])
        p["identical"] += int(t["killed"] and t.get("identical", False))
        p["files"] += t.get("files_compared", 0)
        p["left"] += len(t.get("leftover_temporary_files", []))
    md = ["# Reliability: kills survived, bad inputs handled", "", f"Command: `{res['command']}`", "",
          "Each stage of a small real run (ISIC2018-LT, 2 images per label and split, TAESD) was killed with SIGKILL "
          "at a random moment (5 % to 90 % of its uninterrupted wall time), rerun with the same command, and its "
          "outputs compared byte for byte with an uninterrupted run's (evaluate: every test prediction and metric).", "",
          "| stage | trials | killed while running | identical after resume | files compared | temporary files left |",
          "|---|---|---|---|---|---|"]
    for st, p in per.items():
        md.append(f"| {st} | {p['trials']} | {p['killed']} | {p['identical']} | {p['files']} | {p['left']} |")
    md += ["", f"Total: {res['kills']} kills, {res['kills_survived_identical']} survived with identical output; "
           f"{res['files_compared']} files compared. Uninterrupted seconds per stage: {res['reference_seconds']}.", "",
           "Bad-input corpus (tests/test_corpus.py, built from real ISIC images) and the simulated full disk "
           f"(tests/test_faults.py): {' '.join(summary)}; every case ends in a one-line message or a reported skip "
           "and never a traceback: 13 image files (truncated, zero-byte, text with an image extension, 1x1, "
           "3000x2400, 16-bit, RGBA, CMYK, symbolic-link loop, folder named like an image, over-long path, unicode "
           "and spaces), 10 manifests (empty, header only, no labels, a value other than 0/1, an empty label, a "
           "single label, a bad split, duplicate paths; BOM with CRLF and semicolons read like any CSV), 4 options "
           "(--per-class -1, --image-size 100 and 0, --refine 60/50: refused before any work) and 5 run-folder "
           "cases (another dataset, a concurrent writer, a stale lock, another user's or a read-only folder, a full "
           "disk).", "",
           f"{platform.platform()}; {load.footer()}."]
    write_results(a.out, "reliability", res, md)
    return 0 if res["kills_survived_identical"] == res["kills"] and res["corpus_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
