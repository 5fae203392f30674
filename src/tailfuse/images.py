"""Reading images of any size and mode into RGB float tensors of one size.

Modes: L, LA, RGB, RGBA, P (palette, with or without transparency), CMYK, I;16 / I (16-bit), F. Transparent
pixels are composited onto black. 16-bit images keep their precision (scaled by 65535). EXIF orientation is applied.

Resize policy (``--resize``):
  * ``center-crop`` (default): scale the shorter side to the target size (bicubic, antialiased), then crop the
    centre square. Nothing is distorted; borders of non-square images are cut.
  * ``pad``: scale the longer side to the target size, then pad with black to a square. Nothing is cut.
  * ``stretch``: scale both sides to the target size. Nothing is cut; aspect ratio is not kept.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False
RESIZE_POLICIES = ("center-crop", "pad", "stretch")


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is a short, user-readable cause."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _to_float_array(img: Image.Image) -> np.ndarray:
    """H x W x 3 float32 in [0, 1]."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if (mode.startswith("I;16") or a.max() > 255) else 255.0
        a = np.clip(a / scale, 0, 1).astype(np.float32)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return np.repeat(np.nan_to_num(a)[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _resize(a: np.ndarray, size: int, policy: str) -> np.ndarray:
    h, w = a.shape[:2]
    if policy == "stretch":
        nh, nw = size, size
    elif policy == "center-crop":
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
    elif policy == "pad":
        s = size / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
    else:
        raise ValueError(f"unknown resize policy {policy!r}; choose from {RESIZE_POLICIES}")
    if (nh, nw) != (h, w):
        chans = [Image.fromarray(np.ascontiguousarray(a[..., c])).resize((nw, nh), Image.Resampling.BICUBIC) for c in range(3)]
        a = np.clip(np.stack([np.asarray(c) for c in chans], axis=2), 0, 1)
    if policy == "center-crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        a = a[top : top + size, left : left + size]
    elif policy == "pad":
        out = np.zeros((size, size, 3), dtype=np.float32)
        top, left = (size - nh) // 2, (size - nw) // 2
        out[top : top + nh, left : left + nw] = a
        a = out
    return a


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot be opened (a missing file, a symbolic-link loop, an over-long path, no permission), or
    None."""
    import errno

    try:
        os.stat(path)
    except OSError as e:
        return {errno.ENOENT: "file not found", errno.ELOOP: "symbolic link loop",
                errno.ENAMETOOLONG: "path too long for the file system", errno.EACCES: "permission denied",
                errno.ENOTDIR: "a part of the path is not a folder"}.get(e.errno, f"cannot be opened ({e.strerror})")
    return None


def load_image(path: str, size: int, policy: str = "center-crop") -> torch.Tensor:
    """Read one image as a 3 x size x size float tensor in [0, 1]; raise BadImage with the cause."""
    problem = path_problem(path)
    if problem is not None:
        raise BadImage(path, problem)
    if os.path.isdir(path):
        raise BadImage(path, "is a folder, not an image file")
    if os.path.getsize(path) == 0:
        raise BadImage(path, "zero-byte file")
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            a = _to_float_array(img)
    except UnidentifiedImageError:
        raise BadImage(path, "not a readable image (unknown or corrupt format)") from None
    except OSError as e:
        msg = str(e)
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            raise BadImage(path, f"truncated image ({msg})") from None
        raise BadImage(path, f"unreadable image ({msg})") from None
    except (ValueError, SyntaxError) as e:
        raise BadImage(path, f"corrupt image ({e})") from None
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise BadImage(path, f"image too small ({a.shape[1]}x{a.shape[0]})")
    a = _resize(a, size, policy)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def is_colour(image: torch.Tensor, tol: float = 1.5 / 255) -> bool:
    """Whether a 3 x H x W image in [0, 1] has colour (channels differing by more than about one 8-bit level)."""
    return bool((image.amax(0) - image.amin(0)).max() > tol)


def save_png(image: torch.Tensor, path: str, grey: bool = False) -> None:
    """Write a 3 x H x W tensor in [0, 1] as an 8-bit PNG (atomically): RGB, or ``grey`` (mode L, the channels
    averaged) for greyscale data, so grey inputs come back grey and not with the decoder's faint colour cast."""
    from .store import atomic_file

    img = image.detach().float().clamp(0, 1)
    if grey:
        img = img.mean(0, keepdim=True)
    a = (img.permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    if grey:
        a = a[:, :, 0]
    with atomic_file(path, ".png") as tmp:
        Image.fromarray(a).save(tmp)
