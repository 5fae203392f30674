"""Quality figures of every image arm against held-out real tail images (see quality.py for the statistics), and
its separability from the real tail training images (``quality.separability_auc``)."""

from __future__ import annotations

import logging

import numpy as np

from .config import EvaluateConfig
from .quality import InceptionFID, frechet_distance, knn_precision_recall, memorisation, separability_auc

log = logging.getLogger("tailfuse")


FLOOR = "floor (real train)"


def _subsample(n: int, m: int, seed: int) -> np.ndarray:
    if n <= m:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


def run_quality(store, cfg: EvaluateConfig, tail, split, arm_sets, feats, where, image_size, resize, progress) -> dict:
    """FID, domain Frechet distance and k-NN precision/recall of each image arm (and the real-train floor) against
    the real test images that carry a tail label, pooled over tail labels; and each set's separability from the
    real training images carrying a tail label (the floor: real test against real train)."""
    from ..scoring import features_dir
    from .features import image_features

    def tail_rows(df):
        return df[df[tail].sum(axis=1) > 0]["abs_path"].tolist()

    test_paths = tail_rows(split["test"])
    train_paths = tail_rows(split["train"])
    all_test_paths = list(test_paths)
    cap = min(cfg.fid_max_images, max(len(train_paths), 2))
    sets = {FLOOR: [train_paths[i] for i in _subsample(len(train_paths), cap, cfg.data_seed)]}
    n_available = {FLOOR: len(train_paths)}
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
    inc = image_features(every, inception, features_dir(store), image_size, cfg.feature_batch_size, progress,
                         resize=resize, desc="Inception features")
    inc_of = {p: inc[i] for i, p in enumerate(every)}
    dom_of = {p: feats[where[p]] for p in every}
    te_inc = np.stack([inc_of[p] for p in test_paths])
    te_dom = np.stack([dom_of[p] for p in test_paths])
    tr_dom = np.stack([feats[where[p]] for p in train_paths])
    from ..nearcopy import RegionIndex, load_images

    copies = RegionIndex.from_paths(split["train"]["abs_path"].tolist(), image_size, resize,
                                    ids=split["train"]["sample_id"].to_numpy())
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
        # separability from the real tail training images: every unique image of the set (a set that repeats
        # images, like the cycled round trip, would otherwise meet its own copies across the CV folds); the floor
        # is the real tail *test* images against the same training images
        sep_paths = all_test_paths if name == FLOOR else list(dict.fromkeys(arm_sets[name]["paths"]))
        out["sets"][name]["separability"] = separability_auc(tr_dom, np.stack([feats[where[p]] for p in sep_paths]),
                                                             cfg.data_seed)
        # near-copies of real training images, per tail label (the floor: real test images against real train)
        mem_paths = all_test_paths if name == FLOOR else arm_sets[name]["paths"]
        mem_groups = None if name == FLOOR else arm_sets[name]["main_tail_label"]
        out["sets"][name]["memorisation"] = memorisation(copies, load_images(mem_paths, image_size, resize), mem_groups)
        auc = out["sets"][name]["separability"]["auc"]
        log.info(f"evaluate: quality of {name}: FID {out['sets'][name]['fid']:.1f}, domain FD "
            f"{out['sets'][name]['fd_domain']:.1f} ({len(paths)} vs {len(test_paths)} images), separability AUC "
            + ("n/a" if auc is None else f"{auc:.3f}"))
    return out
