"""Near-copies of real training images: is an image (a synthetic one, or a real test image as the floor) a copy of
one real training image, whole or in part?

Why not the classifier's features. The check used to measure distances between pooled EfficientNet-Lite0 features,
standardised with the training images' mean and standard deviation. Two measurements (issue 26,
``benchmarks/results/near-copies.md``) showed that it cannot find copies:

* a dimension that is constant on the training images (``std + 1e-6`` in the denominator) puts any image that moves
  it 10^4-10^5 "standard deviations" away from all of them, so nearest and second-nearest distances become equal;
* and even without such dimensions (ISIC2018-LT has none), a copy shifted by 2-4 pixels or re-compressed as JPEG
  was no closer to its original than real images are to each other, in every variant of that feature space tried
  (standardised, constant dimensions dropped, raw, cosine); and fused images that all carry the one lesion of a
  one-image class, on other skin, were not flagged at all.

What is measured instead (``RegionIndex``): images are compared region by region in pixels, where copies show.

* Each image (read at the run's size and resize policy, made grey) is cut into a 3 x 3 grid of overlapping windows
  (each 3/8 of the side, at a stride of 5/16 of it: 48 px windows every 40 px at 128 px). A window is described by
  its pixels pooled to 12 x 12 and standardised within the window (so a brightness or colour change does not
  matter). A window with almost no texture (standard deviation below 0.02 on the 0..1 scale: a black border, a
  flat background) is left out, as it would match any other flat window.
* The distance between a query image and a training image is the smallest distance between the same window of both,
  over all windows and over shifts of the query by up to 1/32 of the side (4 px at 128 px) in both directions: a
  copy needs to match in one region only (fusion pastes a lesion onto another background), and may have moved a
  few pixels.
* ``nn_distance`` is that distance to the nearest training image, ``nn_ratio`` the ratio to the second nearest.
  A **near-copy** is an image whose nearest distance is below the ``quantile`` (default 0.02) quantile of the
  training images' own nearest-other-image distances (closer to one training image than almost any two training
  images are to each other), or whose ratio is below 1/3 (Gu et al. 2025's memorisation rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .threads import adapt

GU_RATIO = 1 / 3
DEFAULT_QUANTILE = 0.02
FLAT = 0.02  # a window whose grey standard deviation is below this (0..1 scale) is not compared
POOLED = 12


def _geometry(size: int) -> tuple[int, int, int, int]:
    """(window, stride, largest shift, shift step) in pixels for images of ``size`` px (48, 40, 4, 2 at 128)."""
    win = max(4, round(size * 3 / 8))
    stride = max(1, round(size * 5 / 16))
    shift = max(1, round(size / 32))
    step = max(1, shift // 2)
    return win, stride, shift, step


def describe(images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window descriptors of images (N x C x S x S in [0, 1]): N x W x 144 (standardised pooled grey pixels) and an
    N x W mask of the windows with texture enough to compare."""
    x = images01.float().mean(1, keepdim=True)
    size = x.shape[-1]
    win, stride, _, _ = _geometry(size)
    starts = list(range(0, size - win + 1, stride))
    desc, ok = [], []
    for y0 in starts:
        for x0 in starts:
            w = x[:, :, y0 : y0 + win, x0 : x0 + win]
            p = F.interpolate(w, size=(POOLED, POOLED), mode="area").flatten(1)
            sd = w.flatten(1).std(1)
            desc.append((p - p.mean(1, keepdim=True)) / p.std(1, keepdim=True).clamp_min(1e-6))
            ok.append(sd >= FLAT)
    return torch.stack(desc, 1), torch.stack(ok, 1)


def _shifted(images01: torch.Tensor) -> list[torch.Tensor]:
    size = images01.shape[-1]
    _, _, s, step = _geometry(size)
    padded = F.pad(images01.float(), (s, s, s, s), mode="replicate")
    return [padded[:, :, s + dy : s + dy + size, s + dx : s + dx + size]
            for dy in range(-s, s + 1, step) for dx in range(-s, s + 1, step)]


def region_distances(images01: torch.Tensor, ref_desc: torch.Tensor, ref_ok: torch.Tensor) -> torch.Tensor:
    """N x M: for each query image and reference image, the smallest distance between the same window of both (over
    windows with texture in both, and over the query's shifts); inf where no window can be compared."""
    best = torch.full((len(images01), len(ref_desc)), math.inf)
    for v in _shifted(images01):
        adapt()  # follow the CPUs other jobs leave free (tailfuse.threads)
        q, qok = describe(v)
        for w in range(q.shape[1]):
            d = torch.cdist(q[:, w].double(), ref_desc[:, w].double()).float()
            d = d.masked_fill(~(qok[:, w, None] & ref_ok[None, :, w]), math.inf)
            best = torch.minimum(best, d)
    return best


@dataclass
class RegionIndex:
    """The real training images, ready to tell near-copies (see the module docstring)."""

    desc: torch.Tensor  # M x W x 144
    ok: torch.Tensor  # M x W
    ids: np.ndarray  # sample_id (or any label) of each reference image
    threshold: float  # the distance below which an image is a near-copy
    quantile: float
    calibration: np.ndarray  # nearest-other-image distances of the calibration images, sorted

    @classmethod
    def build(cls, images01: torch.Tensor, ids=None, quantile: float = DEFAULT_QUANTILE, calibrate: int = 500,
              seed: int = 0) -> "RegionIndex":
        """Index images in memory (M x C x S x S in [0, 1]); see ``from_paths``."""
        return cls._make(len(images01), lambda rows: images01[torch.as_tensor(rows)], ids, quantile, calibrate, seed)

    @classmethod
    def from_paths(cls, paths: list[str], size: int, resize: str = "center-crop", ids=None,
                   quantile: float = DEFAULT_QUANTILE, calibrate: int = 500, seed: int = 0,
                   progress: bool = False) -> "RegionIndex":
        """Index image files read like the run's own images, a batch at a time (the index holds 9 x 144 numbers per
        image, not the images). The threshold is the ``quantile`` of the nearest-other-image distances of up to
        ``calibrate`` of them (a seeded choice), each against all the others."""
        return cls._make(len(paths), lambda rows: load_images([paths[i] for i in rows], size, resize), ids, quantile,
                         calibrate, seed, progress)

    @classmethod
    def _make(cls, m: int, images_of, ids, quantile: float, calibrate: int, seed: int, progress: bool = False,
              batch: int = 64) -> "RegionIndex":
        parts = [describe(images_of(list(range(a, min(m, a + batch)))))
                 for a in tqdm(range(0, m, batch), desc="near-copy index", disable=not progress, leave=False)]
        desc = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, 9, POOLED * POOLED)
        ok = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, 9, dtype=torch.bool)
        ids = np.arange(m) if ids is None else np.asarray(ids)
        pick = np.sort(np.random.default_rng(seed).choice(m, min(m, calibrate), replace=False)) if m > 1 else []
        nearest = []
        for a in range(0, len(pick), batch):
            rows = pick[a : a + batch]
            d = region_distances(images_of(list(rows)), desc, ok)
            d[torch.arange(len(rows)), torch.as_tensor(rows)] = math.inf  # not itself
            nearest.append(d.min(1).values)
        near = torch.cat(nearest).numpy() if nearest else np.zeros(0)
        near = near[np.isfinite(near)]
        thr = float(np.quantile(near, quantile)) if len(near) and quantile > 0 else 0.0
        return cls(desc, ok, ids, thr, quantile, np.sort(near))

    def query(self, images01: torch.Tensor, batch: int = 64) -> dict[str, np.ndarray]:
        """For each image: ``nn_distance``, ``nn_ratio`` (nearest / second nearest), ``nn_id`` and ``near_copy``."""
        d1, d2, idx = [], [], []
        for a in range(0, len(images01), batch):
            d = region_distances(images01[a : a + batch], self.desc, self.ok)
            k = min(2, d.shape[1])
            top = d.topk(k, dim=1, largest=False)
            d1.append(top.values[:, 0])
            d2.append(top.values[:, 1] if k > 1 else torch.full((len(d),), math.inf))
            idx.append(top.indices[:, 0])
        d1 = torch.cat(d1).numpy() if d1 else np.zeros(0, np.float32)
        d2 = torch.cat(d2).numpy() if d2 else np.zeros(0, np.float32)
        nn = torch.cat(idx).numpy() if idx else np.zeros(0, np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(np.isfinite(d2) & (d2 > 0), d1 / np.maximum(d2, 1e-12), np.where(d1 == 0, 0.0, 1.0))
        return {"nn_distance": d1, "nn_ratio": ratio, "nn_id": self.ids[nn] if len(nn) else nn,
                "near_copy": (d1 < self.threshold) | (ratio < GU_RATIO)}


def load_images(paths: list[str], size: int, resize: str, progress: bool = False, desc: str = "images") -> torch.Tensor:
    """Image files as N x 3 x size x size in [0, 1], read like the run's own images."""
    from .images import load_image

    return torch.stack([load_image(p, size, resize) for p in tqdm(paths, desc=desc, disable=not progress,
                                                                  leave=False)]) \
        if paths else torch.zeros(0, 3, size, size)
