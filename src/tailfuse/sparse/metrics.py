"""Measures of a sparse code: reconstruction against the trivial predictor, sparsity, usage, classification."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from .learner import region_masks
from .nets import SparseModel, one_hot


@torch.no_grad()
def code_metrics(model: SparseModel, z: torch.Tensor, y: torch.Tensor, labels: list[str], batch: int = 256) -> dict:
    """Metrics on latents z (N x C x h x w) with labels y (N x L).

    recon_rel_l1 / recon_rel_l1_hard: mean |D(code) - z| over mean |mu - z|, mu the per-element mean latent of the
    train split (the trivial predictor); soft code and one-hot argmax code. recon_rel_l1_mixed: codes spliced between
    samples i and i+1 with fixed random region masks, against the same splice of the latents.
    sparsity: mean over positions of the largest channel probability; entropy: mean per-position entropy (nats).
    map: mean average precision over labels with a positive here; ap: per label (None without positives).
    """
    model.eval()
    k = model.k
    err_s = err_h = err_t = err_m = err_mt = 0.0
    maxp = ent = 0.0
    counts = torch.zeros(k)
    scores = []
    g = torch.Generator().manual_seed(123)
    n_pos = 0
    for i in range(0, len(z), batch):
        zb = z[i : i + batch]
        p = model.code(zb)
        hard = one_hot(p.argmax(1), k)
        err_s += (model.decode(p) - zb).abs().sum().item()
        err_h += (model.decode(hard) - zb).abs().sum().item()
        err_t += (model.mu - zb).abs().sum().item()
        if len(zb) > 1:
            mk = region_masks(len(zb), zb.shape[2], zb.shape[3], g)
            j = torch.roll(torch.arange(len(zb)), 1)
            target = mk * zb + (1 - mk) * zb[j]
            err_m += (model.decode(mk * hard + (1 - mk) * hard[j]) - target).abs().sum().item()
            err_mt += (model.mu - target).abs().sum().item()
        maxp += p.max(1).values.sum().item()
        ent += (-(p * p.clamp_min(1e-12).log()).sum(1)).sum().item()
        n_pos += p.shape[0] * p.shape[2] * p.shape[3]
        counts += torch.bincount(p.argmax(1).flatten(), minlength=k).float()
        scores.append(model.probabilities(model.classify(p)))
    s = torch.cat(scores).numpy()
    yn = y.numpy()
    ap = {}
    for j, lab in enumerate(labels):
        ap[lab] = float(average_precision_score(yn[:, j], s[:, j])) if yn[:, j].sum() > 0 else None
    valid = [v for v in ap.values() if v is not None]
    pu = counts / counts.sum()
    return {
        "recon_rel_l1": err_s / err_t,
        "recon_rel_l1_hard": err_h / err_t,
        "recon_rel_l1_mixed": (err_m / err_mt) if err_mt else None,
        "sparsity": maxp / n_pos,
        "entropy": ent / n_pos,
        "entropy_max": math.log(k),
        "codes_used": int((counts > 0).sum()),
        "code_perplexity": float(torch.exp(-(pu * pu.clamp_min(1e-12).log()).sum())),
        "map": float(np.mean(valid)) if valid else None,
        "ap": ap,
    }
