"""K-fold evaluation of the whole pipeline (``tailfuse evaluate --folds K``).

Every image of the run (train, val and test alike) is assigned to one of K folds: scikit-learn's
``StratifiedGroupKFold`` (shuffled, seed ``data_seed``), stratified by each image's rarest label and grouped by the
run's group column (``patient_id`` when present), so a patient never spans two folds. For fold k, a *fold run*
``<run>/eval/folds-K-seed<s>/fold-k/`` holds the same latents (read from the parent run, never copied) with a split
of its own: fold k is its test set, ``fold_val_fraction`` of the rest (again stratified and grouped) its val set,
the remainder its training set. Head and tail labels stay those of the parent run.

In each fold run (``harness._evaluate_folds`` runs them) the sparse model is trained (with the parent's `tailfuse train` settings), and fusion, decoding and
the classifiers see only that fold's training part; `evaluate_split` then runs every arm as usual. The folds' test
predictions are pooled (every image predicted once, by the models of the fold that held it out) and the tables are
computed on the pooled predictions, the bootstrap resampling the pooled test images. Quality figures are the means
over folds. Fold runs are ordinary run folders: they resume, and `tailfuse info --run <fold run>` shows them.
"""

from __future__ import annotations

import logging

import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..config import TrainConfig, stable_hash
from ..store import RunStore, write_csv_atomic, write_json_atomic, write_text_atomic
from .config import EvaluateConfig

log = logging.getLogger("tailfuse")


def _strata(samples: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """Each row's rarest label (by count in the whole run), '' for a row without a label."""
    y = samples[labels].to_numpy()
    order = np.argsort(y.sum(0), kind="stable")[::-1]  # most common first; rarer labels overwrite
    out = np.full(len(samples), "", dtype=object)
    for j in order:
        out[y[:, j] == 1] = labels[j]
    return out


def _groups(store: RunStore, samples: pd.DataFrame) -> np.ndarray:
    col = (store.config().get("data") or {}).get("group_column") or ("patient_id" if "patient_id" in samples else None)
    if not col or col not in samples.columns:
        return samples["sample_id"].astype(str).to_numpy()
    g = samples[col].astype(str).str.strip().to_numpy().astype(object)
    empty = g == ""
    g[empty] = ["row-" + str(i) for i in samples["sample_id"].to_numpy()[empty]]
    return g


def _split_groups(strata: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index of every row (stratified, grouped, shuffled)."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(len(strata), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members": expected here
        for i, (_, te) in enumerate(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
                                    .split(np.zeros(len(strata)), strata, groups)):
            fold[te] = i
    return fold


def assign_folds(store: RunStore, k: int, val_fraction: float, seed: int) -> list[np.ndarray]:
    """For each fold, the split ('train' / 'val' / 'test') of every sample of the run, in samples.csv order."""
    samples = store.samples()
    labels = store.labels()["labels"]
    strata, groups = _strata(samples, labels), _groups(store, samples)
    fold = _split_groups(strata, groups, k, seed)
    n_val_folds = max(2, int(round(1 / val_fraction)))
    out = []
    for i in range(k):
        split = np.where(fold == i, "test", "train").astype(object)
        rest = np.flatnonzero(fold != i)
        inner = _split_groups(strata[rest], groups[rest], n_val_folds, seed + 1 + i)
        split[rest[inner == 0]] = "val"
        out.append(split)
    return out


def make_fold_run(store: RunStore, folder: Path, split: np.ndarray, note: str) -> RunStore:
    """A run folder reading the parent's latents, with its own split (created once; the same split reuses it)."""
    fold = RunStore(folder)
    ident = stable_hash({"parent_inputs": store.stage("encode")["inputs_hash"], "split": split.tolist()})
    enc = fold.stage("encode")
    if enc and enc.get("fold_hash") == ident:
        return fold
    if folder.exists():
        shutil.rmtree(folder)  # another split under this name: nothing in it is valid
    folder.mkdir(parents=True)
    samples = store.samples()
    samples["split"] = split
    samples["split_source"] = note
    info = dict(store.labels())
    info["counts"] = {lab: {**{s: int(samples.loc[samples["split"] == s, lab].sum()) for s in ("train", "val", "test")},
                            "total": int(samples[lab].sum())} for lab in info["labels"]}
    info["fold"] = note
    write_csv_atomic(fold.samples_csv, samples)
    write_json_atomic(fold.labels_json, info)
    parent = store.config()
    write_text_atomic(fold.run_yaml, yaml.safe_dump({k: v for k, v in parent.items() if k in ("data", "vae", "encode",
                                                                                          "train")}, sort_keys=False))
    rec = dict(store.stage("encode"))
    # latents_from: the parent run, relative to <run>/eval/folds-K-seedS/fold-k (the folder moves with its run)
    rec.update(latents_from="../../..", fold_hash=ident, inputs_hash=stable_hash([rec["inputs_hash"], ident]), fold=note)
    fold.write_stage("encode", rec)
    return fold


def fold_train_config(store: RunStore) -> TrainConfig:
    """The parent run's `tailfuse train` settings (run.yaml), for every fold's sparse model."""
    known = {f.name for f in fields(TrainConfig)}
    base = {k: v for k, v in (store.config().get("train") or {}).items() if k in known}
    base.update(no_imitation=False, name=None)
    return TrainConfig(**base)


def pool(raws: list[dict], k: int, cfg: EvaluateConfig) -> dict:
    """Concatenate the folds' test predictions (fold order) into one raw result."""
    first = raws[0]
    meta = dict(first["meta"])
    for key in ("train_positives", "val_positives", "test_positives"):
        meta[key] = {lab: int(sum(r["meta"][key][lab] for r in raws)) for lab in meta["labels"]}
    meta["n"] = {s: int(sum(r["meta"]["n"][s] for r in raws)) for s in ("train", "val", "test")}
    scores = {key: np.concatenate([r["scores"][key] for r in raws]) for key in first["scores"]}
    decided = {key: np.concatenate([r["decisions"][key] for r in raws]) for key in first["decisions"]}
    fit_info = {key: {"folds": [r["fit_info"].get(key) for r in raws]} for key in first["fit_info"]}
    for key, v in fit_info.items():  # the regularisation each fold picked
        cs = [f.get("c") for f in v["folds"] if f]
        if cs and all(c is not None for c in cs):
            v["c_per_fold"] = cs
    train_summary = {}
    for key in first["train_summary"]:
        parts = [r["train_summary"][key] for r in raws]
        train_summary[key] = {
            "n_train": int(round(np.mean([p["n_train"] for p in parts]))),
            "n_added": int(round(np.mean([p["n_added"] for p in parts]))),
            "added_positives_per_label": {lab: round(float(np.mean([p["added_positives_per_label"][lab] for p in parts])), 2)
                                          for lab in meta["labels"]},
            "train_positives_per_label": {lab: round(float(np.mean([p["train_positives_per_label"][lab] for p in parts])), 2)
                                          for lab in meta["labels"]},
            "per_fold_mean": True,
        }
    quality = None
    if all(r.get("quality") for r in raws):
        quality = _mean_quality([r["quality"] for r in raws])
    sets = {name: {**st, "per_fold": [r["sets"].get(name) for r in raws]} for name, st in first["sets"].items()}
    budgets = {bk: {**b, "per_label_per_fold": [r["budgets"][bk]["per_label"] for r in raws],
                    "per_label": {lab: int(sum(r["budgets"][bk]["per_label"][lab] for r in raws))
                                  for lab in b["per_label"]},
                    "rule": b["rule"] + f" (per fold; counts summed over the {k} folds)"}
               for bk, b in first["budgets"].items()}
    timings = {"total_seconds": round(sum(r["timings"]["total_seconds"] for r in raws), 1),
               "features_seconds": round(sum(r["timings"]["features_seconds"] for r in raws), 1),
               "per_arm": {}, "per_fold_seconds": [r["timings"]["total_seconds"] for r in raws]}
    for r in raws:
        for arm, t in r["timings"]["per_arm"].items():
            acc = timings["per_arm"].setdefault(arm, {})
            for kk, v in t.items():
                acc[kk] = round(acc.get(kk, 0.0) + v, 2)
    extra = {}
    for r in raws:
        for kk, v in (r["timings"].get("extra") or {}).items():
            extra[kk] = round(extra.get(kk, 0.0) + v, 1)
    if extra:
        timings["extra"] = extra
    return {
        "run": first["run"].rsplit("/eval/", 1)[0], "meta": meta, "budgets": budgets,
        "classifier_settings": first["classifier_settings"], "epochs": first["epochs"], "lr": first["lr"],
        "y_test": np.concatenate([r["y_test"] for r in raws]),
        "test_ids": np.concatenate([r["test_ids"] for r in raws]),
        "scores": scores, "decisions": decided, "select": first.get("select"), "fit_info": fit_info,
        "train_summary": train_summary, "sets": sets, "quality": quality,
        "timings": timings,
        "folds": {"k": k, "seed": cfg.data_seed, "val_fraction": cfg.fold_val_fraction,
                  "method": "scikit-learn StratifiedGroupKFold by rarest label and group column",
                  "n_test": [int(len(r["y_test"])) for r in raws],
                  "n_train_mean": float(np.mean([r["meta"]["n"]["train"] for r in raws])),
                  "n_val_mean": float(np.mean([r["meta"]["n"]["val"] for r in raws])),
                  "runs": [r["run"] for r in raws]},
    }


def _mean_quality(qs: list[dict]) -> dict:
    out = {k: v for k, v in qs[0].items() if k != "sets"}
    out["n_real_test"] = int(sum(q.get("n_real_test", 0) for q in qs))
    out["subsample"] = qs[0].get("subsample", "") + f"; means over {len(qs)} folds"
    out["seconds"] = round(sum(q.get("seconds", 0) for q in qs), 2)
    out["sets"] = {}
    for name, s in (qs[0].get("sets") or {}).items():
        per = [q["sets"].get(name) or {} for q in qs]
        if "fid" not in s:
            out["sets"][name] = s
            continue
        m = {}
        for key in ("n_images", "n_available", "fid", "fd_domain", "precision", "recall", "precision_domain",
                    "recall_domain"):
            vals = [p.get(key) for p in per if p.get(key) is not None]
            m[key] = float(np.mean(vals)) if vals else None
        m["n_images"], m["n_available"] = int(round(m["n_images"] or 0)), int(round(m["n_available"] or 0))
        aucs = [(p.get("separability") or {}).get("auc") for p in per]
        aucs = [a for a in aucs if a is not None]
        m["separability"] = {"auc": float(np.mean(aucs)) if aucs else None, "per_fold": aucs}
        mems = [(p.get("memorisation") or {}).get("share") for p in per]
        mems = [v for v in mems if v is not None]
        m["memorisation"] = {"share": float(np.mean(mems)) if mems else None, "per_fold": mems}
        m["per_fold"] = per
        out["sets"][name] = m
    return out
