"""Diffusion-step benchmark (issue 9): seconds per synthetic sample of the three ways to make one, on 2 CPU cores.

    python benchmarks/bench_diffusion.py --run runs/bench-isic --tag isic2018_lt [--refine 5/50] [--n 64]

(a) fusion + decode, (b) fusion + refinement (d of N DDIM steps with the run's prior) + decode, (c) full N-step
sampling from noise with the prior + decode, each timed on ``--n`` tail samples of the run (the prior is trained
first when missing; its training time is reported apart). Then the same ratios with a UNet of Stable Diffusion 1.5's
size (UNet2DConditionModel, 860M parameters, random weights: only the time matters) on 4 x 64 x 64 latents: a few
denoising steps are timed with classifier-free guidance (a batch of 2 per sample, as SD does) and multiplied by the
step counts; fusion and the TAESD decode of a 4 x 64 x 64 latent are timed for real. Writes
benchmarks/results/diffusion-<tag>.json and .md. Image quality and tail mAP of (a), (b) and (c) come from
`tailfuse evaluate` (bench_evaluate.py with the arms tailfuse, tailfuse-refined and prior-sample).
"""

from __future__ import annotations

import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from _results import Load, parse, parser, provenance, write_results  # noqa: E402

from tailfuse.config import DecodeConfig, FuseConfig, PriorConfig, RefineConfig  # noqa: E402
from tailfuse.decode import run_decode  # noqa: E402
from tailfuse.diffusion.refine import run_refine, run_sample  # noqa: E402
from tailfuse.diffusion.train_prior import run_train_prior  # noqa: E402
from tailfuse.fusion.stage import run_fuse  # noqa: E402
from tailfuse.store import RunStore  # noqa: E402

QUIET = {"progress": False}


def timed(fn, *a, **k) -> float:
    t = time.perf_counter()
    fn(*a, **k)
    return time.perf_counter() - t


def sd15_unet_step_seconds(steps: int = 2) -> dict:
    """Seconds of one denoising step of an SD-1.5-sized UNet for one sample with CFG (batch 2), random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(2, 4, 64, 64)
    ctx = torch.randn(2, 77, 768)
    with torch.no_grad():
        unet(x, 500, encoder_hidden_states=ctx)  # warm-up
        t = time.perf_counter()
        for s in range(steps):
            unet(x, 999 - 20 * s, encoder_hidden_states=ctx)
    return {"seconds_per_step": (time.perf_counter() - t) / steps, "parameters": n_params, "timed_steps": steps}


def taesd_decode_512_seconds(run: RunStore, reps: int = 3) -> float:
    from tailfuse.codec import VAECodec

    codec = VAECodec.load(run.stage("encode")["vae"]["name"])
    z = torch.randn(1, 4, 64, 64)
    codec.decode(z)
    t = time.perf_counter()
    for _ in range(reps):
        codec.decode(z)
    return (time.perf_counter() - t) / reps


def main() -> int:
    ap = parser(__doc__, threads=2)
    ap.add_argument("--run", required=True, help="run folder (encode + train done)")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--refine", default="5/50", help="d/N of (b); N is also (c)'s step count (default 5/50)")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=64, help="samples timed per path (default 64)")
    ap.add_argument("--sd-steps", type=int, default=2, help="SD-sized UNet steps actually timed (default 2)")
    a = parse(ap)  # sets torch's thread count to --threads
    store = RunStore(a.run)
    d, n_steps = RefineConfig(refine=a.refine).steps()
    load = Load()
    prior_s = timed(run_train_prior, a.run, PriorConfig(), **QUIET)
    tail = store.labels()["tail_labels"]
    per = max(1, a.n // len(tail))
    for name in ("bench-a", "bench-a-refined", "bench-c"):
        shutil.rmtree(store.root / name, ignore_errors=True)
        for st in ("fuse", "refine", "sample", "decode"):
            store.stage_path(f"{st}-{name}").unlink(missing_ok=True)
    run_fuse(a.run, FuseConfig(per_class=per, name="bench-a"), **QUIET)
    n = store.stage("fuse-bench-a")["n_synthetic"]
    # the fusion loop itself, as the stage timed it (saliency maps and neighbours are computed once per run, cached)
    fuse_s = store.stage("fuse-bench-a")["seconds"]
    dec_a = timed(run_decode, a.run, DecodeConfig(name="bench-a"), **QUIET)
    ref_s = timed(run_refine, a.run, RefineConfig(source="bench-a", refine=a.refine, guidance=a.guidance), **QUIET)
    dec_b = timed(run_decode, a.run, DecodeConfig(name="bench-a-refined"), **QUIET)
    samp_s = timed(run_sample, a.run, {lab: per for lab in tail}, steps=n_steps, guidance=a.guidance, name="bench-c",
                   **QUIET)
    dec_c = timed(run_decode, a.run, DecodeConfig(name="bench-c"), **QUIET)
    per_sample = {"a_fusion_decode": (fuse_s + dec_a) / n, "b_fusion_refine_decode": (fuse_s + ref_s + dec_b) / n,
                  "c_sample_decode": (samp_s + dec_c) / n}
    parts = {"fusion": fuse_s / n, "decode": dec_a / n, "refine": ref_s / n, "sample": samp_s / n}
    sd = sd15_unet_step_seconds(a.sd_steps)
    dec512 = taesd_decode_512_seconds(store)
    u = sd["seconds_per_step"]
    sd_per_sample = {"a_fusion_decode": parts["fusion"] * 16 + dec512,  # fusion cost scales with positions (16x)
                     "b_fusion_refine_decode": parts["fusion"] * 16 + d * u + dec512,
                     "c_sample_decode": n_steps * u + dec512}
    res = {
        **provenance(load, a),
        "run": str(store.root.resolve()), "n_samples": n, "refine": a.refine, "guidance": a.guidance,
        "prior": {"train_seconds_this_call": round(prior_s, 1), **{k: store.stage("prior").get(k) for k in
                                                                   ("n_parameters", "epochs", "seconds", "final_val_loss")}},
        "trained_prior": {"seconds_per_sample": per_sample, "parts_per_sample": parts,
                          "ratio_c_over_a": per_sample["c_sample_decode"] / per_sample["a_fusion_decode"],
                          "ratio_c_over_b": per_sample["c_sample_decode"] / per_sample["b_fusion_refine_decode"]},
        "sd15_sized_unet": {"unet": sd, "taesd_decode_4x64x64_seconds": dec512, "seconds_per_sample": sd_per_sample,
                            "ratio_c_over_a": sd_per_sample["c_sample_decode"] / sd_per_sample["a_fusion_decode"],
                            "ratio_c_over_b": sd_per_sample["c_sample_decode"] / sd_per_sample["b_fusion_refine_decode"],
                            "method": f"{sd['timed_steps']} UNet steps timed (batch 2: classifier-free guidance) and "
                                      "multiplied by the step counts; fusion per sample scaled by 16 (64 x 64 vs 16 x 16 "
                                      "positions); TAESD decode of one 4 x 64 x 64 latent timed"},
    }
    tp, sdp = res["trained_prior"], res["sd15_sized_unet"]
    md = [f"# Diffusion step: seconds per synthetic sample ({a.tag})", "", f"Command: `{res['command']}`", "",
          f"{n} tail samples per path; (b) refines {d} of {n_steps} DDIM steps, (c) samples {n_steps} steps from noise; "
          f"guidance {a.guidance:g}. {platform.platform()}, {a.threads} torch threads; {load.footer()}.", "",
          "| path | trained prior (s / sample) | SD-1.5-sized UNet, 4x64x64 (s / sample) |", "|---|---|---|"]
    for k, label in (("a_fusion_decode", "(a) fusion + decode"), ("b_fusion_refine_decode", f"(b) fusion + refine {a.refine} + decode"),
                     ("c_sample_decode", f"(c) {n_steps}-step sampling + decode")):
        md.append(f"| {label} | {tp['seconds_per_sample'][k]:.4f} | {sdp['seconds_per_sample'][k]:.2f} |")
    md += ["", f"Speed ratios, trained prior ({res['prior']['n_parameters'] / 1e6:.2f}M parameters): (c)/(a) "
           f"{tp['ratio_c_over_a']:.1f}x, (c)/(b) {tp['ratio_c_over_b']:.1f}x. Parts per sample: fusion "
           f"{parts['fusion']:.4f} s, decode {parts['decode']:.4f} s, refinement {parts['refine']:.4f} s, sampling "
           f"{parts['sample']:.4f} s.",
           f"SD-1.5-sized UNet ({sd['parameters'] / 1e6:.0f}M parameters, random weights, {u:.2f} s per guided step, "
           f"measured over {sd['timed_steps']} steps and multiplied): (c)/(a) {sdp['ratio_c_over_a']:.0f}x, (c)/(b) "
           f"{sdp['ratio_c_over_b']:.1f}x. TAESD decode of a 4x64x64 latent {dec512:.2f} s."]
    write_results(a.out, f"diffusion-{a.tag}", res, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
