"""Classification metrics, vectorised over labels (and bootstrap resamples), and the paired bootstrap.

* ``average_precision(y, s)``: AP per column, the step-wise area of scikit-learn's ``average_precision_score``
  (``sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds, ties grouped), NaN for a column without positives.
* ``auroc(y, s)``: area under the ROC curve per column by the rank-sum (Mann-Whitney) identity with averaged ranks
  for ties, NaN for a column without both classes.
* ``summary(y, s, ...)``: per-label AP, mAP over all / head / tail labels (labels without a test positive are left
  out and listed), macro AUROC, and for multi-class data balanced accuracy and top-1 accuracy.
* Decision metrics (what a user deploys: a decision per image, not a ranking), from binary decisions ``d`` (N x L):
  the argmax class as one-hot on multi-class data; on multi-label data each label's score against the threshold that
  maximised that label's F1 on val (``val_thresholds``, chosen within each split or fold). ``decision_metrics``:
  balanced accuracy (multi-class only: mean recall over the classes with a test positive; the ISIC 2018 challenge's
  metric), macro-F1 (mean F1 over the labels with a test positive), tail recall (mean recall over the tail labels
  with a test positive).
* ``paired_bootstrap(...)``: the difference in a metric (tail mAP by default, or a decision metric) of an arm to a
  control, over test images resampled with replacement, the same resample for both arms, averaged over seeds;
  2.5 / 97.5 percentiles.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def average_precision(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AP of every column of scores ``s`` (N x M) for binary targets ``y`` (N x M, or N for one column)."""
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    squeeze = y.ndim == 1
    if squeeze:
        y, s = y[:, None], s[:, None]
    if y.shape != s.shape:
        raise ValueError(f"targets {y.shape} and scores {s.shape} differ in shape")
    n, m = y.shape
    if n == 0:
        out = np.full(m, np.nan)
        return out[0] if squeeze else out
    order = np.argsort(-s, axis=0, kind="mergesort")
    ss = np.take_along_axis(s, order, axis=0)
    yy = (np.take_along_axis(y, order, axis=0) > 0).astype(np.float64)
    tps = np.cumsum(yy, axis=0)
    prec = tps / np.arange(1, n + 1)[:, None]
    # the last position of every run of tied scores is a threshold; every position takes its run's precision
    is_end = np.ones((n, m), dtype=bool)
    is_end[:-1] = ss[:-1] != ss[1:]
    end_idx = np.where(is_end, np.arange(n)[:, None], n)
    end_idx = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]
    p_at = np.take_along_axis(prec, end_idx, axis=0)
    n_pos = yy.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (yy * p_at).sum(0) / n_pos
    ap[n_pos == 0] = np.nan
    return ap[0] if squeeze else ap


def auroc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC of every column (NaN where a column lacks positives or negatives)."""
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    if y.ndim == 1:
        return auroc(y[:, None], s[:, None])[0]
    yb = y > 0
    ranks = rankdata(s, axis=0)  # average ranks for ties
    p = yb.sum(0).astype(np.float64)
    q = len(y) - p
    with np.errstate(invalid="ignore", divide="ignore"):
        a = ((ranks * yb).sum(0) - p * (p + 1) / 2) / (p * q)
    a[(p == 0) | (q == 0)] = np.nan
    return a


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (integer class indices)."""
    classes = np.unique(y_true)
    return float(np.mean([(y_pred[y_true == c] == c).mean() for c in classes])) if len(classes) else float("nan")


def _nanmean(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.mean(a[~np.isnan(a)])) if np.any(~np.isnan(a)) else float("nan")


def summary(y: np.ndarray, s: np.ndarray, labels: list[str], head: list[str], tail: list[str], multi_label: bool,
            d: np.ndarray | None = None) -> dict:
    """All metrics of one set of predictions. ``s``: probabilities (sigmoid or softmax), N x L; ``d``: the binary
    decisions (``decisions``; default: argmax on multi-class data, 0.5 thresholds on multi-label data)."""
    ap = average_precision(y, s)
    au = auroc(y, s)
    idx = {lab: i for i, lab in enumerate(labels)}
    h = [idx[lab] for lab in head]
    t = [idx[lab] for lab in tail]
    out = {
        "map_all": _nanmean(ap),
        "map_head": _nanmean(ap[h]) if h else float("nan"),
        "map_tail": _nanmean(ap[t]) if t else float("nan"),
        "auroc_macro": _nanmean(au),
        "per_label_ap": {lab: (None if np.isnan(ap[i]) else float(ap[i])) for i, lab in enumerate(labels)},
        "per_label_auroc": {lab: (None if np.isnan(au[i]) else float(au[i])) for i, lab in enumerate(labels)},
        "labels_without_positives": [lab for i, lab in enumerate(labels) if np.isnan(ap[i])],
    }
    d = decisions(s, multi_label) if d is None else d
    dm = decision_metrics(y, d, t)
    out.update({k: dm[k] for k in DECISION_METRICS if k != "balanced_accuracy" or not multi_label})
    out["per_label_f1"] = {lab: dm["per_label_f1"][i] for i, lab in enumerate(labels)}
    if not multi_label:
        yt = np.asarray(y).argmax(1)
        yp = np.asarray(s).argmax(1)
        out["balanced_accuracy"] = balanced_accuracy(yt, yp)
        out["accuracy"] = float((yt == yp).mean())
    return out


DECISION_METRICS = ("balanced_accuracy", "macro_f1", "tail_recall")
# also computed on request (benchmarks/compare_arms.py --metric), not a table column: the mean over tail labels of
# the share of a label's decisions that are right (a label never decided counts 0, as scikit-learn's zero_division=0)
EXTRA_DECISION_METRICS = ("tail_precision",)


def decisions(scores: np.ndarray, multi_label: bool, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Binary decisions (N x L uint8): the argmax class (multi-class) or scores >= per-label thresholds."""
    s = np.asarray(scores, dtype=np.float64)
    if not multi_label:
        out = np.zeros(s.shape, dtype=np.uint8)
        if len(s):
            out[np.arange(len(s)), s.argmax(1)] = 1
        return out
    t = np.full(s.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    return (s >= t[None, :]).astype(np.uint8)


def val_thresholds(y_val: np.ndarray, s_val: np.ndarray) -> np.ndarray:
    """Per label, the score threshold that maximises F1 on val (the midpoint between the chosen val score and the next
    lower one, so that test scores between them are decided like the val image); 0.5 for a label without a val
    positive."""
    y = np.asarray(y_val) > 0
    s = np.asarray(s_val, dtype=np.float64)
    out = np.full(s.shape[1], 0.5)
    for j in range(s.shape[1]):
        if not y[:, j].any():
            continue
        order = np.argsort(-s[:, j], kind="mergesort")
        ss, yy = s[order, j], y[order, j]
        tp = np.cumsum(yy)
        k = np.arange(1, len(ss) + 1)
        f1 = 2 * tp / (k + yy.sum())
        last = np.r_[ss[:-1] != ss[1:], True]  # a threshold can only sit between distinct scores
        f1 = np.where(last, f1, -1)
        i = int(np.argmax(f1))
        out[j] = ss[i] if i + 1 >= len(ss) else (ss[i] + ss[i + 1]) / 2
    return out


def _decision_counts(y: np.ndarray, d: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, positives and predicted positives per resample (rows of ``idx``, B x N) and label: B x L."""
    yb = (np.asarray(y) > 0).astype(np.int32)
    db = np.asarray(d).astype(np.int32)
    yr, dr = yb[idx], db[idx]  # B x N x L
    return (yr & dr).sum(1), yr.sum(1), dr.sum(1)


def decision_metrics_resampled(metric: str, y: np.ndarray, d: np.ndarray, tail_idx: list[int],
                               idx: np.ndarray) -> np.ndarray:
    """A decision metric for each resample (``idx``: B x N row indices), vectorised; NaN where no label counts."""
    tp, pos, pred = _decision_counts(y, d, idx)
    has = pos > 0  # a label counts in a resample only where it has a positive
    if metric in ("balanced_accuracy", "tail_recall"):
        value = tp / np.maximum(pos, 1)
        if metric == "tail_recall":
            value, has = value[:, tail_idx], has[:, tail_idx]
    elif metric == "macro_f1":
        value = 2 * tp / np.maximum(pos + pred, 1)
    elif metric == "tail_precision":
        value, has = (tp / np.maximum(pred, 1))[:, tail_idx], has[:, tail_idx]
    else:
        raise ValueError(f"unknown decision metric {metric}")
    n = has.sum(1)
    return np.where(n > 0, (value * has).sum(1) / np.maximum(n, 1), np.nan)


def decision_metrics(y: np.ndarray, d: np.ndarray, tail_idx: list[int]) -> dict:
    """Balanced accuracy, macro-F1 and tail recall of decisions ``d`` on the whole test set, and per-label F1."""
    whole = np.arange(len(y))[None]
    out = {m: float(decision_metrics_resampled(m, y, d, tail_idx, whole)[0]) for m in DECISION_METRICS}
    tp, pos, pred = (v[0] for v in _decision_counts(y, d, whole))
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(pos > 0, 2 * tp / np.maximum(pos + pred, 1), np.nan)
    out["per_label_f1"] = [None if np.isnan(v) else float(v) for v in f1]
    return out


def tail_map_resampled(y: np.ndarray, s: np.ndarray, tail_idx: list[int], idx: np.ndarray) -> np.ndarray:
    """Tail mAP for each bootstrap resample: ``idx`` is B x N row indices into the test set (vectorised)."""
    b, n = idx.shape
    yt = np.asarray(y)[:, tail_idx]
    st = np.asarray(s)[:, tail_idx]
    # stack resamples as columns: (N, B * T)
    yr = yt[idx].transpose(1, 0, 2).reshape(n, -1)
    sr = st[idx].transpose(1, 0, 2).reshape(n, -1)
    ap = average_precision(yr, sr).reshape(b, len(tail_idx))
    with np.errstate(invalid="ignore"):
        valid = ~np.isnan(ap)
        return np.where(valid.any(1), np.nansum(ap, 1) / np.maximum(valid.sum(1), 1), np.nan)


def bootstrap_indices(n: int, b: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def paired_bootstrap(y: np.ndarray, scores_arm: list[np.ndarray], scores_ref: list[np.ndarray], tail_idx: list[int],
                     idx: np.ndarray, chunk: int = 100, metric: str = "map_tail") -> dict:
    """Difference in ``metric`` (arm - reference): tail mAP of scores, or a decision metric (``DECISION_METRICS``,
    ``EXTRA_DECISION_METRICS``) of decisions, per resample averaged over seeds (arm seed i paired with reference seed
    i). Returns the point estimate (full test set, mean over seeds), the 95 % percentile interval, and the share of
    resamples where the arm is better."""
    if len(scores_arm) != len(scores_ref):
        raise ValueError("arm and reference need the same seeds")

    def value(x, rows):
        if metric == "map_tail":
            return tail_map_resampled(y, x, tail_idx, rows)
        return decision_metrics_resampled(metric, y, x, tail_idx, rows)

    whole = np.arange(len(y))[None]
    point = float(np.mean([value(a, whole)[0] - value(r, whole)[0] for a, r in zip(scores_arm, scores_ref)]))
    diffs = np.zeros(len(idx))
    for c in range(0, len(idx), chunk):
        part = idx[c : c + chunk]
        d = [value(a, part) - value(r, part) for a, r in zip(scores_arm, scores_ref)]
        diffs[c : c + chunk] = np.mean(d, axis=0)
    diffs = diffs[~np.isnan(diffs)]
    lo, hi = (np.percentile(diffs, [2.5, 97.5]) if len(diffs) else (np.nan, np.nan))
    return {"mean": point, "ci95": [float(lo), float(hi)], "p_better": float((diffs > 0).mean()) if len(diffs) else None,
            "n_resamples": int(len(diffs)), "n_test": int(idx.shape[1])}
