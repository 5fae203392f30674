"""Downstream classifiers: a linear head on frozen features (default), full fine-tuning, a small CNN from scratch.

A training set is given as mixes of rows of a *pool* (features or images): item i is
``lam[i] * pool[a[i]] + (1 - lam[i]) * pool[b[i]]`` with target ``y[i]`` (soft, already mixed). Plain rows have
``a = b`` and ``lam = 1``; the mixup arm has real mixes. Every classifier:

* is seeded (``torch.manual_seed(seed)`` before initialisation; a ``torch.Generator(seed)`` shuffles the batches;
  image augmentation flips are drawn from the same generator);
* is trained with AdamW (``lr``, ``weight_decay``) for ``epochs`` epochs of minibatches of ``batch_size``;
* multi-label: one sigmoid per label, BCE (``pos_weight`` = negatives / positives per label in the reweight arm);
  multi-class: softmax, cross-entropy with soft targets (class weights N / (C n_c) in the reweight arm);
* keeps the state of the epoch with the best validation score and scores the test set with it, in eval mode. The
  score (``select``) is val mAP (labels with a validation positive) or, on multi-class data, val balanced accuracy;
  the first best epoch wins ties;
* takes its training items from a ``TrainSet`` or from a function of the epoch returning one (``train_at``): an
  arm that draws its synthetic items afresh from a pool each epoch;
* re-weights the loss by ``weights`` from epoch ``weights_from`` on (0: always, the reweight arm; later: deferred
  re-weighting, DRW, Cao et al. 2019).

``linear``: standardised features (mean / std of the arm's own training items) -> one linear layer.
``finetune``: EfficientNet-Lite0 (ImageNet weights, all layers trained; BatchNorm in train mode only while
training), global average pool, dropout 0.2, linear; inputs at the run's own image size (not upsampled to 224),
scaled (x-127)/128, random horizontal flips. ``cnn``: four conv-BN-ReLU-maxpool blocks (32, 64, 128, 256 channels) on the run's image
size, global average pool, dropout 0.2, linear; random horizontal flips and random crops (4-pixel zero padding at
32 px, scaled with the image size), learning rate on a cosine schedule. ``partial``: EfficientNet-Lite0 (ImageNet)
at the run's own image size, its stem and first blocks frozen and computed once per image (and its mirror image),
its last ``trainable_blocks`` MBConv blocks, head convolution and a new linear head trained (dropout 0.2,
drop-connect as in the network), BatchNorm of the trained blocks in train mode while training; random horizontal
flips (the mirror image's frozen maps), learning rate on a cosine schedule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..threads import adapt, one_thread
from .metrics import average_precision


@dataclass
class TrainSet:
    a: np.ndarray  # pool rows
    b: np.ndarray
    lam: np.ndarray
    y: np.ndarray  # N x L float targets

    def __len__(self) -> int:
        return len(self.a)


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


SELECT = ("map", "balanced_accuracy")


def val_score(y: np.ndarray, p: np.ndarray, select: str = "map") -> float:
    """The model-selection score on val: mAP, or balanced accuracy of the argmax (multi-class data)."""
    if select == "balanced_accuracy":
        from .metrics import balanced_accuracy

        y = np.asarray(y)
        return balanced_accuracy(y.argmax(1), np.asarray(p).argmax(1)) if len(y) else float("nan")
    return _val_map(y, p)


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
        x = (x01 * 255.0 - 127.0) / 128.0  # at the run's own image size, as `partial` sees it
        return self.head(self.net.extract_features(x).mean((2, 3)))


def _fit(model: nn.Module, batches_x, train, val_x, y_val: np.ndarray, test_x, *, multi_label: bool,
         weights: torch.Tensor | None, seed: int, epochs: int, lr: float, weight_decay: float, batch_size: int,
         progress: bool, desc: str, augment: bool, select: str = "map", weights_from: int = 0,
         schedule: str = "constant") -> tuple[np.ndarray, dict]:
    """Generic loop. ``batches_x(ts, idx, gen, augment)`` makes the inputs of items idx of TrainSet ts; ``train`` is
    a TrainSet or a function of the epoch returning one; ``val_x``/``test_x`` are callables yielding input batches
    in order. The val predictions of the kept state are returned in ``info['val_scores']``."""
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)) if schedule == "cosine" else None
    train_at = train if callable(train) else (lambda ep: train)

    def predict(make_batches) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            out = [_probs(model(x), multi_label).cpu() for x in make_batches()]
        return torch.cat(out).numpy() if out else np.zeros((0, len(y_val[0]) if len(y_val) else 0), np.float32)

    best, best_state, best_epoch, history = -np.inf, None, -1, []
    for ep in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        model.train()
        ts = train_at(ep)
        y_tr = torch.from_numpy(np.asarray(ts.y, dtype=np.float32))
        w = weights if ep >= weights_from else None
        perm = torch.randperm(len(ts), generator=g)
        for s in range(0, len(perm), batch_size):
            adapt()  # follow the CPUs other jobs leave free (tailfuse.threads)
            idx = perm[s : s + batch_size]
            if len(idx) < 2 and len(perm) > 1:
                continue  # a batch of one breaks BatchNorm; the sample is seen in other epochs
            x = batches_x(ts, idx.numpy(), g, augment)
            loss = _loss(model(x), y_tr[idx].to(x.device), multi_label, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        score = val_score(y_val, predict(val_x), select) if len(y_val) else float("nan")
        history.append(score)
        key = score if not np.isnan(score) else -np.inf
        if key > best or best_state is None:
            best, best_epoch = key, ep
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    info = {"best_epoch": int(best_epoch), "val_score": None if not np.isfinite(best) else float(best),
            "select": select, "epochs": int(epochs),
            "val_history": [None if np.isnan(v) else round(float(v), 5) for v in history]}
    if select == "map":
        info["val_map"] = info["val_score"]
    info["val_scores"] = predict(val_x)
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
                weights=None, c_grid=DEFAULT_C_GRID, max_iter: int = 500, select: str = "map") -> LinearModel:
    """Logistic regression on standardised features, its regularisation chosen on val.

    Features are standardised with the training items' mean and standard deviation; for every C of ``c_grid``
    (ascending, each fit warm-started from the last) the model is fitted and scored on val (``select``: mAP over
    labels with a validation positive, or balanced accuracy); the C with the best val score (the smallest C on ties:
    the most regularised) is kept. The fit is deterministic."""
    x_tr = np.asarray(x_tr, dtype=np.float64)
    mu = x_tr.mean(0)
    sd = x_tr.std(0) + 1e-6
    xs, xv = (x_tr - mu) / sd, (np.asarray(x_va, dtype=np.float64) - mu) / sd
    y_tr = np.asarray(y_tr, dtype=np.float64)
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    best, best_c, best_model, prev, history = -np.inf, None, None, None, {}
    with one_thread():  # one thread does these small fits best, even on an idle machine (tailfuse.threads)
        for c in sorted(float(v) for v in c_grid):
            model = _LogReg(y_tr.shape[1], multi_label, w, max_iter)
            if prev is not None:
                model.models = [copy.deepcopy(m) for m in prev.models]  # warm start from the previous C
            model.fit(xs, y_tr, c)
            prev = model
            score = val_score(y_va, model.predict(xv), select) if len(y_va) else float("nan")
            history[f"{c:g}"] = None if np.isnan(score) else round(float(score), 5)
            key = score if not np.isnan(score) else -np.inf
            if best_model is None or key > best:
                best, best_c, best_model = key, c, model
    value = None if not np.isfinite(best) else float(best)
    info = ({"c": best_c, "val_map": value, "val_map_by_c": history} if select == "map" else
            {"c": best_c, "select": select, "val_score": value, "val_score_by_c": history})
    return LinearModel(best_model, mu, sd, info)


def fit_linear(pool: np.ndarray, train: TrainSet, val_rows: np.ndarray, y_val: np.ndarray, test_rows: np.ndarray, *,
               multi_label: bool, weights: torch.Tensor | None, c_grid=DEFAULT_C_GRID, select: str = "map",
               **_ignored) -> tuple[np.ndarray, dict]:
    """The ``linear`` classifier: ``tune_linear`` on frozen features ``pool`` (N x D) of the training items (mixes of
    pool rows), scored on the test rows (val predictions in ``info['val_scores']``). The seed does not enter (the
    arms' own random draws vary with it)."""
    lam = train.lam[:, None].astype(np.float64)
    x_tr = lam * pool[train.a] + (1 - lam) * pool[train.b]
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    m = tune_linear(x_tr, train.y, pool[val_rows], y_val, multi_label=multi_label, weights=w, c_grid=c_grid,
                    select=select)
    return m.predict(pool[test_rows]).astype(np.float32), {**m.info,
                                                           "val_scores": m.predict(pool[val_rows]).astype(np.float32)}


def _crop(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crops of a batch: zero padding of 1/8 of the side (4 px at 32 px), a random window of the side."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    return torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def fit_images(kind: str, images: torch.Tensor, train, val_rows: np.ndarray, y_val: np.ndarray,
               test_rows: np.ndarray, *, multi_label: bool, weights: torch.Tensor | None, seed: int, epochs: int,
               lr: float, weight_decay: float, batch_size: int, device: str = "cpu", progress: bool = False,
               desc: str = "net", select: str = "map", weights_from: int = 0,
               trainable_blocks: int = 3) -> tuple[np.ndarray, dict]:
    """``finetune`` (EfficientNet-Lite0, all layers) or ``cnn`` (small CNN from scratch) on a uint8 image pool
    (N x 3 x S x S); ``partial`` on a pool of frozen EfficientNet-Lite0 maps (``PartialMaps``: N x 2 x C x h x w, the
    image's and its mirror image's). ``train``: a TrainSet, or a function of the epoch returning one."""
    torch.manual_seed(int(seed))
    first = train(0) if callable(train) else train
    n_out = first.y.shape[1]
    if kind == "partial":
        model = PartialNet(n_out, trainable_blocks).to(device)
    else:
        model = (FinetuneNet(n_out) if kind == "finetune" else SmallCNN(n_out)).to(device)

    def load(rows, flip=None) -> torch.Tensor:
        if kind == "partial":
            m = images[torch.as_tensor(rows)]  # n x 2 x C x h x w
            side = torch.zeros(len(m), dtype=torch.long) if flip is None else flip.long()
            return m[torch.arange(len(m)), side].float()
        return images[torch.as_tensor(rows)].float().div_(255.0)

    def batches_x(ts, idx, g, augment):
        lam = torch.from_numpy(ts.lam[idx].astype(np.float32))[:, None, None, None]
        flip = (torch.rand(len(idx), generator=g) < 0.5) if augment else None
        x = lam * load(ts.a[idx], flip) + (1 - lam) * load(ts.b[idx], flip)
        if augment and kind != "partial":
            x[flip] = x[flip].flip(-1)
            if kind == "cnn":
                x = _crop(x, g)
        return x.to(device)

    def chunks(rows):
        return lambda: (load(rows[i : i + batch_size]).to(device) for i in range(0, len(rows), batch_size))

    p, info = _fit(model, batches_x, train, chunks(val_rows), y_val, chunks(test_rows), multi_label=multi_label,
                   weights=None if weights is None else weights.to(device), seed=seed, epochs=epochs, lr=lr,
                   weight_decay=weight_decay, batch_size=batch_size, progress=progress, desc=desc, augment=True,
                   select=select, weights_from=weights_from, schedule="constant" if kind == "finetune" else "cosine")
    return p, info


def _lite0():
    from .features import Backbone

    return Backbone().net


class PartialMaps:
    """The frozen part of EfficientNet-Lite0 for ``partial``: images (N x 3 x S x S in [0, 1], at the run's own size)
    -> the maps entering its last ``trainable_blocks`` blocks, for the image and its mirror image, flattened (the
    ``image_features`` backbone contract, so they are cached per image file like features)."""

    def __init__(self, trainable_blocks: int = 3, image_size: int = 128, device: str = "cpu"):
        net = _lite0()
        n = len(net._blocks)
        if not 1 <= trainable_blocks <= n:
            raise ValueError(f"trainable_blocks must be in 1..{n}")
        self.first = n - trainable_blocks
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish).eval().to(device)
        self.blocks = net._blocks[: self.first].eval().to(device)
        self.device = device
        self.id = f"efficientnet-lite0-maps-before-block{self.first}"
        with torch.no_grad():
            self.shape = tuple(self._maps(torch.zeros(1, 3, image_size, image_size)).shape[1:])
        self.dim = 2 * int(np.prod(self.shape))

    def _maps(self, images01: torch.Tensor) -> torch.Tensor:
        x = self.stem((images01.to(self.device) * 255.0 - 127.0) / 128.0)
        for b in self.blocks:
            x = b(x)
        return x

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        m = torch.stack([self._maps(images01), self._maps(images01.flip(-1))], 1)
        return m.flatten(1).float().cpu()

    def unflatten(self, flat: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(flat)).reshape(len(flat), 2, *self.shape)


class PartialNet(nn.Module):
    """The last ``trainable_blocks`` MBConv blocks of EfficientNet-Lite0 (ImageNet weights), its head convolution and
    a new linear head, on the maps ``PartialMaps`` computes."""

    def __init__(self, n_out: int, trainable_blocks: int = 3):
        super().__init__()
        net = _lite0()
        n = len(net._blocks)
        first = n - trainable_blocks
        self.blocks = nn.ModuleList(net._blocks[first:])
        rate = net._global_params.drop_connect_rate or 0.0
        self.rates = [rate * i / n for i in range(first, n)]
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.conv_head.out_channels, n_out))
        self.requires_grad_(True)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps
        for b, r in zip(self.blocks, self.rates):
            x = b(x, drop_connect_rate=r)
        x = self.act(self.bn1(self.conv_head(x)))
        return self.head(x.mean((2, 3)))
