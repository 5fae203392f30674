"""Quality figures of every image arm against held-out real tail images (see quality.py for the statistics)."""

from __future__ import annotations

import numpy as np

from .config import EvaluateConfig
from .quality import InceptionFID, frechet_distance, knn_precision_recall


def _subsample(n: int, m: int, seed: int) -> np.ndarray:
    if n <= m:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


def run_quality(store, cfg: EvaluateConfig, labels, tail, split, arm_sets, feats, where, image_size, resize, eval_dir,
                progress, log) -> dict:
    """FID, domain Frechet distance and k-NN precision/recall of each image arm (and the real-train floor) against
    the real test images that carry a tail label, pooled over tail labels."""
    from .features import image_features

    def tail_rows(df):
        return df[df[tail].sum(axis=1) > 0]["abs_path"].tolist()

    test_paths = tail_rows(split["test"])
    train_paths = tail_rows(split["train"])
    cap = min(cfg.fid_max_images, max(len(train_paths), 2))
    sets = {"floor (real train)": [train_paths[i] for i in _subsample(len(train_paths), cap, cfg.data_seed)]}
    n_available = {"floor (real train)": len(train_paths)}
    for arm, st in arm_sets.items():
        sets[arm] = [st["paths"][i] for i in _subsample(len(st["paths"]), cap, cfg.data_seed)]
        n_available[arm] = len(st["paths"])
    test_paths = [test_paths[i] for i in _subsample(len(test_paths), cfg.fid_max_images, cfg.data_seed)]
    out = {
        "reference_set": "real test images carrying a tail label (pooled over tail labels)",
        "n_real_test": len(test_paths),
        "subsample": f"every set subsampled (seed {cfg.data_seed}) to at most {cap} images: the size of the real-train "
                     f"tail set, capped at fid_max_images={cfg.fid_max_images}",
        "sets": {},
    }
    if len(test_paths) < 2:
        out["note"] = "fewer than 2 real test images carry a tail label: no quality figures"
        return out
    inception = InceptionFID(cfg.device)
    every = sorted(set(test_paths).union(*[set(v) for v in sets.values()]))
    inc = image_features(every, inception, eval_dir / "features", image_size, cfg.feature_batch_size, progress,
                         resize=resize, desc="Inception features")
    inc_of = {p: inc[i] for i, p in enumerate(every)}
    dom_of = {p: feats[where[p]] for p in every}
    te_inc = np.stack([inc_of[p] for p in test_paths])
    te_dom = np.stack([dom_of[p] for p in test_paths])
    for name, paths in sets.items():
        if len(paths) < 2:
            out["sets"][name] = {"n_synthetic": len(paths), "note": "fewer than 2 images"}
            continue
        x_inc = np.stack([inc_of[p] for p in paths])
        x_dom = np.stack([dom_of[p] for p in paths])
        pr_inc = knn_precision_recall(te_inc, x_inc, cfg.pr_k)
        pr_dom = knn_precision_recall(te_dom, x_dom, cfg.pr_k)
        out["sets"][name] = {
            "n_images": len(paths), "n_available": n_available[name], "n_real_test": len(test_paths),
            "fid": frechet_distance(x_inc, te_inc),
            "fd_domain": frechet_distance(x_dom, te_dom),
            "precision": pr_inc["precision"], "recall": pr_inc["recall"],
            "precision_domain": pr_dom["precision"], "recall_domain": pr_dom["recall"], "pr_k": cfg.pr_k,
        }
        log(f"evaluate: quality of {name}: FID {out['sets'][name]['fid']:.1f}, domain FD "
            f"{out['sets'][name]['fd_domain']:.1f} ({len(paths)} vs {len(test_paths)} images)")
    return out
