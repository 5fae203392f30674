"""Nearest head samples of every tail map, by Euclidean distance between saliency maps.

Search returns *positions in the pool*; ``pool_ids[position]`` is the sample id. Keeping that mapping in one
place is deliberate: the reference code looked positions of a filtered table up in the full table.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import TailfuseError

INDEX_KINDS = ("auto", "exact", "faiss-flat", "faiss-hnsw")
AUTO_EXACT_MAX = 20000  # pools up to this size are searched exactly with torch


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int, index: str = "auto", block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the k nearest pool rows: (distances Q x k, positions Q x k), nearest first."""
    if index not in INDEX_KINDS:
        raise TailfuseError(f"neighbour index '{index}' unknown; choose from {', '.join(INDEX_KINDS)}.")
    if len(pool) == 0:
        raise TailfuseError("the head pool is empty: no training sample carries only head labels.")
    k = min(k, len(pool))
    q = queries.reshape(len(queries), -1).float()
    p = pool.reshape(len(pool), -1).float()
    if index == "auto":
        index = "exact" if len(p) <= AUTO_EXACT_MAX else "faiss-hnsw"
    if index == "exact":
        dists, pos = [], []
        for i in range(0, len(q), block):
            d = torch.cdist(q[i : i + block].double(), p.double())
            v, j = torch.topk(d, k, dim=1, largest=False, sorted=True)
            dists.append(v.float())
            pos.append(j)
        return torch.cat(dists).numpy(), torch.cat(pos).numpy()
    import faiss

    xb = np.ascontiguousarray(p.numpy(), dtype=np.float32)
    xq = np.ascontiguousarray(q.numpy(), dtype=np.float32)
    if index == "faiss-flat":
        ix = faiss.IndexFlatL2(xb.shape[1])
    else:
        ix = faiss.IndexHNSWFlat(xb.shape[1], 32)
        ix.hnsw.efSearch = max(64, 2 * k)
    ix.add(xb)
    d2, pos = ix.search(xq, k)
    return np.sqrt(np.maximum(d2, 0)), pos.astype(np.int64)
