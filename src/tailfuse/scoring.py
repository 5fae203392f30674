"""Scores of synthetic images against the run's real training images.

* ``tail_prob``: the probability that the *real-data classifier* gives the image's tail label. The classifier is an
  L2 logistic regression on the standardised EfficientNet-Lite0 ImageNet features (1280-d, the backbone of
  `tailfuse evaluate`; cached per image file in ``<run>/features``) of the real training images (the same model as the
  evaluation's ``linear`` classifier), its regularisation chosen on the run's val images.
* ``nn_distance`` / ``nn_ratio`` / ``nn_sample_id`` / ``near_copy``: the near-copy check of ``tailfuse.nearcopy``
  (pixel regions, not the classifier's features, which cannot see copies): the distance to the nearest real
  training image, which one that is, the ratio to the second nearest, and whether the image is a near-copy (closer
  to one training image than all but ``near_copy_quantile`` (default 2 %) of the training images are to their
  nearest other one, or nearest / second nearest below 1/3, Gu et al. 2025's rule).
"""

from __future__ import annotations

import logging

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .store import RunStore

log = logging.getLogger("tailfuse")


def features_dir(store: RunStore) -> Path:
    return store.data_root / "features"


def run_image_features(store: RunStore, paths: list[str], backbone=None, progress: bool = False,
                       desc: str = "EfficientNet-Lite0 features", batch_size: int = 32) -> np.ndarray:
    """EfficientNet-Lite0 features of image files, read like the run's own images (size, resize policy); cached."""
    from .evaluation.features import Backbone, image_features

    size, resize = _image_settings(store)
    backbone = backbone or Backbone("cpu")
    return image_features(paths, backbone, features_dir(store), size, batch_size, progress, resize=resize, desc=desc)


@dataclass
class RealScorer:
    """The real-data classifier and the near-copy index of a run's real training images (fit once, score many)."""

    labels: list[str]
    multi_label: bool
    model: object  # evaluation.classifier.LinearModel
    index: object  # nearcopy.RegionIndex of the real training images
    image_size: int
    resize: str

    @property
    def copy_threshold(self) -> float:
        return self.index.threshold

    @property
    def near_copy_quantile(self) -> float:
        return self.index.quantile

    @classmethod
    def fit(cls, store: RunStore, near_copy_quantile: float | None = None, backbone=None,
            progress: bool = False) -> "RealScorer":
        from .evaluation.classifier import tune_linear
        from .nearcopy import DEFAULT_QUANTILE, RegionIndex

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
        size, resize = _image_settings(store)
        q = DEFAULT_QUANTILE if near_copy_quantile is None else near_copy_quantile
        index = RegionIndex.from_paths(tr["abs_path"].tolist(), size, resize, ids=tr["sample_id"].to_numpy(),
                                       quantile=q, progress=progress)
        cinfo = model.info
        log.info(f"scorer: real-data classifier C={cinfo['c']:g} (val mAP {cinfo['val_map'] or float('nan'):.3f}); "
                 f"near-copy threshold {index.threshold:.2f} ({q:.0%} quantile of the real training images' nearest "
                 "distances, pixel regions)")
        return cls(labels, multi, model, index, size, resize)

    def score(self, feats: np.ndarray, tail_labels: list[str], paths: list[str]) -> dict[str, np.ndarray]:
        """Scores of the images ``paths`` whose EfficientNet-Lite0 features are ``feats``."""
        from .nearcopy import load_images

        probs = self.model.predict(feats)
        col = np.array([self.labels.index(lab) for lab in tail_labels], dtype=np.int64)
        near = self.index.query(load_images(paths, self.image_size, self.resize))
        return {
            "tail_prob": probs[np.arange(len(feats)), col],
            "nn_distance": near["nn_distance"].astype(np.float64),
            "nn_ratio": near["nn_ratio"].astype(np.float64),
            "nn_sample_id": near["nn_id"],
            "near_copy": near["near_copy"],
        }


def _image_settings(store: RunStore) -> tuple[int, str]:
    """The size and resize policy the run read its images with."""
    info = store.labels()
    size = int(info.get("image_size") or (store.config().get("data") or {}).get("image_size") or 128)
    return size, (store.config().get("data") or {}).get("resize", "center-crop")
