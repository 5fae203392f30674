"""Saliency maps of the classifier C over the sparse code E(z), with pytorch-grad-cam.

Target class per sample (never a label the sample does not carry):
  * tail samples (training samples carrying a tail label): one map per tail label they carry;
  * head-pool samples (training samples carrying no tail label): their most confident *present* head label.
Samples carrying no label at all have no class to explain and are left out of the pool (counted in the record).

Methods: Grad-CAM (default) and HiResCAM are class-aware; EigenCAM is class-agnostic (the first principal
component of the layer's activations; what the reference code used) and is kept as an option.
The maps are h x w (the latent grid), in [0, 1] (pytorch-grad-cam's min-max scaling).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os

import numpy as np
import pandas as pd
import torch

from ..errors import TailfuseError
from ..sparse.nets import SparseModel

CAM_METHODS = ("gradcam", "hirescam", "eigencam")


def cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, HiResCAM

    try:
        return {"gradcam": GradCAM, "hirescam": HiResCAM, "eigencam": EigenCAM}[method]
    except KeyError:
        raise TailfuseError(f"saliency method '{method}' unknown; choose from {', '.join(CAM_METHODS)}.") from None


class _CodeClassifier(torch.nn.Module):
    """C as a module on codes, for pytorch-grad-cam."""

    def __init__(self, model: SparseModel):
        super().__init__()
        self.model = model

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.model.classify(code)


def _columns(labels: list[str], tail: list[str]) -> tuple[list[int], list[int]]:
    """Column positions of the tail labels and of the head labels."""
    tail_idx = [labels.index(t) for t in tail]
    return tail_idx, [j for j in range(len(labels)) if j not in tail_idx]


def rows_needing_probabilities(samples: pd.DataFrame, labels: list[str], tail: list[str]) -> np.ndarray:
    """Positions of the rows whose target :func:`saliency_targets` picks by C's probabilities: samples that carry
    no tail label and two or more head labels (none in multi-class data). Other rows' probabilities are not read."""
    y = samples[labels].to_numpy(dtype=bool)
    tail_idx, head_idx = _columns(labels, tail)
    return np.flatnonzero((y[:, head_idx].sum(1) > 1) & ~y[:, tail_idx].any(1))


def saliency_targets(samples: pd.DataFrame, labels: list[str], tail: list[str], probs: np.ndarray) -> pd.DataFrame:
    """One row per map to compute: sample_id, role (tail|head), target (label index).

    ``samples``: training rows; ``probs``: C's probabilities for those rows (same order)."""
    y = samples[labels].to_numpy(dtype=bool)
    tail_idx, head_idx = _columns(labels, tail)
    rows = []
    for i, sid in enumerate(samples["sample_id"].to_numpy()):
        carried_tail = [j for j in tail_idx if y[i, j]]
        if carried_tail:
            rows.extend({"sample_id": int(sid), "role": "tail", "target": j} for j in carried_tail)
            continue
        present = [j for j in head_idx if y[i, j]]
        if not present:
            continue  # no label: nothing to explain
        best = max(present, key=lambda j: probs[i, j])
        rows.append({"sample_id": int(sid), "role": "head", "target": best})
    return pd.DataFrame(rows, columns=["sample_id", "role", "target"])


@functools.cache
def _libc():
    """The C library (ctypes), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mmap from now on (glibc's ``mallopt``), so that
    freeing it gives the memory back to the operating system at once. True when set; False where the C library has
    no ``mallopt`` (not glibc) or the user chose a threshold with ``MALLOC_MMAP_THRESHOLD_`` (theirs is kept).

    glibc starts at 128 KiB but raises the threshold each time a mapped block is freed (up to 32 MiB), after which
    the Grad-CAM batches' large tensors come from the heap, which fragments and is only partly trimmed: the
    neighbour search that follows then stacks on what the saliency pass left held, and fuse's peak grew with the
    run (1,313 -> 1,487 MB ru_maxrss from 2,000 to 5,000 latents of 4 x 64 x 64). With the threshold fixed it grows
    by the neighbour index and about 2 KB per latent of tables (1,214 -> 1,393 MiB from 2,000 to 20,000 latents, the
    index 16 -> 161 MiB; benchmarks/results/scale-memory.md). A fixed 1 MiB costs about 10 % of the
    saliency pass's speed (page faults on fresh mappings), 128 KiB about 20 %."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1)


def release_memory(collect: bool = False) -> None:
    """Give freed memory back to the operating system with glibc's ``malloc_trim`` where the C library has one
    (Linux; elsewhere nothing), after a full garbage collection when ``collect`` (about 0.3 s with torch and
    diffusers loaded, so once per shard, not per batch; the trim itself takes microseconds). Without it glibc keeps
    the heap of every finished Grad-CAM batch, and a saliency pass held more the longer it ran: 1,610 MiB at 5,000
    latents of 4 x 64 x 64 against 1,338 at 2,000 (benchmarks/results/scale-memory.md)."""
    if collect:
        gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def compute_maps(model: SparseModel, z: torch.Tensor, targets: list[int], method: str = "gradcam", layer: str = "full") -> torch.Tensor:
    """Maps (N x h x w, float32 in [0, 1]) of C over E(z) for the given target label per row."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    with torch.no_grad():
        code = model.code(z)
    wrapper = _CodeClassifier(model)
    cam = cam_class(method)(model=wrapper, target_layers=[model.C.cam_layer(layer)])
    try:
        with torch.enable_grad():
            maps = cam(input_tensor=code, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    finally:
        cam.activations_and_grads.release()
    return torch.from_numpy(np.ascontiguousarray(maps)).float()


def rank_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map -> the quantile of every position within its own map, in [0, 1] (ties share their mean rank).

    With rank-normalised maps, ``S > q`` selects a share 1 - q of the positions whatever the map's contrast, so the
    tail share of a fused sample is controlled by q1 and q2 (min-max maps let one bright spot decide it)."""
    n = maps.shape[0]
    flat = maps.reshape(n, -1).double()
    m = flat.shape[1]
    order = flat.argsort(dim=1, stable=True)
    ranks = torch.empty_like(flat)
    ranks.scatter_(1, order, torch.arange(m, dtype=torch.float64).expand(n, m).contiguous())
    # average the ranks of tied values
    out = torch.empty_like(flat)
    for i in range(n):
        vals, inv = torch.unique(flat[i], return_inverse=True)
        if len(vals) == m:
            out[i] = ranks[i]
        else:
            s = torch.zeros(len(vals), dtype=torch.float64).index_add_(0, inv, ranks[i])
            c = torch.bincount(inv, minlength=len(vals)).double()
            out[i] = (s / c)[inv]
    return (out / max(m - 1, 1)).float().reshape(maps.shape)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur N x h x w maps with a Gaussian of ``sigma`` positions (reflect padding): coherent regions, not speckle."""
    r = max(1, int(round(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=maps.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    m = maps[:, None].float()
    m = torch.nn.functional.pad(m, (r, r, r, r), mode="reflect") if min(maps.shape[1:]) > r else torch.nn.functional.pad(m, (r, r, r, r), mode="replicate")
    m = torch.nn.functional.conv2d(m, k[None, None, None, :])
    m = torch.nn.functional.conv2d(m, k[None, None, :, None])
    return m[:, 0]
