"""Iterated-learning benchmark: `tailfuse train` with default settings, and the --no-imitation ablation.

    python benchmarks/bench_train.py --data ../shared/data/isic2018_lt/manifest.csv --vae ../shared/models/taesd

Encodes the data into --run (default runs/bench-isic; skipped when done), trains the default model and the
--no-imitation model (each timed, in a subprocess: `tailfuse train --run <run> [--no-imitation]`), then writes
benchmarks/results/train-<tag>.json and .md with per-generation metrics, final figures, per-label val AP and the
decoded PSNR. Bars (issue 3): sparsity >= 0.7, recon_rel_l1 <= 0.5, recon_rel_l1_hard <= 0.6, < 20 min.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tailfuse(*args: str) -> float:
    t = time.time()
    subprocess.run([sys.executable, "-m", "tailfuse", *args, "--quiet"], check=True)
    return time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--vae", required=True)
    ap.add_argument("--run", default="runs/bench-isic")
    ap.add_argument("--tag", default="isic2018_lt")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--skip-train", action="store_true", help="only (re)write the tables from finished runs")
    args = ap.parse_args()

    enc_s = tailfuse("encode", "--data", args.data, "--vae", args.vae, "--run", args.run)
    secs = {}
    for name, extra in (("train", []), ("train-no-imitation", ["--no-imitation"])):
        if not args.skip_train:
            secs[name] = tailfuse("train", "--run", args.run, *extra)
    run = Path(args.run)
    result = {"command": f"python benchmarks/bench_train.py --data {args.data} --vae {args.vae} --run {args.run}",
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "encode_seconds_this_call": round(enc_s, 1), "models": {}}
    for name in ("train", "train-no-imitation"):
        rec = json.loads((run / "stages" / f"{name}.json").read_text())
        rows = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
        result["models"][name] = {"train_seconds": rec["seconds"], "wall_seconds_this_call": round(secs.get(name, 0), 1),
                                  "init": rec.get("init"), "generations": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train-{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")

    md = [f"# train benchmark: {args.tag}", "", f"Command: `{result['command']}`", "",
          f"Machine: {result['machine']}. Metrics on the val split; recon = mean |D(code) - z| / mean |mu - z| "
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
    (out / f"train-{args.tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
