"""Stage 8, evaluate: does the augmentation help a downstream classifier, and by how much.

Protocol (the default; every choice is recorded in ``results.json``)
--------------------------------------------------------------------
Data. The run's own splits: train (the arm's training set = real train rows + the arm's new samples), val (model
selection), test (every figure). Images are read at the run's image size and resize policy. With ``--folds K`` the
whole pipeline is evaluated K times (``folds.py``): every image is a test image once, the sparse model, the fusion
and the decoding of fold k see only fold k's training part, and the figures rest on the pooled test predictions.

Classifier (``--classifier linear``). Frozen EfficientNet-Lite0 ImageNet features (1280-d, ``features.Backbone``),
computed once per image file and cached in ``<run>/features``; an L2 logistic regression (scikit-learn, lbfgs) on
features standardised with the training items' mean and standard deviation, multinomial on multi-class data, one
binary model per label on multi-label data; soft targets and class weights enter as sample weights (exact). The
regularisation C is picked per arm (and seed) on val mAP from ``--c-grid`` (7 values, 3e-4 .. 0.3), so every arm gets
a classifier tuned the same way. The fit is deterministic: seeds vary only the arms' own random draws (oversample,
mixup). ``finetune`` (all EfficientNet-Lite0 layers) and ``cnn`` (a small CNN from scratch) train on the images
themselves, their weight decay picked on val from ``--weight-decay`` (see ``classifier.py``); much slower on a CPU.

Arms (same classifier and tuning; see ``config.py``):
  real                   real training images only
  reweight               real only, class-weighted loss (multi-label pos_weight = neg/pos; multi-class N/(C n_c))
  oversample             + duplicated tail rows (RandomOverSampler / tail-positive row duplication), drawn per seed
  smote                  + SMOTE (multi-class, imbalanced-learn) or MLSMOTE (multi-label) on VAE latents, decoded
  mixup                  + feature-space mixes of a tail sample with a random training sample (see resample.py)
  vae-roundtrip          + the tail images themselves after the VAE round trip (encode, decode; no fusion)
  tailfuse               + fusion with the 'train' model and default fuse / decode settings (PNG + manifest)
  tailfuse-no-imitation  + the same with the 'train-no-imitation' model (no iterated learning)
  reference              + fusion with the reference code's choices (EigenCAM, `tail` label policy)
  tailfuse-kept          (only when named) + tailfuse with the `kept` label policy (multi-label data)
  <fusion arm>[k=v,...]  (only when named) a fusion arm with other fuse / decode settings, e.g.
                         tailfuse[pixel_detail=true,candidates=3]
``--loss weighted`` class-weights every arm's loss by the class counts of its own training set (real plus added), so
``real`` is then the re-weighted baseline and each augmentation is measured with re-balancing on top.
Every augmentation arm adds the same number of new samples per tail label (``tailfuse.budget``; default: top each
tail label up to the median head-label train count, at most 5x its real count). ``--budgets 0.5,1,2,5`` also runs
every augmentation arm at those multiples of each tail label's real train count (the sweep). Synthetic images enter
training as a user would add them: PNG files plus manifest rows. The image arms' sets are made once per run (seed
``data_seed``), at the largest budget; smaller budgets take each label's first samples.

Metrics (test set). Per-label AP (labels without a test positive are left out of every mean and listed), mAP over
all / head / tail labels, macro AUROC, balanced accuracy and accuracy (multi-class); mean and standard deviation
over seeds. For every arm, the difference in tail mAP to each control present (real, oversample, cmo, vae-roundtrip)
with a paired bootstrap 95 % interval: test images resampled with replacement (``bootstrap`` resamples, seed
``data_seed``), the same resample for both arms, the difference averaged over seeds (seed s paired with seed s).

Quality (``quality_stage.py``): FID, domain Frechet distance, k-NN precision / recall of each image arm's tail
images against real test tail images, and their separability from real tail training images (AUC of a
cross-validated logistic regression on the frozen features; 0.5 = indistinguishable).

Caching. Features are cached per image file; each (arm, budget, seed) result is cached under ``eval/cache`` by a
hash of everything it depends on; synthetic sets are stage outputs that resume and are not redone. ``--force``
redoes all of it.
"""

from __future__ import annotations

import logging

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..budget import budget, strategy_from_flags, validate_strategy
from ..config import stable_hash
from ..dist import current
from ..errors import TailfuseError
from ..store import RunStore, now, npz_save_atomic, write_csv_atomic, write_json_atomic, write_text_atomic
from ..threads import adaptive, configure
from . import metrics as M
from .classifier import SELECT, TrainSet, class_weights, fit_images, fit_linear
from .config import CLASSIFIERS, CONTROLS, DEFAULT_EPOCHS, DRW_FROM, EPOCH_ARMS, LOSSES, NO_BUDGET_ARMS, ArmSpec, EvaluateConfig
from .resample import mixup_pairs, oversample_rows

log = logging.getLogger("tailfuse")

DEFAULT_LR = {"finetune": 1e-4, "cnn": 1e-3, "partial": 5e-4}
MAIN = "main"  # key of the default budget


def validate(cfg: EvaluateConfig) -> list[ArmSpec]:
    specs = cfg.arm_specs()  # raises on unknown arms / settings
    if not specs:
        raise TailfuseError("no arm to evaluate; --arms takes a comma-separated list.")
    if len({s.name for s in specs}) != len(specs) or len({s.slug for s in specs}) != len(specs) \
            or len(set(cfg.seeds)) != len(cfg.seeds):
        raise TailfuseError("--arms and --seeds must not repeat an entry.")
    if not cfg.seeds:
        raise TailfuseError("give at least one seed (--seeds 0,1,2).")
    if cfg.classifier not in CLASSIFIERS:
        raise TailfuseError(f"--classifier '{cfg.classifier}' unknown; choose from {', '.join(CLASSIFIERS)}.")
    if cfg.select is not None and cfg.select not in SELECT:
        raise TailfuseError(f"--select '{cfg.select}' unknown; choose from {', '.join(SELECT)}.")
    if cfg.pool < 1 or cfg.trainable_blocks < 1:
        raise TailfuseError("--pool and --trainable-blocks must be at least 1.")
    if cfg.loss not in LOSSES:
        raise TailfuseError(f"--loss '{cfg.loss}' unknown; choose from {', '.join(LOSSES)}.")
    loss_arms = [s.name for s in specs if s.base in ("reweight", "drw")]
    if cfg.loss == "weighted" and loss_arms:
        raise TailfuseError(f"under --loss weighted every arm's loss is class-weighted: the arm 'real' is the "
                            f"re-weighted baseline; leave {', '.join(loss_arms)} out of --arms.")
    epoch_arms = [s.name for s in specs if s.base in EPOCH_ARMS]
    if epoch_arms and cfg.classifier == "linear":
        raise TailfuseError(f"arm(s) {', '.join(epoch_arms)} act during training epochs; they need a classifier "
                            "trained in epochs (--classifier partial, cnn or finetune), not linear.")
    if isinstance(cfg.weight_decay, (int, float)):
        cfg.weight_decay = [float(cfg.weight_decay)]
    if not cfg.c_grid or min(cfg.c_grid) <= 0 or not cfg.weight_decay or min(cfg.weight_decay) < 0:
        raise TailfuseError("--c-grid needs positive values and --weight-decay non-negative ones.")
    if (cfg.epochs is not None and cfg.epochs < 1) or cfg.batch_size < 2 or cfg.bootstrap < 0:
        raise TailfuseError("--epochs must be >= 1, --batch-size >= 2 and --bootstrap >= 0.")
    if cfg.per_class is not None and cfg.balance_to is not None:
        raise TailfuseError("give either --per-class or --balance-to, not both.")
    validate_strategy(strategy_from_flags(cfg.per_class, cfg.balance_to, cfg.sampling_strategy, default="auto"),
                      cfg.max_ratio)
    if any(b <= 0 for b in cfg.budgets):
        raise TailfuseError("--budgets are positive multiples of each tail label's real train count, e.g. 0.5,1,2,5.")
    if cfg.folds is not None and cfg.folds < 2:
        raise TailfuseError(f"--folds {cfg.folds}: give at least 2 folds.")
    if not 0 < cfg.fold_val_fraction < 0.5:
        raise TailfuseError("--fold-val-fraction must be in (0, 0.5).")
    if cfg.fid_max_images < 2 or cfg.pr_k < 1 or cfg.smote_k < 1:
        raise TailfuseError("--fid-max-images must be >= 2, --pr-k and --smote-k >= 1.")
    return specs


def _mean_std(vals: list[float]) -> tuple[float | None, float | None]:
    v = np.array([x for x in vals if x is not None and not np.isnan(x)], dtype=np.float64)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def budgets(train_counts: dict[str, int], head: list[str], tail: list[str], cfg: EvaluateConfig) -> dict[str, dict]:
    """The default budget (key ``main``) and the sweep's (keys ``x<multiple>``): new samples per tail label."""
    strategy = strategy_from_flags(cfg.per_class, cfg.balance_to, cfg.sampling_strategy, default="auto")
    out = {MAIN: budget(train_counts, head, tail, strategy, cfg.max_ratio)}
    for b in cfg.budgets:
        out[f"x{b:g}"] = {"rule": f"{b:g} x each tail label's real train count", "multiple": float(b),
                          "per_label": {lab: int(round(b * train_counts[lab])) for lab in tail}}
    return out


def _first_per_label(tail_label: list[str], per_label: dict[str, int]) -> np.ndarray:
    """Rows of a set (in its order) that make the budget: the first n_l rows of each tail label l."""
    tl = np.asarray(tail_label)
    keep = [np.flatnonzero(tl == lab)[:n] for lab, n in per_label.items()]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def select_metric(cfg: EvaluateConfig, multi: bool) -> str:
    """What picks the model on val: ``--select``, else val mAP for the linear probe (its tables lead with tail mAP)
    and, for classifiers that learn from the images, the metric their tables lead with: balanced accuracy on
    multi-class data, mAP on multi-label data."""
    if cfg.select:
        if cfg.select == "balanced_accuracy" and multi:
            raise TailfuseError("--select balanced_accuracy needs multi-class data; use --select map.")
        return cfg.select
    return "map" if cfg.classifier == "linear" or multi else "balanced_accuracy"


def _draw_per_label(tail_label: list[str], per_label: dict[str, int], pool: int, seed: int, epoch: int,
                    salt: int = 0) -> np.ndarray:
    """Rows of a set for one epoch: with ``pool`` 1, the first n_l rows of each tail label l (a fixed set); with a
    pool of ``pool`` x n_l rows per label, n_l of them drawn afresh (without replacement, seeded by seed and epoch)."""
    if pool <= 1:
        return _first_per_label(tail_label, per_label)
    tl = np.asarray(tail_label)
    rng = np.random.default_rng([int(seed), int(epoch), int(salt)])
    keep = []
    for lab, n in per_label.items():
        cand = np.flatnonzero(tl == lab)[: n * pool]
        keep.append(rng.choice(cand, size=min(n, len(cand)), replace=False) if n > 0 and len(cand) else
                    np.zeros(0, np.int64))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


class _Pool:
    """Unique image paths (real train, val, test, then every arm's synthetic images) -> rows of a feature pool."""

    def __init__(self):
        self.paths: list[str] = []
        self.where: dict[str, int] = {}

    def add(self, paths: list[str]) -> np.ndarray:
        rows = []
        for p in paths:
            if p not in self.where:
                self.where[p] = len(self.paths)
                self.paths.append(p)
            rows.append(self.where[p])
        return np.asarray(rows, dtype=np.int64)


@dataclass
class _Split:
    """The run's labels and its train / val / test rows, as ``evaluate_split`` reads them once."""

    labels: list[str]
    head: list[str]
    tail: list[str]
    multi: bool
    image_size: int
    resize: str
    rows: dict[str, pd.DataFrame]  # train / val / test rows of samples.csv
    y: dict[str, np.ndarray]  # their label matrices
    train_counts: dict[str, int]
    path_col: str


def _read_split(store: RunStore) -> _Split:
    """Step 1: the run's labels and splits; refuse a run that cannot be evaluated."""
    info = store.labels()
    labels, head, tail, multi = info["labels"], info["head_labels"], info["tail_labels"], bool(info["multi_label"])
    image_size = int(info.get("image_size") or (store.config().get("data") or {}).get("image_size") or 128)
    resize = (store.config().get("data") or {}).get("resize", "center-crop")
    samples = store.samples()
    split = {s: samples[samples["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    for s in ("train", "val", "test"):
        if split[s].empty:
            raise TailfuseError(f"run folder {store.root} has no '{s}' samples; evaluate needs train, val and test "
                                "splits (give the manifest a split column with test rows, or use --folds).")
    if not tail:
        raise TailfuseError("the run has no tail labels; nothing to evaluate.")
    return _Split(labels, head, tail, multi, image_size, resize, split,
                  {s: split[s][labels].to_numpy(dtype=np.int64) for s in split},
                  {lab: int(split["train"][lab].sum()) for lab in labels}, info.get("path_column", "path"))


def _synthetic_sets(store: RunStore, cfg: EvaluateConfig, specs: list[ArmSpec], n_max: dict[str, int], progress: bool,
                    force: bool, timings: dict, extra_seconds: dict) -> dict[str, dict]:
    """Step 2: the models some arms need and the synthetic image sets of the image arms (made once, at the largest
    budget, ``cfg.pool`` times it when each epoch draws afresh)."""
    if any(s.base == "tailfuse-no-imitation" or dict(s.fuse).get("model") == "train-no-imitation" for s in specs):
        from .arms import ensure_no_imitation_model

        sec = ensure_no_imitation_model(store, cfg, progress)
        if sec:
            extra_seconds["train-no-imitation model training (not part of the evaluation budget)"] = round(sec, 1)
    if any(s.needs_prior for s in specs):
        from .arms import ensure_prior

        sec = ensure_prior(store, cfg, progress)
        if sec:
            extra_seconds["latent prior training (not part of the evaluation budget)"] = round(sec, 1)
    if cfg.classifier != "linear" and any(s.base == "feature-diffusion" for s in specs):
        raise TailfuseError("the feature-diffusion arm generates classifier features: it needs --classifier linear.")
    arm_sets: dict[str, dict] = {}
    pool_n = {lab: n * cfg.pool for lab, n in n_max.items()}  # each epoch draws n_l of a label's pool x n_l images
    for spec in [s for s in specs if s.is_image]:
        from .arms import make_image_arm

        t = time.time()
        log.info(f"evaluate: synthetic set of arm '{spec.name}'")
        arm_sets[spec.name] = make_image_arm(store, spec, pool_n, cfg, progress, force=force)
        timings[spec.name]["synthetic_set"] = round(time.time() - t, 2)
    return arm_sets


@dataclass
class _Inputs:
    """What the classifiers read: rows of one image pool (real splits, then every arm's set) and, per classifier,
    the pool's features (linear, quality), frozen maps (partial) or images (finetune, cnn)."""

    pool: _Pool
    rows_real: dict[str, np.ndarray]
    rows_arm: dict[str, np.ndarray]
    feats: np.ndarray | None
    images: torch.Tensor | None
    features_seconds: float


def _classifier_inputs(store: RunStore, cfg: EvaluateConfig, specs: list[ArmSpec], sp: _Split, arm_sets: dict,
                       n_max: dict[str, int], progress: bool, timings: dict) -> _Inputs:
    """Step 3: the image pool and what the classifier reads of it (feature-diffusion's generated features join the
    pool here, and its entry in ``arm_sets``)."""
    pool = _Pool()
    rows_real = {s: pool.add(sp.rows[s]["abs_path"].tolist()) for s in ("train", "val", "test")}
    rows_arm = {name: pool.add(st["paths"]) for name, st in arm_sets.items()}
    missing = [p for p in pool.paths if not os.path.isfile(p)]
    if missing:
        raise TailfuseError(f"{len(missing)} images of the run are missing (e.g. {missing[0]}); evaluate reads the "
                            "original image files recorded in samples.csv (abs_path).")
    feats, features_seconds = None, 0.0
    if cfg.classifier == "linear" or cfg.quality:
        from ..scoring import features_dir
        from .features import Backbone, image_features

        t = time.time()
        feats = image_features(pool.paths, Backbone(cfg.device), features_dir(store), sp.image_size,
                               cfg.feature_batch_size, progress, resize=sp.resize, desc="EfficientNet-Lite0 features")
        features_seconds = round(time.time() - t, 2)
        log.info(f"evaluate: features of {len(pool.paths)} images in {features_seconds:.1f} s (cached)")
        for spec in [s for s in specs if s.base == "feature-diffusion"]:  # generated features join the pool
            from .arms import feature_diffusion_set

            t = time.time()
            fd = feature_diffusion_set(store, spec, n_max, cfg, feats[rows_real["train"]],
                                       sp.y["train"].astype(np.float32), feats[rows_real["val"]],
                                       sp.y["val"].astype(np.float32), progress)
            rows_arm[spec.name] = np.arange(len(feats), len(feats) + len(fd["features"]))
            feats = np.concatenate([feats, fd["features"]])
            arm_sets[spec.name] = {**fd, "folder": store.root / "eval" / spec.slug, "no_images": True}
            timings[spec.name]["synthetic_set"] = round(time.time() - t, 2)
    images = None
    if cfg.classifier == "partial":  # the frozen part of the network, once per image (and its mirror image); cached
        from ..scoring import features_dir
        from .classifier import PartialMaps
        from .features import image_features

        t = time.time()
        trunk = PartialMaps(cfg.trainable_blocks, sp.image_size, cfg.device)
        flat = image_features(pool.paths, trunk, features_dir(store), sp.image_size, cfg.feature_batch_size, progress,
                              resize=sp.resize, desc="EfficientNet-Lite0 frozen maps")
        images = trunk.unflatten(flat).half()
        del flat
        features_seconds = round(features_seconds + time.time() - t, 2)
        log.info(f"evaluate: frozen maps {tuple(trunk.shape)} of {len(pool.paths)} images in {time.time() - t:.1f} s")
    elif cfg.classifier != "linear":
        from ..images import load_image

        images = torch.stack([(load_image(p, sp.image_size, sp.resize) * 255).round().to(torch.uint8)
                              for p in tqdm(pool.paths, desc="load images", disable=not progress, file=sys.stderr)])
    return _Inputs(pool, rows_real, rows_arm, feats, images, features_seconds)


def _classifier_settings(cfg: EvaluateConfig, sp: _Split) -> tuple[dict, int | None, float | None, str]:
    """Step 4: the classifier's settings as recorded (and hashed into every fit's cache key), its epochs and learning
    rate (None for the linear one), and the val metric that selects the model."""
    epochs = None if cfg.classifier == "linear" else (cfg.epochs or DEFAULT_EPOCHS[cfg.classifier])
    lr = None if cfg.classifier == "linear" else (cfg.lr or DEFAULT_LR[cfg.classifier])
    clf_settings = {"classifier": cfg.classifier, "backbone": "efficientnet-lite0-imagenet" if cfg.classifier == "linear"
                    else cfg.classifier, "image_size": sp.image_size, "resize": sp.resize}
    select = select_metric(cfg, sp.multi)
    select_name = {"map": "val mAP", "balanced_accuracy": "val balanced accuracy"}[select]
    if cfg.classifier == "linear":
        clf_settings.update(model="logistic regression (scikit-learn, lbfgs, L2)", c_grid=list(cfg.c_grid),
                            selection=select_name if select != "map" else "val mAP")
    else:
        clf_settings.update(epochs=epochs, lr=lr, weight_decay_grid=list(cfg.weight_decay), batch_size=cfg.batch_size,
                            selection=f"{select_name} (epoch and weight decay)")
        if cfg.classifier == "partial":
            clf_settings.update(trainable_blocks=cfg.trainable_blocks, schedule="cosine")
    if cfg.pool > 1:
        clf_settings["pool"] = cfg.pool  # the keys only then: the tables made before keep their cache keys
    if cfg.loss != "ce":
        clf_settings["loss"] = cfg.loss
    return clf_settings, epochs, lr, select


def _fit_arms(store: RunStore, cfg: EvaluateConfig, specs: list[ArmSpec], sp: _Split, buds: dict, arm_sets: dict,
              inp: _Inputs, base_ident: dict, epochs: int | None, lr: float | None, select: str, force: bool,
              progress: bool, timings: dict) -> dict[str, dict]:
    """Step 5: every arm x budget x seed: its training set, its fit (or the cached one), its val and test scores.
    Returns ``scores``, ``val_scores``, ``fit_info`` (keyed ``arm|budget|seed``) and ``train_summary`` (``arm|budget``)."""
    eval_dir = store.root / "eval"
    y_tr, n_tr, a = sp.y["train"], len(sp.rows["train"]), inp.rows_real["train"]
    out: dict[str, dict] = {"scores": {}, "val_scores": {}, "fit_info": {}, "train_summary": {}}
    jobs = [(spec, bkey) for spec in specs for bkey in ([MAIN] if spec.base in NO_BUDGET_ARMS else list(buds))]
    bar = tqdm(total=len(jobs) * len(cfg.seeds), desc="arms x budgets x seeds", disable=not progress, file=sys.stderr)
    try:
        for spec, bkey in jobs:
            t_arm = time.time()
            per_label = buds[bkey]["per_label"]
            col_counts = {sp.labels.index(lab): n for lab, n in per_label.items() if n > 0}
            for seed in cfg.seeds:
                ident = dict(base_ident, arm=spec.name, budget=per_label if spec.base not in NO_BUDGET_ARMS else None)
                train_at, random_draws, extra = _train_sets(spec, bkey, seed, cfg, a, y_tr, sp.multi, col_counts,
                                                            per_label, arm_sets, inp.rows_arm, sp.rows["train"],
                                                            eval_dir, sp.path_col, sp.labels)
                ident.update(extra)
                ts = train_at(0)
                # the linear classifier is deterministic: an arm without random draws gives one result for all seeds
                seed_free = cfg.classifier == "linear" and not random_draws
                if not seed_free:
                    ident["seed"] = seed
                key = f"{spec.name}|{bkey}|{seed}"
                out["train_summary"].setdefault(f"{spec.name}|{bkey}", _summary_of(ts, n_tr, sp.labels))
                h = stable_hash(ident)[:16]
                cache = eval_dir / "cache" / spec.slug / f"{bkey}-{'all' if seed_free else f'seed{seed}'}-{h}.npz"
                if not (cache.is_file() and not force and _load_fit(cache, key, out)):
                    weights = loss_weights(cfg.loss, spec.base, y_tr, ts.y, sp.multi)
                    weights_from = int(DRW_FROM * epochs) if spec.base == "drw" else 0
                    t = time.time()
                    if cfg.classifier == "linear":
                        p, fi = fit_linear(inp.feats, ts, inp.rows_real["val"], sp.y["val"], inp.rows_real["test"],
                                           multi_label=sp.multi, weights=weights, c_grid=cfg.c_grid, select=select)
                    else:
                        p, fi = _fit_torch(cfg, inp.images, train_at, inp.rows_real, sp.y["val"], sp.multi, weights,
                                           seed, epochs, lr, progress, f"{spec.name} {bkey} seed {seed}", select,
                                           weights_from)
                    fi["seconds"] = round(time.time() - t, 2)
                    fi["n_train_items"] = len(ts)
                    out["val_scores"][key] = fi.pop("val_scores")
                    out["scores"][key], out["fit_info"][key] = p, fi
                    npz_save_atomic(cache, test_scores=p, val_scores=out["val_scores"][key],
                                    info=np.array(json.dumps(fi)))
                bar.update(1)
            timings[spec.name][f"classifier_{bkey}"] = round(time.time() - t_arm, 2)
    finally:
        bar.close()
    return out


def _load_fit(cache: Path, key: str, out: dict) -> bool:
    """A cached fit into ``out``; False for a cache from before the decision metrics (it holds no val scores)."""
    with np.load(cache) as z:
        if "val_scores" not in z.files:
            return False
        out["scores"][key], out["val_scores"][key] = z["test_scores"], z["val_scores"]
        out["fit_info"][key] = json.loads(str(z["info"]))
    return True


def _quality(store: RunStore, cfg: EvaluateConfig, sp: _Split, buds: dict, arm_sets: dict, inp: _Inputs,
             progress: bool) -> dict:
    """Step 6 (``--quality``): how close each image arm's tail images (its main-budget selection) are to real ones."""
    from .quality_stage import run_quality

    t = time.time()
    main_sets = {}
    for name, st in arm_sets.items():
        if st.get("no_images"):
            continue
        sel = _first_per_label(st["tail_label"], buds[MAIN]["per_label"])
        main_sets[name] = {**st, "paths": [st["paths"][i] for i in sel],
                           "main_tail_label": [st["tail_label"][i] for i in sel]}
    quality = run_quality(store, cfg, sp.tail, sp.rows, main_sets, inp.feats, inp.pool.where, sp.image_size,
                          sp.resize, progress)
    quality["seconds"] = round(time.time() - t, 2)
    return quality


def evaluate_split(store: RunStore, cfg: EvaluateConfig, specs: list[ArmSpec], force: bool = False,
                   progress: bool = True) -> dict:
    """Every arm x budget x seed on the run's own train / val / test split. Returns the raw results (test
    predictions per arm, budget and seed, and what they rest on) that ``summarise`` turns into tables.

    The steps: read the split (1), make the synthetic sets (2; every process of a multi-process run helps, the rest
    is the main process's), the classifier's inputs (3) and settings (4), fit every arm (5), the decisions, and the
    quality figures (6)."""
    t_start = time.time()
    sp = _read_split(store)
    (store.root / "eval").mkdir(parents=True, exist_ok=True)
    store.write_config("evaluate", asdict(cfg))
    enc = store.stage("encode")
    buds = budgets(sp.train_counts, sp.head, sp.tail, cfg)
    n_max = {lab: max(b["per_label"][lab] for b in buds.values()) for lab in sp.tail}
    log.info(f"evaluate: {len(sp.rows['train'])} train / {len(sp.rows['val'])} val / {len(sp.rows['test'])} test images; "
        f"budget: " + ", ".join(f"{lab} +{n}" for lab, n in buds[MAIN]["per_label"].items())
        + f" ({buds[MAIN]['rule']})" + (f"; sweep {', '.join(k for k in buds if k != MAIN)}" if len(buds) > 1 else ""))
    timings: dict[str, dict] = {s.name: {} for s in specs}
    extra_seconds: dict[str, float] = {}
    arm_sets = _synthetic_sets(store, cfg, specs, n_max, progress, force, timings, extra_seconds)
    dist = current(cfg.device)
    if not dist.is_main:  # several processes made the synthetic sets together; the rest is the main process's
        dist.barrier()
        return None
    inp = _classifier_inputs(store, cfg, specs, sp, arm_sets, n_max, progress, timings)
    clf_settings, epochs, lr, select = _classifier_settings(cfg, sp)
    base_ident = {"clf": clf_settings, "encode": enc["config_hash"], "inputs": enc["inputs_hash"], "labels": sp.labels,
                  "tail": sp.tail, "ids": {s: sp.rows[s]["sample_id"].tolist() for s in sp.rows}}
    fits = _fit_arms(store, cfg, specs, sp, buds, arm_sets, inp, base_ident, epochs, lr, select, force, progress,
                     timings)
    # decisions: argmax (multi-class), or each label's val-F1 threshold of this split (multi-label)
    decided = {k: M.decisions(v, sp.multi, M.val_thresholds(sp.y["val"], fits["val_scores"][k]) if sp.multi else None)
               for k, v in fits["scores"].items()}
    quality = _quality(store, cfg, sp, buds, arm_sets, inp, progress) if cfg.quality else None
    dist.barrier()
    y_va, y_te = sp.y["val"], sp.y["test"]
    return {
        "run": str(store.root.resolve()),
        "meta": {"labels": sp.labels, "head_labels": sp.head, "tail_labels": sp.tail, "multi_label": sp.multi,
                 "image_size": sp.image_size, "resize": sp.resize, "n": {s: int(len(sp.rows[s])) for s in sp.rows},
                 "train_positives": sp.train_counts,
                 "val_positives": {lab: int(y_va[:, j].sum()) for j, lab in enumerate(sp.labels)},
                 "test_positives": {lab: int(y_te[:, j].sum()) for j, lab in enumerate(sp.labels)}},
        "budgets": buds, "classifier_settings": clf_settings, "epochs": epochs, "lr": lr,
        "y_test": y_te, "test_ids": sp.rows["test"]["sample_id"].to_numpy(),
        "scores": fits["scores"], "decisions": decided, "select": select, "fit_info": fits["fit_info"],
        "train_summary": fits["train_summary"],
        "sets": {name: {"folder": str(st["folder"]), "soft_targets": st.get("soft", False), **st["made"]}
                 for name, st in arm_sets.items()},
        "quality": quality,
        "timings": {"total_seconds": round(time.time() - t_start, 1), "features_seconds": inp.features_seconds,
                    "per_arm": timings, **({"extra": extra_seconds} if extra_seconds else {})},
    }


def loss_weights(loss: str, base: str, y_real: np.ndarray, y_arm: np.ndarray, multi: bool) -> torch.Tensor | None:
    """The class weights of an arm's loss: under ``loss='weighted'`` every arm's, from the class counts of its own
    training set ``y_arm`` (real plus added, soft targets counted by their mass); under ``ce`` only reweight's and
    drw's, from the real training set ``y_real``; otherwise none."""
    if loss == "weighted":
        return class_weights(np.asarray(y_arm), multi)
    return class_weights(y_real, multi) if base in ("reweight", "drw") else None


def _train_sets(spec: ArmSpec, bkey: str, seed: int, cfg: EvaluateConfig, a: np.ndarray, y_tr: np.ndarray, multi: bool,
                col_counts: dict, per_label: dict, arm_sets: dict, rows_arm: dict, train: pd.DataFrame, eval_dir: Path,
                path_col: str, labels: list[str]):
    """The arm's training items as a function of the epoch (``train_at(epoch) -> TrainSet``), whether the arm draws
    at random, and what its draws add to the cache key. Real rows are rows ``a`` of the pool; oversample duplicates
    tail rows, mixup mixes pairs, an image arm adds its set's rows (a fixed set, or with ``cfg.pool`` > 1 a fresh
    draw from a pool each epoch; oversample then also draws its duplicates afresh each epoch). With ``cfg.pool`` 1
    every epoch gets the same items."""
    n_tr = len(a)
    real = TrainSet(a, a, np.ones(n_tr), y_tr.astype(np.float32))
    if spec.base == "oversample":
        def train_at(ep):
            dup = oversample_rows(y_tr, col_counts, multi, seed if cfg.pool <= 1 or ep == 0 else seed + 7919 * ep)
            return TrainSet(np.r_[a, a[dup]], np.r_[a, a[dup]], np.ones(n_tr + len(dup)),
                            np.r_[y_tr, y_tr[dup]].astype(np.float32))

        if bkey == MAIN:  # the added rows as a user would add them: rows pointing at the originals
            dup = oversample_rows(y_tr, col_counts, multi, seed)
            dm = pd.DataFrame({path_col: train["abs_path"].to_numpy()[dup], "split": "synthetic"})
            for j, lab in enumerate(labels):
                dm[lab] = y_tr[dup, j]
            write_csv_atomic(eval_dir / "oversample" / f"manifest-seed{seed}.csv", dm)
        return train_at, True, {}
    if spec.base == "mixup":
        ia, ib, lam = mixup_pairs(y_tr, col_counts, cfg.mixup_alpha, seed)
        ym = lam[:, None] * y_tr[ia] + (1 - lam[:, None]) * y_tr[ib]
        ts = TrainSet(np.r_[a, a[ia]], np.r_[a, a[ib]], np.r_[np.ones(n_tr), lam], np.r_[y_tr, ym].astype(np.float32))
        if bkey == MAIN:  # feature-space mixes have no image: the pairs and weights are recorded
            pm = pd.DataFrame({"path_a": train["abs_path"].to_numpy()[ia], "path_b": train["abs_path"].to_numpy()[ib],
                               "lambda": lam})
            for j, lab in enumerate(labels):
                pm[lab] = ym[:, j]
            write_csv_atomic(eval_dir / "mixup" / f"pairs-seed{seed}.csv", pm)
        return (lambda ep: ts), True, {"mixup_alpha": cfg.mixup_alpha}
    if spec.name in arm_sets:
        st = arm_sets[spec.name]
        salt = int(stable_hash(spec.name)[:8], 16)

        def train_at(ep):
            sel = _draw_per_label(st["tail_label"], per_label, cfg.pool, seed, ep, salt)
            r = rows_arm[spec.name][sel]
            return TrainSet(np.r_[a, r], np.r_[a, r], np.ones(n_tr + len(r)), np.r_[y_tr, st["y"][sel]].astype(np.float32))

        return train_at, cfg.pool > 1, {"set": st["identity"]}
    return (lambda ep: real), False, {}


def _fit_torch(cfg, images, train, rows_real, y_va, multi, weights, seed, epochs, lr, progress, desc, select="map",
               weights_from=0):
    """partial / finetune / cnn: one fit per weight decay of the grid, the best on val kept."""
    best = None
    for wd in cfg.weight_decay:
        p, fi = fit_images(cfg.classifier, images, train, rows_real["val"], y_va, rows_real["test"], multi_label=multi,
                           weights=weights, seed=seed, epochs=epochs, lr=lr, weight_decay=wd, batch_size=cfg.batch_size,
                           device=cfg.device, progress=progress, desc=f"{desc} wd {wd:g}", select=select,
                           weights_from=weights_from, trainable_blocks=cfg.trainable_blocks)
        fi["weight_decay"] = wd
        score = fi["val_score"] if fi["val_score"] is not None else -np.inf
        if best is None or score > best[0]:
            best = (score, p, fi)
    return best[1], best[2]


def _summary_of(ts: TrainSet, n_real: int, labels: list[str]) -> dict:
    added = ts.y[n_real:]
    return {"n_train": int(len(ts)), "n_added": int(len(added)),
            "added_positives_per_label": {lab: round(float(added[:, j].sum()), 2) for j, lab in enumerate(labels)},
            "train_positives_per_label": {lab: round(float(ts.y[:, j].sum()), 2) for j, lab in enumerate(labels)}}


def seed_scores(raw: dict, cfg: EvaluateConfig, name: str, bkey: str = MAIN) -> list:
    """The test scores of arm ``name`` at budget ``bkey``, one array per seed of ``cfg.seeds``."""
    return [raw["scores"][f"{name}|{bkey}|{s}"] for s in cfg.seeds]


def tail_delta(raw: dict, cfg: EvaluateConfig, metric: str = "map_tail"):
    """The tables' differences on raw predictions, as a function ``delta(arm, budget, control,
    control_budget=MAIN)``: arm minus control in ``metric`` (tail mAP of the scores, or a decision metric of the
    decisions), paired bootstrap over test images with the seeds averaged, the same resamples (``cfg.bootstrap`` of
    them, seed ``cfg.data_seed``) for every pair and metric; it returns None when ``cfg.bootstrap`` is 0."""
    meta = raw["meta"]
    y = raw["y_test"]
    tail_idx = [meta["labels"].index(lab) for lab in meta["tail_labels"]]
    boot_idx = M.bootstrap_indices(len(y), cfg.bootstrap, cfg.data_seed) if cfg.bootstrap else None
    source = raw["scores"] if metric == "map_tail" else raw["decisions"]

    def of(name, bkey):
        return [source[f"{name}|{bkey}|{s}"] for s in cfg.seeds]

    def delta(name: str, bkey: str, control: str, control_bkey: str = MAIN) -> dict | None:
        if boot_idx is None:
            return None
        return M.paired_bootstrap(y, of(name, bkey), of(control, control_bkey), tail_idx, boot_idx, metric=metric)

    return delta


def decision_metric_names(multi: bool) -> list[str]:
    return [m for m in M.DECISION_METRICS if m != "balanced_accuracy" or not multi]


def summarise(raw: dict, cfg: EvaluateConfig, specs: list[ArmSpec]) -> dict:
    """Tables from raw predictions: per arm at the main budget, the controls' paired differences, the sweep."""
    meta = raw["meta"]
    labels, head, tail, multi = meta["labels"], meta["head_labels"], meta["tail_labels"], meta["multi_label"]
    y = raw["y_test"]
    names = [s.name for s in specs]
    seeds_of = partial(seed_scores, raw, cfg)
    delta = tail_delta(raw, cfg)

    arms = {}
    decided = decision_metric_names(multi)
    deltas = {m: tail_delta(raw, cfg, m) for m in decided} if raw.get("decisions") else {}
    keys = ["map_all", "map_head", "map_tail", "auroc_macro"] + (["accuracy"] if not multi else []) + decided
    for spec in specs:
        per_seed = {}
        for seed in cfg.seeds:
            key = f"{spec.name}|{MAIN}|{seed}"
            m = M.summary(y, raw["scores"][key], labels, head, tail, multi, (raw.get("decisions") or {}).get(key))
            m.update(raw["fit_info"].get(f"{spec.name}|{MAIN}|{seed}", {}))
            per_seed[str(seed)] = m
        entry = {}
        for k in keys:
            entry[k], entry[f"{k}_std"] = _mean_std([per_seed[str(s)][k] for s in cfg.seeds])
        ap = {lab: [per_seed[str(s)]["per_label_ap"][lab] for s in cfg.seeds] for lab in labels}
        entry["per_label_ap"] = {lab: _mean_std(v)[0] for lab, v in ap.items()}
        entry["per_label_ap_std"] = {lab: _mean_std(v)[1] for lab, v in ap.items()}
        entry.update(raw["train_summary"][f"{spec.name}|{MAIN}"])
        if spec.name in raw["sets"]:
            entry["synthetic_set"] = raw["sets"][spec.name]
        entry["delta_map_tail"] = {c: delta(spec.name, MAIN, c) for c in CONTROLS if c in names and c != spec.name}
        entry["delta_map_tail"] = {c: d for c, d in entry["delta_map_tail"].items() if d is not None}
        if "real" in entry["delta_map_tail"]:
            entry["delta_map_tail_vs_real"] = entry["delta_map_tail"]["real"]
        for metric, dfn in deltas.items():  # the decision metrics' differences to the same controls
            ds = {c: dfn(spec.name, MAIN, c) for c in CONTROLS if c in names and c != spec.name}
            entry[f"delta_{metric}"] = {c: d for c, d in ds.items() if d is not None}
        entry["per_label_f1"] = {lab: _mean_std([per_seed[str(s)]["per_label_f1"][lab] for s in cfg.seeds])[0]
                                 for lab in labels}
        entry["seeds"] = per_seed
        arms[spec.name] = entry

    sweep = {}
    sweep_keys = [k for k in raw["budgets"] if k != MAIN]
    if sweep_keys:
        for spec in [s for s in specs if s.base not in NO_BUDGET_ARMS]:
            rows = {}
            for bkey in sweep_keys:
                tm = [M.summary(y, p, labels, head, tail, multi)["map_tail"] for p in seeds_of(spec.name, bkey)]
                m, sd = _mean_std(tm)
                rows[bkey] = {"multiple": raw["budgets"][bkey]["multiple"], "per_label": raw["budgets"][bkey]["per_label"],
                              "map_tail": m, "map_tail_std": sd,
                              "delta_vs_real": delta(spec.name, bkey, "real") if "real" in names else None}
                for c in ("oversample", "vae-roundtrip"):
                    if c in names and c != spec.name:
                        rows[bkey][f"delta_vs_{c}"] = delta(spec.name, bkey, c, bkey)
            sweep[spec.name] = rows
    test_pos = meta["test_positives"]
    return {
        "run": raw["run"],
        "created_at": now(),
        "dataset": {**meta, "labels_without_test_positives": [lab for lab, n in test_pos.items() if n == 0]},
        "protocol": {**asdict(cfg), "epochs": raw["epochs"], "lr": raw["lr"], "budget": raw["budgets"][MAIN],
                     "budgets": raw["budgets"], "classifier_settings": raw["classifier_settings"],
                     "bootstrap": {"resamples": cfg.bootstrap, "unit": "test image", "paired": True,
                                   "seed_average": True, "interval": "percentile 95%"},
                     "selection": raw.get("select", "map"),
                     "decisions": ("argmax class" if not multi else
                                   "each label's score against the threshold that maximised its F1 on val")},
        "arms": arms,
        "sweep": sweep,
        "quality": raw["quality"],
        "timings": raw["timings"],
    }


def _write(results: dict, out_dir) -> dict:
    from .tables import plots, results_markdown

    write_json_atomic(out_dir / "results.json", results)
    write_text_atomic(out_dir / "results.md", results_markdown(results))
    try:
        results["plots"] = plots(results, out_dir)
    except Exception as e:  # plotting is a convenience; the numbers are written already
        log.info(f"evaluate: plots failed ({type(e).__name__}: {e})")
        results["plots"] = []
    write_json_atomic(out_dir / "results.json", results)
    return results


def save_scores(raw: dict, out_dir) -> None:
    """The test predictions behind the tables: ``scores.npz`` with ``y_test``, ``test_ids`` and one array per arm,
    budget and seed (key ``<arm>__<budget>__<seed>``), for pairwise comparisons after the fact."""
    npz_save_atomic(out_dir / "scores.npz", y_test=raw["y_test"], test_ids=raw["test_ids"],
                    **{k.replace("|", "__"): v for k, v in raw["scores"].items()})
    if raw.get("decisions"):  # the binary decisions behind the decision metrics, keyed the same way
        npz_save_atomic(out_dir / "decisions.npz", **{k.replace("|", "__"): v for k, v in raw["decisions"].items()})


def load_scores(out_dir) -> dict:
    """What ``save_scores`` wrote: ``{"y_test", "test_ids", "scores": {"<arm>|<budget>|<seed>": array}}``."""
    with np.load(Path(out_dir) / "scores.npz") as z:
        out = {"y_test": z["y_test"], "test_ids": z["test_ids"],
               "scores": {k.replace("__", "|"): z[k] for k in z.files if k not in ("y_test", "test_ids")}}
    if (Path(out_dir) / "decisions.npz").is_file():
        with np.load(Path(out_dir) / "decisions.npz") as z:
            out["decisions"] = {k.replace("__", "|"): z[k] for k in z.files}
    return out


def _evaluate_folds(store: RunStore, cfg: EvaluateConfig, specs: list[ArmSpec], force: bool, progress: bool):
    """Evaluate every fold (``folds.py`` makes the fold runs); return the pooled raw results and the output folder."""
    from dataclasses import replace

    from ..train import run_train
    from .folds import assign_folds, fold_train_config, make_fold_run, pool

    k = int(cfg.folds)
    out_dir = store.root / "eval" / f"folds-{k}-seed{cfg.data_seed}"
    splits = assign_folds(store, k, cfg.fold_val_fraction, cfg.data_seed)
    tcfg = fold_train_config(store)
    inner = replace(cfg, folds=None)
    raws = []
    for i, split in enumerate(splits):
        note = f"fold {i + 1} of {k} (seed {cfg.data_seed})"
        dist = current(cfg.device)
        if dist.is_main:
            make_fold_run(store, out_dir / f"fold-{i}", split, note)
        dist.barrier()
        fold = RunStore(out_dir / f"fold-{i}")
        log.info(f"evaluate: == {note}: {int((split == 'train').sum())} train / {int((split == 'val').sum())} val / "
            f"{int((split == 'test').sum())} test images")
        if not (fold.stage("train") or {}).get("status") == "done":
            log.info(f"evaluate: training the sparse model of {note}")
        run_train(str(fold.root), tcfg, progress=progress)
        raw = evaluate_split(fold, inner, specs, force, progress)
        if raw is not None:  # the main process (others helped make the sets)
            _write(summarise(raw, inner, specs), fold.root / "eval")  # the fold's own tables
            raws.append(raw)
    return (pool(raws, k, cfg) if raws else None), out_dir


def run_evaluate(run: str, cfg: EvaluateConfig, force: bool = False, progress: bool = True,
                 command: str | None = None) -> dict:
    specs = validate(cfg)
    if cfg.threads:  # a count chosen in the config: as --threads (kept whatever else the machine runs)
        configure(int(cfg.threads))
    return _run_evaluate(run, cfg, specs, force, progress, command)


@adaptive
def _run_evaluate(run: str, cfg: EvaluateConfig, specs: list[ArmSpec], force: bool, progress: bool,
                  command: str | None) -> dict:
    t_start = time.time()
    store = RunStore(run)
    store.require("encode")
    if cfg.folds:
        raw, out_dir = _evaluate_folds(store, cfg, specs, force, progress)
    else:
        raw = evaluate_split(store, cfg, specs, force, progress)
        out_dir = store.root / "eval"
    if raw is None:  # another process than the main one: it helped make the synthetic sets
        return {"output": str(out_dir), "arms": {}, "run": str(store.root.resolve())}
    results = summarise(raw, cfg, specs)
    if cfg.folds:
        results["folds"] = raw["folds"]
    results["command"] = command
    results["output"] = str(out_dir)
    results["timings"]["total_seconds"] = round(time.time() - t_start, 1)
    results["timings"]["evaluation_seconds"] = round(time.time() - t_start - sum((results["timings"].get("extra") or {}).values()), 1)
    save_scores(raw, out_dir)
    results = _write(results, out_dir)
    log.info(f"evaluate: wrote {out_dir / 'results.json'} and results.md in {time.time() - t_start:.0f} s")
    return results
