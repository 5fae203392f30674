"""A torch Dataset of the real images plus a run's synthetic ones, for training code.

``AugmentedImageDataset(real, run)`` yields ``(image, labels, is_synthetic)``: the image as a 3 x S x S float tensor
in [0, 1] (read like the run's own images: its size and resize policy) or whatever ``transform`` makes of the PIL
image, the label vector (float, in the run's label order; soft targets when the set has them), and whether the
image is synthetic. The real part is a manifest or an image folder (the run's own input by default) restricted to a
split (``"train"`` by default, by the run's split); the synthetic part is the run's set ``name``: its accepted
images when ``tailfuse review`` has recorded decisions (``reviewed="auto"``), all of them with ``reviewed=False``.

How much synthetic data a model sees is set one of two ways:

* ``synthetic_ratio=r``: the dataset holds the real images and r x as many synthetic ones (drawn once, seeded);
* ``synthetic_prob=p``: DA-Fusion / Diff-Mix style replacement: item i is its real image, but with probability p
  (drawn per access) a synthetic image of one of the same tail labels replaces it, when there is one.

``weighted_sampler(dataset)`` gives a ``torch.utils.data.WeightedRandomSampler`` that draws every label about
equally often (each item weighted by the inverse frequency of its rarest label).
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from .errors import TailfuseError, q
from .store import RunStore


class AugmentedImageDataset(Dataset):
    """Real training images plus a run's synthetic ones; items are ``(image, labels, is_synthetic)``.

    Args:
        run: the run folder (encoded, with the decoded set ``name``).
        name: the decoded synthetic set (default ``synthetic``).
        split: the split of the real images served (default ``train``; ``None`` or ``""``: every split).
        real: a manifest or image folder to take the real images from instead of the run's own input (restricted to
            ``split`` when it has a split column), labelled in the run's label order.
        reviewed: ``"auto"``: the set's accepted images when ``tailfuse review`` has recorded decisions, else all;
            ``True``: the accepted images (an error when there is no review); ``False``: all of them.
        synthetic_ratio: the dataset holds the real images and this many times as many synthetic ones, drawn once
            (seeded); at most the whole set.
        synthetic_prob: instead, each access to a real item returns, with this probability, a synthetic image
            carrying one of its labels, when there is one (DA-Fusion / Diff-Mix style replacement).
        transform: applied to the PIL image (e.g. a torchvision transform); without it the image is a
            3 x S x S float tensor in [0, 1] at the run's image size.
        seed: seed of the draws.

    With neither ``synthetic_ratio`` nor ``synthetic_prob``, every synthetic image is added once. Labels are a float
    vector in the run's label order: soft targets when the set has ``soft_<label>`` columns, else 0/1.
    """

    def __init__(self, run: str, name: str = "synthetic", split: str = "train", real: str | None = None,
                 reviewed: str | bool = "auto", synthetic_ratio: float | None = None, synthetic_prob: float | None = None,
                 transform=None, seed: int = 0):
        if synthetic_ratio is not None and synthetic_prob is not None:
            raise TailfuseError("give synthetic_ratio or synthetic_prob, not both.")
        if synthetic_ratio is not None and synthetic_ratio < 0:
            raise TailfuseError("synthetic_ratio must be >= 0.")
        if synthetic_prob is not None and not 0 <= synthetic_prob <= 1:
            raise TailfuseError("synthetic_prob must be in [0, 1].")
        store = RunStore(run)
        store.require("encode")
        info = store.labels()
        self.labels = list(info["labels"])
        self.size = int(info.get("image_size") or 128)
        self.resize = (store.config().get("data") or {}).get("resize", "center-crop")
        self.transform = transform
        self.synthetic_prob = synthetic_prob
        self.rng = np.random.default_rng(seed)
        samples = store.samples()
        if real is not None:
            from .config import DataConfig
            from .data import load_dataset

            ds = load_dataset(DataConfig(data=real, labels=self.labels))
            table = ds.table
            if split and "split" in table and table["split"].notna().any():
                table = table[table["split"] == split]
        else:
            table = samples[samples["split"] == split] if split else samples
        self.real_paths = table["abs_path"].tolist()
        self.real_y = table[self.labels].to_numpy(dtype=np.float32)
        folder = store.root / name
        if not (folder / "manifest.csv").is_file():
            raise TailfuseError(f"run {store.root} has no decoded set '{name}'; run `tailfuse decode --run {q(store.root)} "
                                f"--name {q(name)}` first.")
        accepted = folder / "manifest.accepted.csv"
        use_reviewed = accepted.is_file() if reviewed == "auto" else bool(reviewed)
        if use_reviewed and not accepted.is_file():
            raise TailfuseError(f"set '{name}' has no review (manifest.accepted.csv); run `tailfuse review` or pass "
                                "reviewed=False.")
        man = pd.read_csv(accepted if use_reviewed else folder / "manifest.csv")
        path_col = info.get("path_column", "path")
        soft = [f"soft_{lab}" for lab in self.labels]
        cols = soft if all(c in man.columns for c in soft) else self.labels
        self.syn_paths = [str(folder / p) for p in man[path_col]]
        self.syn_y = man[cols].to_numpy(dtype=np.float32)
        self.reviewed = use_reviewed
        n_real = len(self.real_paths)
        if synthetic_ratio is not None:
            k = min(len(self.syn_paths), int(round(synthetic_ratio * n_real)))
            pick = np.sort(self.rng.choice(len(self.syn_paths), size=k, replace=False)) if k else np.zeros(0, int)
        elif synthetic_prob is not None:
            pick = np.zeros(0, int)  # synthetic images come in by replacement
        else:
            pick = np.arange(len(self.syn_paths))
        self.items = [(p, y, False) for p, y in zip(self.real_paths, self.real_y)] + \
                     [(self.syn_paths[i], self.syn_y[i], True) for i in pick]
        # for replacement: synthetic images by tail label
        self._by_label: dict[int, list[int]] = {}
        for i, y in enumerate(self.syn_y):
            for j in np.flatnonzero(y > 0):
                self._by_label.setdefault(int(j), []).append(i)

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, path: str):
        from .images import load_image

        img = load_image(path, self.size, self.resize)
        if self.transform is None:
            return img
        from PIL import Image

        return self.transform(Image.fromarray((img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)))

    def __getitem__(self, i: int):
        path, y, syn = self.items[i]
        if self.synthetic_prob and not syn and self.rng.random() < self.synthetic_prob:
            cands = sorted({c for j in np.flatnonzero(y > 0) for c in self._by_label.get(int(j), [])})
            if cands:
                c = cands[int(self.rng.integers(len(cands)))]
                path, y, syn = self.syn_paths[c], self.syn_y[c], True
        return self._load(path), torch.from_numpy(np.asarray(y, dtype=np.float32)), syn

    def label_matrix(self) -> np.ndarray:
        return np.stack([y for _, y, _ in self.items])


def weighted_sampler(dataset: AugmentedImageDataset, num_samples: int | None = None, seed: int = 0) -> WeightedRandomSampler:
    """Draws every label about equally often: each item weighted by 1 / (the count of its rarest label)."""
    y = dataset.label_matrix() > 0
    counts = y.sum(0).astype(np.float64)
    w = np.array([1.0 / counts[row].min() if row.any() else 1.0 / max(1.0, counts.max()) for row in y])
    return WeightedRandomSampler(torch.from_numpy(w), num_samples or len(w), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))
