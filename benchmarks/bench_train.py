"""Iterated-learning benchmark: `tailfuse train` with default settings, and the --no-imitation ablation.

    python benchmarks/bench_train.py [--data ../shared/data/isic2018_lt/manifest.csv] [--vae ../shared/models/taesd]

Encodes the data into --run (default runs/bench-isic; skipped when done), trains the default model and the
--no-imitation model (each timed, in a subprocess: `tailfuse train --run <run> [--no-imitation]`), then writes
benchmarks/results/train-<tag>.json and .md with per-generation metrics, final figures, per-label val AP and the
decoded PSNR. Bars (issue 3): sparsity >= 0.7, recon_rel_l1 <= 0.5, recon_rel_l1_hard <= 0.6, < 20 min.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _results import Load, child_env, parse, parser, provenance, write_results  # noqa: E402


def tailfuse(*args: str, env: dict | None = None) -> float:
    t = time.time()
    subprocess.run([sys.executable, "-m", "tailfuse", *args, "--quiet"], check=True, env=env)
    return time.time() - t


def main() -> None:
    ap = parser(__doc__, threads=None, vae=True, data="isic2018_lt/manifest.csv", data_help="a manifest",
                threads_help="torch threads of this process, and OMP_NUM_THREADS of the tailfuse commands it runs")
    ap.add_argument("--run", default="runs/bench-isic")
    ap.add_argument("--tag", default="isic2018_lt")
    ap.add_argument("--skip-train", action="store_true", help="only (re)write the tables from finished runs")
    args = parse(ap)
    env = child_env(args.threads)

    load = Load()
    enc_s = tailfuse("encode", "--data", args.data, "--vae", args.vae, "--run", args.run, env=env)
    secs = {}
    for name, extra in (("train", []), ("train-no-imitation", ["--no-imitation"])):
        if not args.skip_train:
            secs[name] = tailfuse("train", "--run", args.run, *extra, env=env)
    run = Path(args.run)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    result = {**provenance(load, args), "encode_seconds_this_call": round(enc_s, 1), "models": {}}
    for name in ("train", "train-no-imitation"):
        rec = json.loads((run / "stages" / f"{name}.json").read_text())
        rows = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
        result["models"][name] = {"train_seconds": rec["seconds"], "wall_seconds_this_call": round(secs.get(name, 0), 1),
                                  "init": rec.get("init"), "generations": rows}
    md = [f"# train benchmark: {args.tag}", "", f"Command: `{result['command']}`", "",
          f"Machine: {machine}. Metrics on the val split; recon = mean |D(code) - z| / mean |mu - z| "
          "(mu: per-element mean train latent); sparsity = mean largest channel probability.", ""]
    md += ["## Last generation", "",
           "| model | sparsity | entropy | recon soft | recon hard | recon spliced | val mAP | imitation agreement | codes used | PSNR soft / hard / mean-latent (dB) | train time (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        r = m["generations"][-1]
        ps = r.get("psnr_val") or {}
        ag = "-" if r.get("imitation_agreement") is None else f"{r['imitation_agreement']:.3f}"
        md.append(f"| {name} | {r['sparsity']:.3f} | {r['entropy']:.3f} | {r['recon_rel_l1']:.3f} | {r['recon_rel_l1_hard']:.3f} | "
                  f"{r['recon_rel_l1_mixed']:.3f} | {r['val_map']:.3f} | {ag} | {r['codes_used']} | "
                  f"{ps.get('soft', float('nan')):.1f} / {ps.get('hard', float('nan')):.1f} / {ps.get('mean_latent', float('nan')):.1f} | {m['train_seconds']:.0f} |")
    md += ["", "## Per generation", "", "| model | generation | sparsity | recon soft | recon hard | val mAP | imitation agreement |", "|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        if m["init"]:
            i = m["init"]
            md.append(f"| {name} | untrained | {i['sparsity']:.3f} | {i['recon_rel_l1']:.3f} | {i['recon_rel_l1_hard']:.3f} | {i['map']:.3f} | - |")
        for r in m["generations"]:
            ag = "-" if r.get("imitation_agreement") is None else f"{r['imitation_agreement']:.3f}"
            md.append(f"| {name} | {r['generation']} | {r['sparsity']:.3f} | {r['recon_rel_l1']:.3f} | {r['recon_rel_l1_hard']:.3f} | {r['val_map']:.3f} | {ag} |")
    labels = list(result["models"]["train"]["generations"][-1]["val_ap"])
    md += ["", "## Per-label val AP (last generation)", "", "| model | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for name, m in result["models"].items():
        ap = m["generations"][-1]["val_ap"]
        md.append(f"| {name} | " + " | ".join("-" if ap[l] is None else f"{ap[l]:.3f}" for l in labels) + " |")
    md += ["", f"{platform.platform()}; {load.footer()}."]
    write_results(args.out, f"train-{args.tag}", result, md)


if __name__ == "__main__":
    main()
