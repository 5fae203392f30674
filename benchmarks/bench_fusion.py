"""Fusion benchmark (issue 4): diversity, class fidelity, tail share, seams, grids, memory and throughput.

    python benchmarks/bench_fusion.py --run runs/bench-isic --tag isic2018_lt --per-class 100

Needs a run folder with a finished encode and train (see bench_train.py). Runs `tailfuse fuse` + `tailfuse decode`
(timed) and measures, per tail label:
  * diversity: mean pairwise L2 distance between synthetic latents / the same between real train latents (bar >= 0.5);
    and whether any two synthetic images are identical;
  * class fidelity: EfficientNet-Lite0 ImageNet features (frozen) + a logistic-regression head trained on the real
    train split (C chosen on val). AP of the tail label's synthetic images (as many as the real test positives,
    averaged over 20 draws, with the real test negatives) against AP of the real test images; top-1 rates too
    (bar: synthetic AP >= 0.5 x real AP);
  * tail share: share of positions taken from the tail sample;
  * seams: Sobel edge energy within 2 px of the mask border / elsewhere, for the synthetic images and, as the
    reference, for the tail source's own VAE round trip under the same masks (~1.0 means no seam);
  * grids: benchmarks/results/fusion-<tag>-<label>.png: real images, synthetic images, then rows of
    tail source | head source | mask (white = tail) | synthetic;
  * memory: peak RSS of fuse + decode for N and 10 N samples (subprocesses), bar 10 N <= 1.2 x N;
  * throughput: fuse + decode samples/s beside the VAE's decode-only throughput, same machine, same run.
Writes benchmarks/results/fusion-<tag>.json and .md.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from _results import Load, parse, parser, provenance, write_results  # noqa: E402
from tailfuse.codec import VAECodec  # noqa: E402
from tailfuse.evaluation.features import Backbone, image_features  # noqa: E402
from tailfuse.fusion.stage import synthetic_latents  # noqa: E402
from tailfuse.images import load_image  # noqa: E402
from tailfuse.store import RunStore  # noqa: E402

# VmHWM (this process's own peak RSS): ru_maxrss would carry the parent's peak across fork + exec
RSS_SNIPPET = (
    "import sys; from tailfuse.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
    "print('PEAK_RSS_KB', hwm); sys.exit(rc)"
)


def run_cli(args: list[str]) -> tuple[float, float]:
    """Run a tailfuse command in a fresh process; return (seconds, peak RSS MB)."""
    t = time.time()
    r = subprocess.run([sys.executable, "-c", RSS_SNIPPET, *args, "--quiet"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stdout + r.stderr)
    rss = [int(x.split()[1]) for x in r.stdout.splitlines() if x.startswith("PEAK_RSS_KB")][0] / 1024
    return time.time() - t, rss


def pairwise_mean(x: torch.Tensor, max_n: int = 400, seed: int = 0) -> float:
    x = x.reshape(len(x), -1).double()
    if len(x) > max_n:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_n]]
    d = torch.cdist(x, x)
    n = len(x)
    return float(d.sum() / (n * (n - 1))) if n > 1 else None  # undefined for a single image


def sobel_energy(img: torch.Tensor) -> torch.Tensor:
    g = img.mean(0, keepdim=True)[None]
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])[None, None]
    gx = F.conv2d(g, kx, padding=1)
    gy = F.conv2d(g, kx.transpose(2, 3), padding=1)
    return (gx**2 + gy**2).sqrt()[0, 0]


def border_band(mask: torch.Tensor, scale: int, width: int = 2) -> torch.Tensor:
    """Pixels within ``width`` of a border between mask regions (mask: h x w latent grid, upsampled by scale)."""
    m = mask.float().repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    edge = torch.zeros_like(m, dtype=torch.bool)
    edge[:, 1:] |= m[:, 1:] != m[:, :-1]
    edge[:, :-1] |= m[:, 1:] != m[:, :-1]
    edge[1:, :] |= m[1:, :] != m[:-1, :]
    edge[:-1, :] |= m[1:, :] != m[:-1, :]
    k = 2 * width - 1
    band = F.max_pool2d(edge.float()[None, None], k, stride=1, padding=width - 1)[0, 0] > 0
    band[:3, :] = band[-3:, :] = band[:, :3] = band[:, -3:] = False  # image borders: Sobel padding artefacts
    return band


def seam_ratio(img: torch.Tensor, mask: torch.Tensor, scale: int) -> float | None:
    band = border_band(mask, scale)
    inner = torch.ones_like(band)
    inner[:3, :] = inner[-3:, :] = inner[:, :3] = inner[:, -3:] = False
    rest = inner & ~band
    if band.sum() < 10 or rest.sum() < 10:
        return None
    e = sobel_energy(img)
    return float(e[band].mean() / e[rest].mean().clamp_min(1e-8))


def fit_head(x_tr, y_tr, x_va, y_va, multi):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_tr)
    best = None
    for c in (0.01, 0.1, 1.0):
        base = LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
        if multi:
            keep = y_tr.sum(0) > 0
            clf = OneVsRestClassifier(base).fit(sc.transform(x_tr), y_tr[:, keep])
        else:
            keep = None
            clf = base.fit(sc.transform(x_tr), y_tr.argmax(1))
        s = scores(clf, sc, x_va, y_va.shape[1], multi, keep)
        aps = [average_precision_score(y_va[:, j], s[:, j]) for j in range(y_va.shape[1]) if y_va[:, j].sum() > 0]
        m = float(np.mean(aps)) if aps else 0.0
        if best is None or m > best[0]:
            best = (m, clf, c, keep)
    return best[1], sc, best[2], best[3]


def scores(clf, sc, x, n_labels, multi, keep):
    if multi:
        s = np.zeros((len(x), n_labels))
        s[:, np.flatnonzero(keep)] = clf.predict_proba(sc.transform(x))
        return s
    p = clf.predict_proba(sc.transform(x))
    out = np.zeros((len(x), n_labels))
    out[:, clf.classes_] = p
    return out


def main() -> None:
    from sklearn.metrics import average_precision_score

    ap = parser(__doc__, threads=2,
                threads_help="torch threads of this process (features, seams, decode-only timing; the timed "
                             "`tailfuse fuse` and `decode` run in their own processes with torch's default)")
    ap.add_argument("--run", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--memory-base", type=int, default=50, help="N of the memory check (N and 10 N per tail label)")
    ap.add_argument("--name", default="synthetic")
    ap.add_argument("--fuse-args", default="", help="extra arguments for tailfuse fuse (e.g. '--code soft')")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory check (quick experiments)")
    args = parse(ap)  # sets torch's thread count to --threads (2 by default, as this script always did)
    load = Load()
    run = Path(args.run)
    store = RunStore(run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = args.fuse_args.split()

    # fuse + decode, timed
    fuse_s, fuse_rss = run_cli(["fuse", "--run", str(run), "--per-class", str(args.per_class), "--name", args.name, *extra])
    dec_s, dec_rss = run_cli(["decode", "--run", str(run), "--name", args.name])
    syn = pd.read_csv(run / args.name / "samples.csv")
    labels_info = store.labels()
    labels, tail, multi = labels_info["labels"], labels_info["tail_labels"], labels_info["multi_label"]
    samples = store.samples()
    shards = store.latents()
    syn_sh = synthetic_latents(store, args.name)
    sids, syn_lat = syn_sh.load_all()
    _, syn_mask = syn_sh.load_all(key="mask")
    order = np.argsort(sids)
    syn_lat, syn_mask = syn_lat[order], syn_mask[order]
    n_syn = len(syn)

    # VAE decode-only throughput, same latents, same machine
    codec = VAECodec.load(store.stage("encode")["vae"]["name"])
    t = time.time()
    for i in range(0, n_syn, 32):
        codec.decode(syn_lat[i : i + 32])
    vae_decode_s = time.time() - t

    # diversity and identity
    pngs = [run / args.name / p for p in pd.read_csv(run / args.name / "manifest.csv")["path"]]
    import hashlib

    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in pngs}
    train = samples[samples["split"] == "train"]
    per_label = {}
    for lab in tail:
        idx = np.flatnonzero(syn["tail_label"].to_numpy() == lab)
        if len(idx) == 0:
            continue
        real_ids = train[train[lab] == 1]["sample_id"].to_numpy()
        d_syn = pairwise_mean(syn_lat[idx])
        d_real = pairwise_mean(shards.get(real_ids))
        per_label[lab] = {"n_synthetic": int(len(idx)), "n_real_train": int(len(real_ids)),
                          "pairwise_synthetic": d_syn, "pairwise_real": d_real, "diversity_ratio": d_syn / d_real if d_syn and d_real else None,
                          "tail_share_mean": float(syn["tail_share"].to_numpy()[idx].mean()),
                          "tail_share_p10_p90": [float(np.percentile(syn["tail_share"].to_numpy()[idx], q)) for q in (10, 90)]}

    # class fidelity with frozen ImageNet features + linear head trained on real train
    backbone = Backbone()
    cache = run / "eval" / "features"
    size = labels_info["image_size"]
    feats = {}
    for split in ("train", "val", "test"):
        sub = samples[samples["split"] == split]
        feats[split] = (image_features(sub["abs_path"].tolist(), backbone, cache, size), sub[labels].to_numpy(dtype=int))
    x_syn = image_features([str(p) for p in pngs], backbone, cache, size)
    clf, sc, c_best, keep = fit_head(*feats["train"], *feats["val"], multi)
    s_test = scores(clf, sc, feats["test"][0], len(labels), multi, keep)
    s_syn = scores(clf, sc, x_syn, len(labels), multi, keep)
    y_test = feats["test"][1]
    rng = np.random.default_rng(0)
    for lab in per_label:
        j = labels.index(lab)
        pos = y_test[:, j] == 1
        idx = np.flatnonzero(syn["tail_label"].to_numpy() == lab)
        r = per_label[lab]
        r["n_real_test"] = int(pos.sum())
        if pos.sum() == 0:
            r["fidelity_note"] = "no real test image of this label"
            continue
        ap_real = average_precision_score(pos, s_test[:, j])
        neg_scores = s_test[~pos, j]
        aps = []
        for _ in range(20):
            pick = rng.choice(idx, size=min(int(pos.sum()), len(idx)), replace=False)
            yy = np.r_[np.ones(len(pick)), np.zeros(len(neg_scores))]
            aps.append(average_precision_score(yy, np.r_[s_syn[pick, j], neg_scores]))
        r.update(ap_real_test=float(ap_real), ap_synthetic=float(np.mean(aps)), fidelity_ratio=float(np.mean(aps) / ap_real),
                 top1_real_test=float((s_test[pos].argmax(1) == j).mean()), top1_synthetic=float((s_syn[idx].argmax(1) == j).mean()),
                 mean_score_real_test=float(s_test[pos, j].mean()), mean_score_synthetic=float(s_syn[idx, j].mean()),
                 chance_ap=float(pos.mean()))

    # seams and grids
    from PIL import Image

    scale = codec.downsample
    by_id = samples.set_index("sample_id")
    for lab in per_label:
        idx = np.flatnonzero(syn["tail_label"].to_numpy() == lab)
        ratios_syn, ratios_ref = [], []
        for i in idx[:60]:
            img = load_image(str(pngs[i]), size)
            r1 = seam_ratio(img, syn_mask[i], scale)
            src = codec.decode(shards.get([int(syn["tail_sample_id"][i])]))[0]
            r2 = seam_ratio(src, syn_mask[i], scale)
            if r1 is not None and r2 is not None:
                ratios_syn.append(r1)
                ratios_ref.append(r2)
        per_label[lab]["seam_ratio_synthetic"] = float(np.mean(ratios_syn)) if ratios_syn else None
        per_label[lab]["seam_ratio_reference"] = float(np.mean(ratios_ref)) if ratios_ref else None
        per_label[lab]["seam_n"] = len(ratios_syn)
        # grid
        real_paths = train[train[lab] == 1]["abs_path"].tolist()[:8]
        rows = [[load_image(p, size) for p in real_paths], [load_image(str(pngs[i]), size) for i in idx[:8]]]
        for i in idx[:4]:
            t_img = load_image(by_id.loc[int(syn["tail_sample_id"][i]), "abs_path"], size)
            h_img = load_image(by_id.loc[int(syn["head_sample_id"][i]), "abs_path"], size)
            m = syn_mask[i].float().repeat_interleave(scale, 0).repeat_interleave(scale, 1)[None].expand(3, -1, -1)
            rows.append([t_img, h_img, m, load_image(str(pngs[i]), size)])
        width = 8
        canvas = torch.ones(3, len(rows) * (size + 4), width * (size + 4))
        for r_i, row in enumerate(rows):
            for c_i, im in enumerate(row):
                canvas[:, r_i * (size + 4) : r_i * (size + 4) + size, c_i * (size + 4) : c_i * (size + 4) + size] = im
        a = (canvas.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(a).save(out / f"fusion-{args.tag}-{lab}.png")

    # memory: fuse + decode at N and 10 N per tail label
    mem = {}
    for mult in () if args.no_memory else (1, 10):
        n = args.memory_base * mult
        name = f"mem{n}"
        fs, fr = run_cli(["fuse", "--run", str(run), "--per-class", str(n), "--name", name, *extra])
        ds, dr = run_cli(["decode", "--run", str(run), "--name", name])
        mem[str(mult)] = {"per_class": n, "n_synthetic": int(len(pd.read_csv(run / name / "samples.csv"))),
                          "fuse_peak_rss_mb": round(fr, 1), "decode_peak_rss_mb": round(dr, 1),
                          "fuse_seconds": round(fs, 1), "decode_seconds": round(ds, 1)}
    peak = lambda m: max(m["fuse_peak_rss_mb"], m["decode_peak_rss_mb"])  # noqa: E731
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    result = {
        **provenance(load, args),
        "fuse_config": store.config().get(f"fuse-{args.name}"),
        "n_synthetic": n_syn, "n_unique_images": len(digests),
        "fuse_seconds": round(fuse_s, 1), "decode_seconds": round(dec_s, 1),
        "fuse_decode_samples_per_s": round(n_syn / (fuse_s + dec_s), 2),
        "vae_decode_only_samples_per_s": round(n_syn / vae_decode_s, 2),
        "head_classifier_C": c_best, "per_label": per_label, "memory": mem,
        "memory_ratio_10x_over_1x": round(peak(mem["10"]) / peak(mem["1"]), 3) if mem else None,
    }
    md = [f"# fusion benchmark: {args.tag}", "", f"Command: `{result['command']}`", "", f"Machine: {machine}.", "",
          f"{n_syn} synthetic images, {len(digests)} distinct. Fuse {fuse_s:.1f} s + decode {dec_s:.1f} s = "
          f"{result['fuse_decode_samples_per_s']} samples/s (process start-up and model loading included); "
          f"VAE decode alone {result['vae_decode_only_samples_per_s']} samples/s.", "",
          "| tail label | n syn | diversity (syn/real pairwise) | tail share (p10-p90) | AP syn / AP real test (ratio) | top-1 syn / real | seam ratio syn (ref) |",
          "|---|---|---|---|---|---|---|"]
    for lab, r in per_label.items():
        fid = (f"{r['ap_synthetic']:.3f} / {r['ap_real_test']:.3f} ({r['fidelity_ratio']:.2f}), n_test={r['n_real_test']}"
               if "ap_real_test" in r else r.get("fidelity_note", "-"))
        top = f"{r['top1_synthetic']:.2f} / {r['top1_real_test']:.2f}" if "top1_real_test" in r else "-"
        seam = f"{r['seam_ratio_synthetic']:.2f} ({r['seam_ratio_reference']:.2f}), n={r['seam_n']}" if r.get("seam_ratio_synthetic") else "-"
        div = f"{r['diversity_ratio']:.2f}" if r["diversity_ratio"] is not None else f"n/a ({r['n_real_train']} real train image)"
        md.append(f"| {lab} | {r['n_synthetic']} | {div} | {r['tail_share_mean']:.2f} ({r['tail_share_p10_p90'][0]:.2f}-{r['tail_share_p10_p90'][1]:.2f}) | {fid} | {top} | {seam} |")
    md += ["", "Memory (peak RSS of each command in its own process):", "", "| per class | samples | fuse MB | decode MB | fuse s | decode s |", "|---|---|---|---|---|---|"]
    for m in mem.values():
        md.append(f"| {m['per_class']} | {m['n_synthetic']} | {m['fuse_peak_rss_mb']} | {m['decode_peak_rss_mb']} | {m['fuse_seconds']} | {m['decode_seconds']} |")
    md += ["", f"10x / 1x peak RSS: {result['memory_ratio_10x_over_1x']} (bar <= 1.2).", "",
           "Grids: " + ", ".join(f"`fusion-{args.tag}-{lab}.png`" for lab in per_label)
           + " (rows: real train images; synthetic images; then tail source | head source | mask, white = from tail | synthetic).",
           "", f"{platform.platform()}; {load.footer()}."]
    write_results(out, f"fusion-{args.tag}", result, md)


if __name__ == "__main__":
    main()
