"""VAE layout benchmark: TAESD encode and decode on CPU in NCHW (contiguous) against channels-last layout.

    python benchmarks/bench_codec_layout.py [--vae ../shared/models/taesd] [--data ../shared/data/isic2018_lt] [--threads 1]

For each image size (128 px, the default; 512 px, Stable Diffusion's native size) it encodes and decodes real
ISIC2018-LT images with one `VAECodec` in each layout, with --threads torch threads, and reports the best of
--repeats timings per batch, the speed-up, and the largest difference between the two layouts' outputs (latents,
and decoded images in [0, 1] and in 8-bit PNG levels). Writes benchmarks/results/codec-layout.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from _results import Load, parse, parser, provenance, write_results  # noqa: E402
from tailfuse.codec import VAECodec  # noqa: E402
from tailfuse.images import load_image  # noqa: E402


def _best(fn, x, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(x)
        times.append(time.perf_counter() - t)
    return min(times), out


def codec_bench_args(doc: str) -> argparse.ArgumentParser:
    """The options the codec benchmarks share: the common ones (--out, --threads default 1, --vae, --data) and
    --repeats."""
    ap = parser(doc, threads=1, vae=True, data="isic2018_lt", data_help="a dataset folder with images/ (ISIC2018-LT)")
    ap.add_argument("--repeats", type=int, default=3)
    return ap


def real_batches(data: str):
    """Yields (size, batch, images in [0, 1]) of the dataset's first real images at 128 px (the default, a batch of
    32) and 512 px (Stable Diffusion's native size, a batch of 4)."""
    files = sorted(Path(data, "images").glob("*.png"))[:32]
    for size, batch in ((128, 32), (512, 4)):
        yield size, batch, torch.stack([load_image(str(f), size) for f in files[:batch]])


def time_codec(codec: VAECodec, x: torch.Tensor, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of encoding ``x`` and decoding its latents, with the latents and images."""
    te, z = _best(codec.encode, x, repeats)
    td, y = _best(codec.decode, z, repeats)
    return {"encode_s": te, "decode_s": td, "z": z, "y": y}


def png_levels(images01: torch.Tensor) -> torch.Tensor:
    """The 8-bit levels save_png writes for images in [0, 1]."""
    return (images01 * 255).round()


def main() -> int:
    a = parse(codec_bench_args(__doc__))  # sets torch's thread count to --threads
    load = Load()
    rows = []
    for size, batch, x in real_batches(a.data):
        res = {}
        for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            codec = VAECodec.load(a.vae)
            codec.memory_format = fmt
            codec.vae.to(memory_format=fmt)
            res[layout] = time_codec(codec, x, a.repeats)
        n, c = res["nchw"], res["channels_last"]
        rows.append({"size": size, "batch": batch, "threads": a.threads,
                     **{f"{k}_{layout}_s": round(res[layout][f"{k}_s"], 3) for k in ("encode", "decode")
                        for layout in res},
                     "encode_speedup": round(n["encode_s"] / c["encode_s"], 2),
                     "decode_speedup": round(n["decode_s"] / c["decode_s"], 2),
                     "max_latent_diff": float((n["z"] - c["z"]).abs().max()),
                     "max_image_diff": float((n["y"] - c["y"]).abs().max()),
                     "png_levels_differing_fraction": float((png_levels(n["y"]) != png_levels(c["y"])).float().mean()),
                     "max_png_level_diff": float((png_levels(n["y"]) - png_levels(c["y"])).abs().max())})
        print(json.dumps(rows[-1]))
    res = {**provenance(load, a), "rows": rows, "torch": torch.__version__}
    md = ["# TAESD on CPU: NCHW against channels-last layout (seconds per batch, best of "
          f"{a.repeats}; {a.threads} thread(s))", "", f"Command: `{res['command']}`", "",
          "| size | batch | encode NCHW | encode channels-last | speed-up | decode NCHW | decode channels-last | speed-up "
          "| max latent diff | max image diff | PNG levels that differ |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['size']} px | {r['batch']} | {r['encode_nchw_s']} | {r['encode_channels_last_s']} | "
                  f"{r['encode_speedup']}x | {r['decode_nchw_s']} | {r['decode_channels_last_s']} | {r['decode_speedup']}x | "
                  f"{r['max_latent_diff']:.1e} | {r['max_image_diff']:.1e} | {100 * r['png_levels_differing_fraction']:.3f} % "
                  f"(at most {r['max_png_level_diff']:.0f} level) |")
    md += ["", f"torch {torch.__version__}; {platform.platform()}; {load.footer()}."]
    write_results(a.out, "codec-layout", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
