"""The classical resamplers of the baseline arms (the budget they fill is ``tailfuse.budget``).

* ``oversample_rows`` — random over-sampling: multi-class through imbalanced-learn's ``RandomOverSampler``
  (``sampling_strategy = {class: c + n}``); multi-label by drawing, for each tail label, n_l rows with replacement
  among the training rows that carry it (duplicates keep all their labels).
* ``smote_multiclass`` — imbalanced-learn's ``SMOTE`` on flattened vectors (the VAE latents), with
  ``k_neighbors = min(k, c_min - 1)``; a class with a single sample cannot be interpolated and gets copies of it
  (reported).
* ``mlsmote`` — MLSMOTE (Charte, Rivera, del Jesus, Herrera 2015, "MLSMOTE: approaching imbalanced multilabel
  learning through synthetic instance generation"), which imbalanced-learn does not provide: for each minority
  (here: tail) label, its bag is the set of samples carrying it; a seed sample from the bag, its k nearest
  neighbours within the bag (Euclidean), one of them drawn at random as the reference; the new features are
  ``seed + u * (reference - seed)``, u ~ U(0, 1); the new label set is the *ranking* rule of the paper: a label is
  on when it is present in at least half of the seed and its k neighbours (the minority label always is). Here
  seeds cycle through a random permutation of the bag until n_l samples are made for the label, rather than one per
  bag sample, so every arm adds the same counts.
* ``mixup_pairs`` — mixup on the frozen features (Zhang et al. 2018), budgeted like the others: for each tail label,
  n_l pairs (a tail-positive sample, a random training sample) with lambda ~ Beta(alpha, alpha) folded to
  ``max(lambda, 1 - lambda)`` so the tail sample dominates; features and label vectors are mixed with the same
  lambda (soft targets).
"""

from __future__ import annotations


import numpy as np

from ..errors import TailfuseError


def oversample_rows(y: np.ndarray, counts: dict[int, int], multi_label: bool, seed: int) -> np.ndarray:
    """Row indices (into y) of the duplicates to add: ``counts`` maps a label column to the number of new rows."""
    counts = {int(j): int(n) for j, n in counts.items() if n > 0}
    if not counts:
        return np.zeros(0, dtype=np.int64)
    if not multi_label:
        from imblearn.over_sampling import RandomOverSampler

        cls = y.argmax(1)
        have = {j: int((cls == j).sum()) for j in counts}
        if any(v == 0 for v in have.values()):
            raise TailfuseError("cannot over-sample a label with no training sample.")
        ros = RandomOverSampler(sampling_strategy={j: have[j] + n for j, n in counts.items()}, random_state=seed)
        ros.fit_resample(np.arange(len(y))[:, None], cls)
        return ros.sample_indices_[len(y):].astype(np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for j, n in counts.items():
        pool = np.flatnonzero(y[:, j] > 0)
        if len(pool) == 0:
            raise TailfuseError("cannot over-sample a label with no training sample.")
        out.append(rng.choice(pool, size=n, replace=True))
    return np.concatenate(out)


def smote_multiclass(x: np.ndarray, y: np.ndarray, counts: dict[int, int], k: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """imbalanced-learn SMOTE on rows of ``x`` (N x D) with one-hot ``y``. Returns (new x, new one-hot y, notes)."""
    from imblearn.over_sampling import SMOTE

    counts = {int(j): int(n) for j, n in counts.items() if n > 0}
    cls = y.argmax(1)
    new_x, new_y, notes = [], [], {}
    smote_counts = {}
    for j, n in counts.items():
        c = int((cls == j).sum())
        if c == 0:
            raise TailfuseError("cannot apply SMOTE to a label with no training sample.")
        if c == 1:  # nothing to interpolate with
            new_x.append(np.repeat(x[cls == j], n, axis=0))
            new_y.append(np.repeat(y[cls == j], n, axis=0))
            notes[j] = "one training sample: copies"
        else:
            smote_counts[j] = c + n
    if smote_counts:
        k_eff = max(1, min(k, min(int((cls == j).sum()) for j in smote_counts) - 1))
        sm = SMOTE(sampling_strategy=smote_counts, k_neighbors=k_eff, random_state=seed)
        xr, yr = sm.fit_resample(x.reshape(len(x), -1), cls)
        xr, yr = xr[len(x):], yr[len(x):]
        new_x.append(xr.reshape((-1, *x.shape[1:])))
        oh = np.zeros((len(yr), y.shape[1]), dtype=y.dtype)
        oh[np.arange(len(yr)), yr] = 1
        new_y.append(oh)
        notes["k_neighbors"] = k_eff
    if not new_x:
        return np.zeros((0, *x.shape[1:]), x.dtype), np.zeros((0, y.shape[1]), y.dtype), notes
    return np.concatenate(new_x).astype(x.dtype), np.concatenate(new_y), notes


def mlsmote(x: np.ndarray, y: np.ndarray, counts: dict[int, int], k: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """MLSMOTE (Charte et al. 2015) for the label columns in ``counts`` (column -> new samples).

    Returns new features (n x D...), their 0/1 label rows (n x L) and, per new sample, its provenance
    (label, seed row, reference row, u)."""
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1).astype(np.float64)
    out_x, out_y, prov = [], [], []
    for j, n in counts.items():
        n = int(n)
        if n <= 0:
            continue
        bag = np.flatnonzero(y[:, j] > 0)
        if len(bag) == 0:
            raise TailfuseError("cannot apply MLSMOTE to a label with no training sample.")
        kk = min(k, len(bag) - 1)
        if kk >= 1:
            from sklearn.neighbors import NearestNeighbors

            nn_model = NearestNeighbors(n_neighbors=kk + 1).fit(flat[bag])
            _, nn = nn_model.kneighbors(flat[bag])
            # drop each sample itself (exact duplicates may tie with it: remove its own position, keep kk others)
            nn = np.stack([[p for p in row if p != q][:kk] for q, row in enumerate(nn)])
        order = rng.permutation(len(bag))
        for i in range(n):
            s = order[i % len(bag)]
            if kk >= 1:
                r = nn[s, rng.integers(kk)]
                u = float(rng.random())
                v = flat[bag[s]] + u * (flat[bag[r]] - flat[bag[s]])
                group = np.concatenate([[bag[s]], bag[nn[s]]])
                votes = (y[group] > 0).sum(0)
                lab = (votes * 2 >= len(group)).astype(y.dtype)
            else:  # a single sample carries the label: nothing to interpolate with
                r, u = s, 0.0
                v = flat[bag[s]].copy()
                lab = (y[bag[s]] > 0).astype(y.dtype)
            lab[j] = 1
            out_x.append(v)
            out_y.append(lab)
            prov.append({"label_column": int(j), "seed_row": int(bag[s]), "reference_row": int(bag[r]), "u": u,
                         "neighbours": int(kk)})
    if not out_x:
        return np.zeros((0, *x.shape[1:]), x.dtype), np.zeros((0, y.shape[1]), y.dtype), []
    return np.stack(out_x).reshape((-1, *x.shape[1:])).astype(x.dtype), np.stack(out_y), prov


def mixup_pairs(y: np.ndarray, counts: dict[int, int], alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows a, rows b, lambdas) of the new mixed samples: a carries the tail label, b is any training row."""
    if alpha <= 0:
        raise TailfuseError("--mixup-alpha must be > 0.")
    rng = np.random.default_rng(seed)
    a, b, lam = [], [], []
    for j, n in counts.items():
        n = int(n)
        if n <= 0:
            continue
        pool = np.flatnonzero(y[:, j] > 0)
        if len(pool) == 0:
            raise TailfuseError("cannot mix up a label with no training sample.")
        a.append(rng.choice(pool, size=n, replace=True))
        b.append(rng.integers(0, len(y), size=n))
        l = rng.beta(alpha, alpha, size=n)
        lam.append(np.maximum(l, 1 - l))
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(a), np.concatenate(b), np.concatenate(lam)
