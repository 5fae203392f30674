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


POOL_BLOCK_VALUES = 1 << 22  # float64 values of the pool compared at once (32 MiB): bounded, whatever the pool size


def _exact(q: torch.Tensor, p: torch.Tensor, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact search in float64, ``block`` queries against a block of the pool at a time (a block holds at most
    POOL_BLOCK_VALUES values, so memory beyond the pool itself stays bounded; pools of up to 16,384 maps of
    16 x 16 are one block). Per query the best k of each pool block are merged."""
    pool_block = max(1, POOL_BLOCK_VALUES // max(1, p.shape[1]))
    dists, pos = [], []
    for i in range(0, len(q), block):
        qi = q[i : i + block].double()
        best_d, best_j = None, None
        for a in range(0, len(p), pool_block):
            d = torch.cdist(qi, p[a : a + pool_block].double())
            v, j = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False, sorted=True)
            j = j + a
            if best_d is None:
                best_d, best_j = v, j
                continue
            cd, cj = torch.cat([best_d, v], 1), torch.cat([best_j, j], 1)
            # the kept best come from earlier pool blocks, so a stable sort by distance keeps the lower position
            # first on a tie
            o = torch.argsort(cd, dim=1, stable=True)[:, :k]
            best_d, best_j = cd.gather(1, o), cj.gather(1, o)
        dists.append(best_d.float())
        pos.append(best_j)
    return torch.cat(dists).numpy(), torch.cat(pos).numpy()


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
        return _exact(q, p, k, block)
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
