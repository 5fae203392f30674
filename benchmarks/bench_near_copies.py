"""Does the near-copy check find copies? (issue 26). Measures candidate feature distances and rules on probe sets.

    python benchmarks/bench_near_copies.py [--data ../shared/data/isic2018_lt] [--vae ../shared/models/taesd] \
        --work /tmp/nearcopy --one VASC

Makes ISIC2018-LT with the training images of one tail label (``--one``) cut to a single image, runs `tailfuse run`
on it (defaults, ``--per-class`` new images per tail label), and builds probe sets against the real training images:

* exact copies of training images (the files copied), and copies with small jitter: a shift of a few pixels,
  JPEG re-compression, a slight colour change;
* the fused images of the one-image label, every one made from that single tail image;
* the other fused images (many tail sources), for information;
* the real test images: these must stay below about 5 % flagged.

Every image is described by the EfficientNet-Lite0 feature the report and `evaluate` use. For each way of measuring
distance (``DISTANCES``) and each rule (``RULES``), it reports the share of each set flagged as near-copies.
Writes benchmarks/results/near-copies.{json,md}.
"""

from __future__ import annotations

import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from _results import Load, parse, parser, provenance, write_results  # noqa: E402


def _standardised(ref, x, floor: float | None):
    mu, sd = ref.mean(0), ref.std(0)
    if floor is None:  # the check as it was: std + 1e-6
        sd = sd + 1e-6
        return (ref - mu) / sd, (x - mu) / sd
    live = sd > 1e-6 * max(float(sd.max()), 1e-12)  # dimensions constant on the reference set say nothing
    sd = np.maximum(sd[live], floor * float(np.median(sd[live])))
    return (ref[:, live] - mu[live]) / sd, (x[:, live] - mu[live]) / sd


def _unit(v):
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


DISTANCES = {
    "standardised (as it was)": lambda ref, x: _standardised(ref, x, None),
    "standardised, constant dims dropped, std floored at 0.1 x median": lambda ref, x: _standardised(ref, x, 0.1),
    "raw, euclidean": lambda ref, x: (ref, x),
    "raw, cosine (unit vectors, euclidean)": lambda ref, x: (_unit(ref), _unit(x)),
}


def _two_nearest(ref, x, exclude_self: bool = False):
    import torch

    d = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(ref).double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    top = d.topk(2, dim=1, largest=False).values.numpy()
    return top[:, 0], top[:, 1]


def jitter(img: Image.Image, kind: str, rng) -> Image.Image:
    a = np.asarray(img.convert("RGB")).astype(np.float32)
    if kind == "shift":  # a few pixels, each way
        dy, dx = rng.integers(2, 5, 2) * rng.choice([-1, 1], 2)
        return Image.fromarray(np.roll(a, (int(dy), int(dx)), (0, 1)).astype(np.uint8))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=75)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "colour":  # slight: 5 % on one channel, a small brightness step
        a = a * np.array([1.05, 0.98, 1.0]) + 6
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    raise ValueError(kind)


def main() -> int:
    ap = parser(__doc__, threads=None, vae=True, data="isic2018_lt", data_help="the ISIC2018-LT folder (manifest.csv)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--one", default="VASC", help="tail label cut to one training image")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--n-copies", type=int, default=100, help="training images copied (and jittered)")
    a = parse(ap)
    import tailfuse
    from tailfuse.scoring import run_image_features
    from tailfuse.store import RunStore

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src = Path(a.data).resolve()
    m = pd.read_csv(src / "manifest.csv")
    m["path"] = [str(src / p) for p in m["path"]]
    cut = m[(m["split"] == "train") & (m[a.one] == 1)]
    m = m.drop(index=cut.index[1:])  # one training image of --one is left
    m.to_csv(work / "manifest.csv", index=False)
    load = Load()
    t0 = time.time()
    res = tailfuse.run(str(work / "manifest.csv"), str(work / "run"), vae=a.vae, per_class=a.per_class, progress=False)
    t_run = time.time() - t0
    store = RunStore(work / "run")
    samples = store.samples()
    train = samples[samples["split"] == "train"].reset_index(drop=True)
    test = samples[samples["split"] == "test"].reset_index(drop=True)
    prov = pd.read_json(res.provenance, lines=True)
    man = pd.read_csv(res.manifest)
    syn_paths = [str(res.manifest.parent / p) for p in man["path"]]
    one = (prov["tail_label"] == a.one).to_numpy()
    assert prov.loc[one, "tail_sample_id"].nunique() == 1

    rng = np.random.default_rng(0)
    pick = train.iloc[np.sort(rng.choice(len(train), a.n_copies, replace=False))]
    probes: dict[str, list[str]] = {"exact copies": [], "shifted 2-4 px": [], "JPEG q75": [], "colour changed": []}
    folder = work / "probes"
    for kind in probes:
        (folder / kind.split()[0]).mkdir(parents=True, exist_ok=True)
    for _, r in pick.iterrows():
        name = f"{int(r['sample_id']):06d}.png"
        exact = folder / "exact" / name
        shutil.copyfile(r["abs_path"], exact)
        probes["exact copies"].append(str(exact))
        img = Image.open(r["abs_path"])
        for kind, key in (("shift", "shifted 2-4 px"), ("jpeg", "JPEG q75"), ("colour", "colour changed")):
            p = folder / key.split()[0] / name
            jitter(img, kind, rng).save(p)
            probes[key].append(str(p))
    probes[f"fused, all from the one {a.one} image"] = [p for p, o in zip(syn_paths, one) if o]
    probes["fused, other tail labels (many sources)"] = [p for p, o in zip(syn_paths, one) if not o]
    probes["real test images"] = test["abs_path"].tolist()

    t1 = time.time()
    ref = run_image_features(store, train["abs_path"].tolist(), desc="train features").astype(np.float64)
    feats = {k: run_image_features(store, v, desc=k).astype(np.float64) for k, v in probes.items()}
    t_feat = time.time() - t1
    dead = int((ref.std(0) == 0).sum())

    table = {}
    for dname, fn in DISTANCES.items():
        r_ref, _ = fn(ref, ref[:1])
        nn_real, _ = _two_nearest(r_ref, r_ref, exclude_self=True)
        thr = {q: float(np.quantile(nn_real, q)) for q in (0.01, 0.05)}
        rows = {}
        for k, x in feats.items():
            _, xs = fn(ref, x)
            d1, d2 = _two_nearest(r_ref, xs)
            ratio = d1 / np.maximum(d2, 1e-12)
            rows[k] = {"n": len(x), "median_nn_distance": float(np.median(d1)), "median_ratio": float(np.median(ratio)),
                       "ratio < 1/3": float((ratio < 1 / 3).mean()),
                       "d1 < 1 % quantile of real nearest": float((d1 < thr[0.01]).mean()),
                       "d1 < 5 % quantile of real nearest": float((d1 < thr[0.05]).mean())}
        table[dname] = {"thresholds": thr, "median_real_nearest": float(np.median(nn_real)), "sets": rows}

    # the check as it is now: pixel regions (tailfuse.nearcopy)
    from tailfuse.nearcopy import GU_RATIO, RegionIndex, load_images

    size = int(store.labels().get("image_size") or 128)
    t2 = time.time()
    index = RegionIndex.from_paths(train["abs_path"].tolist(), size, ids=train["sample_id"].to_numpy())
    qs = (0.01, 0.02, 0.05)
    thr = {q: float(np.quantile(index.calibration, q)) for q in qs}
    region = {}
    for k, v in probes.items():
        r = index.query(load_images(v, size, "center-crop"))
        d1, ratio = r["nn_distance"], r["nn_ratio"]
        row = {"n": len(v), "median_nn_distance": float(np.median(d1)), "median_ratio": float(np.median(ratio)),
               "ratio < 1/3": float((ratio < GU_RATIO).mean())}
        for q in qs:
            row[f"d1 < {q:.0%} quantile"] = float((d1 < thr[q]).mean())
            row[f"d1 < {q:.0%} quantile or ratio < 1/3"] = float(((d1 < thr[q]) | (ratio < GU_RATIO)).mean())
        if k.startswith("fused, all from"):
            row["nearest is the tail source"] = float(np.mean(r["nn_id"] == prov.loc[one, "tail_sample_id"].iloc[0]))
        region[k] = row
    t_region = time.time() - t2

    out = {**provenance(load, a), "one_label": a.one, "per_class": a.per_class,
           "n_train": len(train), "n_dead_dimensions": dead, "feature": "EfficientNet-Lite0 pooled (1280-d)",
           "run_seconds": round(t_run, 1), "feature_seconds": round(t_feat, 1), "results": table,
           "region": {"sets": region, "thresholds": thr, "median_real_nearest": float(np.median(index.calibration)),
                      "n_calibration": int(len(index.calibration)), "seconds": round(t_region, 1)}}
    rules = ["ratio < 1/3", "d1 < 1 % quantile of real nearest", "d1 < 5 % quantile of real nearest"]
    md = ["# Near-copy check: which distance and rule find copies (issue 26)", "",
          f"Command: `{out['command']}`", "",
          f"ISIC2018-LT with the {a.one} training images cut to one; `tailfuse run` with the defaults and "
          f"--per-class {a.per_class} ({t_run:.0f} s). Reference: the {len(train)} real training images. Feature: "
          f"EfficientNet-Lite0 pooled, 1280-d; {dead} of its dimensions are exactly 0 on every training image. Share of "
          "each set flagged; 'quantile' rules compare the nearest distance with that quantile of the real training "
          "images' nearest-other-image distances.", ""]
    for dname, t in table.items():
        md += [f"## {dname}", "", "| set | n | median nearest distance | median ratio | " + " | ".join(rules) + " |",
               "|---|---|---|---|" + "---|" * len(rules)]
        for k, r in t["sets"].items():
            md.append(f"| {k} | {r['n']} | {r['median_nn_distance']:.3g} | {r['median_ratio']:.3f} | "
                      + " | ".join(f"{100 * r[x]:.0f} %" for x in rules) + " |")
        md += ["", f"Real nearest-other distance: median {t['median_real_nearest']:.3g}, 1 % quantile "
                   f"{t['thresholds'][0.01]:.3g}, 5 % quantile {t['thresholds'][0.05]:.3g}.", ""]
    rr = ["ratio < 1/3"] + [f"d1 < {q:.0%} quantile" for q in qs] + [f"d1 < {q:.0%} quantile or ratio < 1/3" for q in qs]
    md += ["## pixel regions (tailfuse.nearcopy, the check as it is now)", "",
           "Best-matching window of a 3 x 3 grid (48 px windows at 128 px, grey, pooled to 12 x 12, standardised), "
           f"query shifted by up to 4 px; {len(index.calibration)} training images calibrate the quantiles "
           f"({t_region:.0f} s for the index and every probe set).", "",
           "| set | n | median nearest distance | median ratio | " + " | ".join(rr) + " |",
           "|---|---|---|---|" + "---|" * len(rr)]
    for k, r in region.items():
        md.append(f"| {k} | {r['n']} | {r['median_nn_distance']:.3g} | {r['median_ratio']:.3f} | "
                  + " | ".join(f"{100 * r[x]:.0f} %" for x in rr) + " |")
    one_key = next(k for k in region if k.startswith("fused, all from"))
    md += ["", f"Real nearest-other distance: median {np.median(index.calibration):.3g}; quantiles "
           + ", ".join(f"{q:.0%} {thr[q]:.3g}" for q in qs) + f". For the fused images of the one-image label, the "
           f"nearest training image is their tail source in {100 * region[one_key]['nearest is the tail source']:.0f} % "
           "of cases.", ""]
    import platform

    md.append(f"{platform.platform()}; {load.footer()}.")
    write_results(a.out, "near-copies", out, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
