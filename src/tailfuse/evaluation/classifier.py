"""Downstream classifiers: a linear head on frozen features (default), full fine-tuning, a small CNN from scratch.

A training set is given as mixes of rows of a *pool* (features or images): item i is
``lam[i] * pool[a[i]] + (1 - lam[i]) * pool[b[i]]`` with target ``y[i]`` (soft, already mixed). Plain rows have
``a = b`` and ``lam = 1``; the mixup arm has real mixes. Every classifier:

* is seeded (``torch.manual_seed(seed)`` before initialisation; a ``torch.Generator(seed)`` shuffles the batches;
  image augmentation flips are drawn from the same generator);
* is trained with AdamW (``lr``, ``weight_decay``) for ``epochs`` epochs of minibatches of ``batch_size``;
* multi-label: one sigmoid per label, BCE (``pos_weight`` = negatives / positives per label in the reweight arm);
  multi-class: softmax, cross-entropy with soft targets (class weights N / (C n_c) in the reweight arm);
* keeps the state of the epoch with the best validation mAP (labels with a validation positive; the first best
  epoch wins ties) and scores the test set with it, in eval mode.

``linear``: standardised features (mean / std of the arm's own training items) -> one linear layer.
``finetune``: EfficientNet-Lite0 (ImageNet weights, all layers trained; BatchNorm in train mode only while
training), global average pool, dropout 0.2, linear; inputs as in ``features.Backbone`` (224 x 224, (x-127)/128),
random horizontal flips. ``cnn``: four conv-BN-ReLU-maxpool blocks (32, 64, 128, 256 channels) on the run's image
size, global average pool, dropout 0.2, linear; random horizontal flips.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .metrics import average_precision


@dataclass
class TrainSet:
    a: np.ndarray  # pool rows
    b: np.ndarray
    lam: np.ndarray
    y: np.ndarray  # N x L float targets

    def __len__(self) -> int:
        return len(self.a)


@contextmanager
def one_thread():
    """Tiny matrix products run fastest on one thread; with several, OpenMP synchronisation dominates (8x slower
    measured on a loaded 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def class_weights(y: np.ndarray, multi_label: bool) -> torch.Tensor:
    """Re-weighting: multi-label pos_weight (neg / pos per label), multi-class N / (C n_c); 1 where a label is absent."""
    n = len(y)
    pos = y.sum(0).astype(np.float64)
    if multi_label:
        w = np.where(pos > 0, (n - pos) / np.maximum(pos, 1e-12), 1.0)
    else:
        c = int((pos > 0).sum())
        w = np.where(pos > 0, n / (max(c, 1) * np.maximum(pos, 1e-12)), 1.0)
    return torch.tensor(w, dtype=torch.float32)


def _loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool, weights: torch.Tensor | None) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=weights)
    return F.cross_entropy(logits, y, weight=weights)


def _probs(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, 1)


def _val_map(y: np.ndarray, p: np.ndarray) -> float:
    ap = average_precision(y, p)
    return float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan")


class SmallCNN(nn.Module):
    def __init__(self, n_out: int, widths=(32, 64, 128, 256)):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(c, n_out))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x01 * 2 - 1).mean((2, 3)))


class FinetuneNet(nn.Module):
    def __init__(self, n_out: int):
        super().__init__()
        from .features import Backbone

        self.net = Backbone().net.requires_grad_(True).train()
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, n_out))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x01, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = (x * 255.0 - 127.0) / 128.0
        return self.head(self.net.extract_features(x).mean((2, 3)))


def _fit(model: nn.Module, batches_x, train: TrainSet, val_x, y_val: np.ndarray, test_x, *, multi_label: bool,
         weights: torch.Tensor | None, seed: int, epochs: int, lr: float, weight_decay: float, batch_size: int,
         progress: bool, desc: str, augment: bool) -> tuple[np.ndarray, dict]:
    """Generic loop. ``batches_x(idx, gen, augment)`` makes the inputs of training items idx; ``val_x``/``test_x``
    are callables yielding input batches in order."""
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    y_tr = torch.from_numpy(np.asarray(train.y, dtype=np.float32))

    def predict(make_batches) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            out = [_probs(model(x), multi_label).cpu() for x in make_batches()]
        return torch.cat(out).numpy() if out else np.zeros((0, y_tr.shape[1]), np.float32)

    best, best_state, best_epoch, history = -np.inf, None, -1, []
    for ep in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        model.train()
        perm = torch.randperm(len(train), generator=g)
        for s in range(0, len(perm), batch_size):
            idx = perm[s : s + batch_size]
            if len(idx) < 2 and len(perm) > 1:
                continue  # a batch of one breaks BatchNorm; the sample is seen in other epochs
            x = batches_x(idx.numpy(), g, augment)
            loss = _loss(model(x), y_tr[idx], multi_label, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = _val_map(y_val, predict(val_x)) if len(y_val) else float("nan")
        history.append(score)
        key = score if not np.isnan(score) else -np.inf
        if key > best or best_state is None:
            best, best_epoch = key, ep
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    info = {"best_epoch": int(best_epoch), "val_map": None if not np.isfinite(best) else float(best),
            "epochs": int(epochs), "val_map_history": [None if np.isnan(v) else round(float(v), 5) for v in history]}
    return predict(test_x), info


def _expand_multiclass(x: np.ndarray, y: np.ndarray, w_class: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of soft targets -> one row per (item, class with weight > 0), weighted by that target: the weighted
    cross-entropy of the expanded rows equals the soft-target cross-entropy of the items, exactly."""
    item, cls = np.nonzero(y > 0)
    sw = y[item, cls].astype(np.float64)
    if w_class is not None:
        sw = sw * w_class[cls]
    return x[item], cls, sw


def _expand_binary(x: np.ndarray, yj: np.ndarray, pos_weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One label's soft targets -> a positive row (weight y * pos_weight) and a negative row (weight 1 - y) per item:
    the same weighted BCE as ``binary_cross_entropy_with_logits(pos_weight=...)`` on the soft targets."""
    pos, neg = yj > 0, yj < 1
    xs = np.concatenate([x[pos], x[neg]])
    ys = np.r_[np.ones(int(pos.sum()), np.int64), np.zeros(int(neg.sum()), np.int64)]
    sw = np.r_[yj[pos] * pos_weight, 1.0 - yj[neg]].astype(np.float64)
    return xs, ys, sw


class _LogReg:
    """L2-regularised logistic regression (scikit-learn, lbfgs) on standardised features, soft targets and class
    weights included: multinomial on multi-class data, one binary model per label on multi-label data. ``fit`` takes
    C (the inverse regularisation strength) and warm-starts from the previous C's solution."""

    def __init__(self, n_labels: int, multi_label: bool, weights: np.ndarray | None, max_iter: int):
        self.n_labels, self.multi_label, self.weights, self.max_iter = n_labels, multi_label, weights, max_iter
        self.models: list = []

    def fit(self, x: np.ndarray, y: np.ndarray, c: float) -> "_LogReg":
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        def make(i):
            if i < len(self.models) and self.models[i] is not None:
                return self.models[i].set_params(C=c)
            return LogisticRegression(C=c, max_iter=self.max_iter, warm_start=True, tol=1e-4)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if not self.multi_label:
                xs, ys, sw = _expand_multiclass(x, y, self.weights)
                m = make(0)
                self.models = [m.fit(xs, ys, sample_weight=sw) if len(np.unique(ys)) > 1 else None]
                self.present = np.unique(ys)
            else:
                models = []
                for j in range(self.n_labels):
                    pw = 1.0 if self.weights is None else float(self.weights[j])
                    xs, ys, sw = _expand_binary(x, y[:, j], pw)
                    if len(np.unique(ys)) < 2:  # no positive (or no negative) in training: a constant score
                        models.append(None)
                        continue
                    models.append(make(j).fit(xs, ys, sample_weight=sw))
                self.models = models
                self.constant = np.array([float(y[:, j].max() > 0) for j in range(self.n_labels)])
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), self.n_labels), dtype=np.float64)
        if not self.multi_label:
            m = self.models[0]
            if m is None:  # one class only
                out[:, self.present] = 1.0
            else:
                out[:, m.classes_] = m.predict_proba(x)
            return out
        for j, m in enumerate(self.models):
            out[:, j] = self.constant[j] if m is None else m.predict_proba(x)[:, 1]
        return out


DEFAULT_C_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)


@dataclass
class LinearModel:
    """A fitted logistic regression with its standardisation: ``predict(raw features) -> N x L probabilities``."""

    model: _LogReg
    mean: np.ndarray
    std: np.ndarray
    info: dict

    def standardise(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.std

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(self.standardise(x))


def tune_linear(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, y_va: np.ndarray, *, multi_label: bool,
                weights=None, c_grid=DEFAULT_C_GRID, max_iter: int = 500) -> LinearModel:
    """Logistic regression on standardised features, its regularisation chosen on val.

    Features are standardised with the training items' mean and standard deviation; for every C of ``c_grid``
    (ascending, each fit warm-started from the last) the model is fitted and scored on val (mAP over labels with a
    validation positive); the C with the best val mAP (the smallest C on ties: the most regularised) is kept. The
    fit is deterministic."""
    x_tr = np.asarray(x_tr, dtype=np.float64)
    mu = x_tr.mean(0)
    sd = x_tr.std(0) + 1e-6
    xs, xv = (x_tr - mu) / sd, (np.asarray(x_va, dtype=np.float64) - mu) / sd
    y_tr = np.asarray(y_tr, dtype=np.float64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    best, best_c, best_model, prev, history = -np.inf, None, None, None, {}
    for c in sorted(float(v) for v in c_grid):
        model = _LogReg(y_tr.shape[1], multi_label, w, max_iter)
        if prev is not None:
            model.models = [copy.deepcopy(m) for m in prev.models]  # warm start from the previous C
        model.fit(xs, y_tr, c)
        prev = model
        score = _val_map(y_va, model.predict(xv)) if len(y_va) else float("nan")
        history[f"{c:g}"] = None if np.isnan(score) else round(float(score), 5)
        key = score if not np.isnan(score) else -np.inf
        if best_model is None or key > best:
            best, best_c, best_model = key, c, model
    info = {"c": best_c, "val_map": None if not np.isfinite(best) else float(best), "val_map_by_c": history}
    return LinearModel(best_model, mu, sd, info)


def fit_linear(pool: np.ndarray, train: TrainSet, val_rows: np.ndarray, y_val: np.ndarray, test_rows: np.ndarray, *,
               multi_label: bool, weights: torch.Tensor | None, c_grid=DEFAULT_C_GRID, **_ignored) -> tuple[np.ndarray, dict]:
    """The ``linear`` classifier: ``tune_linear`` on frozen features ``pool`` (N x D) of the training items (mixes of
    pool rows), scored on the test rows. The seed does not enter (the arms' own random draws vary with it)."""
    lam = train.lam[:, None].astype(np.float64)
    x_tr = lam * pool[train.a] + (1 - lam) * pool[train.b]
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    m = tune_linear(x_tr, train.y, pool[val_rows], y_val, multi_label=multi_label, weights=w, c_grid=c_grid)
    return m.predict(pool[test_rows]).astype(np.float32), dict(m.info)


def fit_images(kind: str, images: torch.Tensor, train: TrainSet, val_rows: np.ndarray, y_val: np.ndarray,
               test_rows: np.ndarray, *, multi_label: bool, weights: torch.Tensor | None, seed: int, epochs: int,
               lr: float, weight_decay: float, batch_size: int, device: str = "cpu", progress: bool = False,
               desc: str = "net") -> tuple[np.ndarray, dict]:
    """``finetune`` (EfficientNet-Lite0, all layers) or ``cnn`` (small CNN from scratch) on a uint8 image pool
    (N x 3 x S x S)."""
    torch.manual_seed(int(seed))
    n_out = train.y.shape[1]
    model = (FinetuneNet(n_out) if kind == "finetune" else SmallCNN(n_out)).to(device)
    lam_all = torch.from_numpy(train.lam.astype(np.float32))

    def load(rows) -> torch.Tensor:
        return images[torch.as_tensor(rows)].float().div_(255.0)

    def batches_x(idx, g, augment):
        lam = lam_all[idx][:, None, None, None]
        x = lam * load(train.a[idx]) + (1 - lam) * load(train.b[idx])
        if augment:
            flip = torch.rand(len(x), generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
        return x.to(device)

    def chunks(rows):
        return lambda: (load(rows[i : i + batch_size]).to(device) for i in range(0, len(rows), batch_size))

    p, info = _fit(model, batches_x, train, chunks(val_rows), y_val, chunks(test_rows), multi_label=multi_label,
                   weights=None if weights is None else weights.to(device), seed=seed, epochs=epochs, lr=lr,
                   weight_decay=weight_decay, batch_size=batch_size, progress=progress, desc=desc, augment=True)
    return p, info
