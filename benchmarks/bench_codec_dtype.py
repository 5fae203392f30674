"""VAE dtype benchmark: TAESD encode and decode on CPU in float32 (the default) against bfloat16 (`--dtype bfloat16`).

    python benchmarks/bench_codec_dtype.py [--vae ../shared/models/taesd] [--data ../shared/data/isic2018_lt] [--threads 1]

For each image size (128 px; 512 px, Stable Diffusion's native size) it encodes and decodes real ISIC2018-LT images
with one `VAECodec` per dtype (channels-last, as tailfuse runs on CPU), with --threads torch threads, and reports the
best of --repeats timings per batch, the speed-up, how far bfloat16's decoded images are from float32's (PSNR, and
the share of 8-bit PNG levels that differ), and each dtype's round-trip PSNR against the real images: what a user
gives up for the speed. Writes benchmarks/results/codec-dtype.json and .md.

End to end (optional): `--scale-results` takes two `bench_scale.py --decode N --fused-run RUN --dtype D` result files
(float32 first, then bfloat16) and `--images` the two decoded image folders they left (copies of RUN/dec/images);
their decode times and the PSNR of bfloat16's fused images against float32's join the table.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from _results import Load, parse, provenance, write_results  # noqa: E402
from bench_codec_layout import codec_bench_args, png_levels, real_batches, time_codec  # noqa: E402
from tailfuse.codec import VAECodec  # noqa: E402


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of images in [0, 1], over the whole batch."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else round(10 * torch.log10(torch.tensor(1.0 / mse)).item(), 2)


def _end_to_end(results: list[str], dirs: list[str] | None) -> dict:
    """The two bench_scale decode figures and, with ``dirs``, how far the bfloat16 images are from float32's."""
    import numpy as np
    from PIL import Image

    out = {}
    for dtype, f in zip(("float32", "bfloat16"), results):
        r = json.loads(Path(f).read_text())
        d = r["results"]["1"]["decode"]
        if d.get("dtype", "float32") != dtype:
            raise SystemExit(f"{f}: a decode in {d.get('dtype', 'float32')}, expected {dtype}")
        out[dtype] = {"seconds": d["seconds"], "images": d["images"], "round_trips": d["round_trips"],
                      "command": r["command"]}
    out["speedup"] = round(out["float32"]["seconds"] / out["bfloat16"]["seconds"], 2)
    if dirs:
        a, b = (Path(x) for x in dirs)
        mse, differ, top = [], [], 0.0
        files = sorted(a.rglob("*.png"))
        for p in files:
            x = np.asarray(Image.open(p), dtype=np.float64)
            y = np.asarray(Image.open(b / p.relative_to(a)), dtype=np.float64)
            mse.append(((x - y) ** 2).mean() / 255**2)
            differ.append((x != y).mean())
            top = max(top, float(np.abs(x - y).max()))
        out["images"] = {"files": len(files), "psnr_db": round(float(10 * np.log10(1 / np.mean(mse))), 2),
                         "min_psnr_db": round(float(10 * np.log10(1 / max(mse))), 2),
                         "levels_differing_fraction": round(float(np.mean(differ)), 4), "max_level_diff": top}
    return out


def main() -> int:
    ap = codec_bench_args(__doc__)
    ap.add_argument("--scale-results", nargs=2, metavar=("FLOAT32_JSON", "BFLOAT16_JSON"),
                    help="bench_scale.py decode results of one fused set with each dtype")
    ap.add_argument("--images", nargs=2, metavar=("FLOAT32_DIR", "BFLOAT16_DIR"),
                    help="the images those two decodes wrote (same file names)")
    a = parse(ap)  # sets torch's thread count to --threads
    load = Load()
    rows = []
    for size, batch, x in real_batches(a.data):
        res, codecs = {}, {}
        for dtype in ("float32", "bfloat16"):
            codecs[dtype] = VAECodec.load(a.vae, dtype=dtype)
            res[dtype] = time_codec(codecs[dtype], x, a.repeats)
        f, b = res["float32"], res["bfloat16"]
        # bfloat16's decode of float32's latents, so that the decode difference alone is measured
        y_b_of_f = codecs["bfloat16"].decode(f["z"])
        rows.append({"size": size, "batch": batch, "threads": a.threads,
                     **{f"{k}_{d}_s": round(res[d][f"{k}_s"], 3) for k in ("encode", "decode") for d in res},
                     "encode_speedup": round(f["encode_s"] / b["encode_s"], 2),
                     "decode_speedup": round(f["decode_s"] / b["decode_s"], 2),
                     "decode_psnr_bf16_vs_fp32_db": _psnr(y_b_of_f, f["y"]),
                     "png_levels_differing_fraction":
                         float((png_levels(y_b_of_f) != png_levels(f["y"])).float().mean()),
                     "max_png_level_diff": float((png_levels(y_b_of_f) - png_levels(f["y"])).abs().max()),
                     "roundtrip_psnr_fp32_db": _psnr(f["y"], x), "roundtrip_psnr_bf16_db": _psnr(b["y"], x)})
        print(json.dumps(rows[-1]))
    flags = sorted({w for w in open("/proc/cpuinfo").read().split() if w in ("avx512_bf16", "amx_bf16", "amx_tile")}) \
        if Path("/proc/cpuinfo").is_file() else []
    e2e = _end_to_end(a.scale_results, a.images) if a.scale_results else None
    res = {**provenance(load, a), "rows": rows, **({"end_to_end": e2e} if e2e else {}), "torch": torch.__version__,
           "cpu_bf16_flags": flags}
    md = ["# TAESD on CPU: float32 against bfloat16 (seconds per batch, best of "
          f"{a.repeats}; {a.threads} thread(s); channels-last)", "", f"Command: `{res['command']}`", "",
          "| size | batch | encode fp32 | encode bf16 | speed-up | decode fp32 | decode bf16 | speed-up "
          "| bf16 decode vs fp32 (PSNR) | PNG levels that differ | round trip PSNR fp32 | round trip PSNR bf16 |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['size']} px | {r['batch']} | {r['encode_float32_s']} | {r['encode_bfloat16_s']} | "
                  f"{r['encode_speedup']}x | {r['decode_float32_s']} | {r['decode_bfloat16_s']} | {r['decode_speedup']}x | "
                  f"{r['decode_psnr_bf16_vs_fp32_db']} dB | {100 * r['png_levels_differing_fraction']:.1f} % (at most "
                  f"{r['max_png_level_diff']:.0f} levels) | {r['roundtrip_psnr_fp32_db']} dB | {r['roundtrip_psnr_bf16_db']} dB |")
    if e2e:
        f, b = e2e["float32"], e2e["bfloat16"]
        md += ["", f"`tailfuse decode` of the same {f['images']} fused latents (512 px, pixel detail, one process of one "
               "thread; `bench_scale.py` calls, commands in the JSON): float32 "
               f"{f['seconds']} s, bfloat16 {b['seconds']} s ({e2e['speedup']}x, start-up included)."]
        if "images" in e2e:
            i = e2e["images"]
            md[-1] += (f" bfloat16's {i['files']} images against float32's: PSNR {i['psnr_db']} dB (lowest image "
                       f"{i['min_psnr_db']} dB), {100 * i['levels_differing_fraction']:.0f} % of PNG levels differ, "
                       f"by at most {i['max_level_diff']:.0f}.")
    md += ["", f"CPU bfloat16 support: {', '.join(flags) or 'none listed'}. torch {torch.__version__}; "
               f"{platform.platform()}; {load.footer()}."]
    write_results(a.out, "codec-dtype", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
