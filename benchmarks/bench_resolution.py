"""Image size against time: the same small ELPV run at --image-size 128 and 256 (the README's "Image size").

    python benchmarks/bench_resolution.py [--vae ../shared/models/taesd] [--per-grade 40] [--threads 2]

For each size, in a fresh run folder: encode (ELPV images, 300 px originals, `per_grade` of each grade), train (one
generation of 2 interaction epochs: the time per epoch scales with the latent grid, 16x16 at 128 px and 32x32 at
256 px), fuse + decode 16 images per tail grade with the demo's settings. Writes
benchmarks/results/resolution.{json,md} with seconds per image / epoch, the ratio 256 / 128 and the load average.
Run it alone: the times are wall-clock on a shared machine.
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from _results import Load, parse, parser, provenance, write_results  # noqa: E402


def one_size(size: int, vae: str, per_grade: int, root: Path) -> dict:
    from tailfuse.decode import run_decode
    from tailfuse.demo import demo_configs, elpv_manifest
    from tailfuse.encode import run_encode
    from tailfuse.fusion.stage import run_fuse
    from tailfuse.train import run_train

    run = root / f"s{size}"
    manifest = elpv_manifest(root / "data" / "manifest.csv", copy=True, per_grade=per_grade)
    cfg = demo_configs(manifest, vae, "cpu")
    cfg["data"].image_size = size
    cfg["train"].generations, cfg["train"].epochs, cfg["train"].imitation_epochs = 1, 2, 1
    cfg["fuse"].per_class = 16
    out = {"image_size": size}
    t = time.time()
    enc = run_encode(cfg["data"], cfg["vae"], cfg["encode"], str(run), progress=False)
    out["encode_s_per_image"] = (time.time() - t) / enc["n_encoded"]
    t = time.time()
    run_train(str(run), cfg["train"], progress=False)
    out["train_s_per_epoch"] = (time.time() - t) / cfg["train"].epochs
    t = time.time()
    fuse = run_fuse(str(run), cfg["fuse"], progress=False)
    dec = run_decode(str(run), cfg["decode"], progress=False)
    out["fuse_decode_s_per_image"] = (time.time() - t) / dec["n_images"]
    out["n_images"] = enc["n_encoded"]
    out["n_synthetic"] = int(fuse["n_synthetic"])
    return out


def main() -> int:
    ap = parser(__doc__, threads=2, vae=True)
    ap.add_argument("--per-grade", type=int, default=40)
    a = parse(ap)  # sets torch's thread count to --threads
    load = Load()
    root = Path(tempfile.mkdtemp(prefix="tailfuse-res-"))
    try:
        rows = [one_size(s, a.vae, a.per_grade, root) for s in (128, 256)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    keys = ("encode_s_per_image", "train_s_per_epoch", "fuse_decode_s_per_image")
    ratio = {k: rows[1][k] / rows[0][k] for k in keys}
    res = {**provenance(load, a), "rows": rows, "ratio_256_over_128": ratio}
    md = ["# Image size against time (ELPV, TAESD, CPU)", "", f"Command: `{res['command']}`", "",
          f"{platform.platform()}, {a.threads} torch threads; load average {load.start[0]:.1f} at the start, "
          f"{res['load_average_at_end'][0]:.1f} at the end. {rows[0]['n_images']} images; training per epoch over them.",
          "", "| image size | encode (s / image) | train (s / epoch) | fuse + decode (s / image) |", "|---|---|---|---|"]
    md += [f"| {r['image_size']} | {r['encode_s_per_image']:.4f} | {r['train_s_per_epoch']:.2f} | "
           f"{r['fuse_decode_s_per_image']:.4f} |" for r in rows]
    md += [f"| 256 / 128 | {ratio['encode_s_per_image']:.1f}x | {ratio['train_s_per_epoch']:.1f}x | "
           f"{ratio['fuse_decode_s_per_image']:.1f}x |"]
    write_results(a.out, "resolution", res, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
