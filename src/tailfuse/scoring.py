"""Scores of synthetic images against the run's real training images, in a frozen ImageNet feature space.

Every image (real or synthetic) is described by its EfficientNet-Lite0 ImageNet feature (1280-d, the backbone of
`tailfuse evaluate`; cached per image file in ``<run>/features``). Two scores per synthetic image:

* ``tail_prob``: the probability that the *real-data classifier* gives the image's tail label. The classifier is an
  L2 logistic regression on the standardised features of the real training images (the same model as the
  evaluation's ``linear`` classifier), its regularisation chosen on the run's val images.
* ``nn_distance`` / ``nn_ratio`` / ``nn_sample_id``: the distance (standardised features, Euclidean) to the nearest
  real training image, which one that is, and the ratio of that distance to the second-nearest one. A sample is a
  **near-copy** when it is closer to one real training image than real training images are to each other: its
  nearest distance is below the ``near_copy_quantile`` (default 5 %) quantile of the real training images'
  nearest-other-image distances. ``nn_ratio < 1/3`` is the memorisation rule of Gu et al. 2025 (recorded, not
  used to drop).
"""

from __future__ import annotations

import logging

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .store import RunStore

log = logging.getLogger("tailfuse")


def features_dir(store: RunStore) -> Path:
    return store.data_root / "features"


def run_image_features(store: RunStore, paths: list[str], backbone=None, progress: bool = False,
                       desc: str = "EfficientNet-Lite0 features", batch_size: int = 32) -> np.ndarray:
    """EfficientNet-Lite0 features of image files, read like the run's own images (size, resize policy); cached."""
    from .evaluation.features import Backbone, image_features

    info = store.labels()
    size = int(info.get("image_size") or (store.config().get("data") or {}).get("image_size") or 128)
    resize = (store.config().get("data") or {}).get("resize", "center-crop")
    backbone = backbone or Backbone("cpu")
    return image_features(paths, backbone, features_dir(store), size, batch_size, progress, resize=resize, desc=desc)


@dataclass
class RealScorer:
    """The real-data classifier and the nearest-real-image index of a run (fit once, score many)."""

    labels: list[str]
    multi_label: bool
    model: object  # evaluation.classifier.LinearModel
    train_x: np.ndarray  # standardised real training features
    train_ids: np.ndarray
    copy_threshold: float
    near_copy_quantile: float

    @classmethod
    def fit(cls, store: RunStore, near_copy_quantile: float = 0.05, backbone=None, progress: bool = False) -> "RealScorer":
        from .evaluation.classifier import tune_linear

        info = store.labels()
        labels, multi = info["labels"], bool(info["multi_label"])
        samples = store.samples()
        tr = samples[samples["split"] == "train"].reset_index(drop=True)
        va = samples[samples["split"] == "val"].reset_index(drop=True)
        feats = run_image_features(store, tr["abs_path"].tolist() + va["abs_path"].tolist(), backbone, progress,
                                   desc="real image features")
        n = len(tr)
        model = tune_linear(feats[:n], tr[labels].to_numpy(dtype=np.float64), feats[n:],
                            va[labels].to_numpy(dtype=np.int64), multi_label=multi)
        x = model.standardise(feats[:n])
        d = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(x).double())
        d.fill_diagonal_(float("inf"))
        nn = d.min(1).values.numpy()
        thr = float(np.quantile(nn, near_copy_quantile)) if len(nn) > 1 else 0.0
        cinfo = model.info
        log.info(f"scorer: real-data classifier C={cinfo['c']:g} (val mAP {cinfo['val_map'] or float('nan'):.3f}); "
            f"near-copy threshold {thr:.2f} ({near_copy_quantile:.0%} quantile of real nearest-image distances)")
        return cls(labels, multi, model, x, tr["sample_id"].to_numpy(), thr, near_copy_quantile)

    def score(self, feats: np.ndarray, tail_labels: list[str]) -> dict[str, np.ndarray]:
        x = self.model.standardise(feats)
        probs = self.model.model.predict(x)
        col = np.array([self.labels.index(lab) for lab in tail_labels], dtype=np.int64)
        d = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(self.train_x).double())
        k = min(2, d.shape[1])
        top = d.topk(k, dim=1, largest=False)
        d1 = top.values[:, 0].numpy()
        d2 = top.values[:, 1].numpy() if k > 1 else np.full(len(x), np.inf)
        return {
            "tail_prob": probs[np.arange(len(x)), col],
            "nn_distance": d1,
            "nn_ratio": d1 / np.maximum(d2, 1e-12),
            "nn_sample_id": self.train_ids[top.indices[:, 0].numpy()],
            "near_copy": d1 < self.copy_threshold,
        }
