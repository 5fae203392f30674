"""Nearest head samples of every tail map, by Euclidean distance between saliency maps.

Search returns *positions in the pool*; ``pool_ids[position]`` is the sample id. Keeping that mapping in one
place is deliberate: the reference code looked positions of a filtered table up in the full table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..errors import TailfuseError

INDEX_KINDS = ("auto", "exact", "faiss-flat", "faiss-hnsw")
# Pools up to this size are searched exactly with torch, larger ones with faiss HNSW. Measured on 25,732 head maps
# of 64 x 64 and 4,302 tail maps, one thread (benchmarks/results/neighbours-50k.md): exact 66 s, HNSW 58 s with 82 % of
# the exact neighbours, and a fuse of that size spends about 50 min on its saliency maps. Exact search grows with
# tail x head maps, so at 50,000 head maps it takes a few minutes, still a few per cent of such a fuse; beyond that
# HNSW's speed is worth its approximation.
AUTO_EXACT_MAX = 50000


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


class Rows:
    """Rows given by their count and a function that yields them in order, block by block (tensors, one row per
    map): the pool a faiss index takes in block by block, so that the pool is held once, inside the index, and not
    also as one tensor beside it."""

    def __init__(self, n: int, blocks: Callable[[], Iterator[torch.Tensor]]):
        self.n, self.blocks = n, blocks

    def __len__(self) -> int:
        return self.n

    def tensor(self) -> torch.Tensor:
        """All rows as one N x D float32 tensor, filled block by block."""
        out, a = None, 0
        for b in self.blocks():
            b = b.reshape(len(b), -1).float()
            if out is None:
                out = torch.empty((self.n, b.shape[1]), dtype=torch.float32)
            out[a : a + len(b)] = b
            a += len(b)
        return out if out is not None else torch.empty((0, 0))


def nearest(queries: torch.Tensor | Rows, pool: torch.Tensor | Rows, k: int, index: str = "auto",
            block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the k nearest pool rows: (distances Q x k, positions Q x k), nearest first.
    ``queries`` and ``pool``: tensors, or :class:`Rows`. A faiss index takes the pool in block by block and holds
    it once (its storage is sized before the first block, so it does not grow by reallocation); exact search holds
    the pool as one tensor. Queries are searched a block at a time either way; each query's result depends on that
    query alone."""
    if index not in INDEX_KINDS:
        raise TailfuseError(f"neighbour index '{index}' unknown; choose from {', '.join(INDEX_KINDS)}.")
    if len(pool) == 0:
        raise TailfuseError("the head pool is empty: no training sample carries only head labels.")
    k = min(k, len(pool))
    if index == "auto":
        index = "exact" if len(pool) <= AUTO_EXACT_MAX else "faiss-hnsw"
    query_blocks = (queries[a : a + block] for a in range(0, len(queries), block)) if isinstance(queries, torch.Tensor) \
        else queries.blocks()
    if index == "exact":
        p = pool if isinstance(pool, torch.Tensor) else pool.tensor()
        p = p.reshape(len(p), -1).float()
        found = [_exact(q.reshape(len(q), -1).float(), p, k, block) for q in query_blocks]
    else:
        ix = _faiss_index(pool, index, k)
        found = []
        for q in query_blocks:
            d2, pos = ix.search(np.ascontiguousarray(q.reshape(len(q), -1).float().numpy(), dtype=np.float32), k)
            found.append((np.sqrt(np.maximum(d2, 0)), pos.astype(np.int64)))
    if not found:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([d for d, _ in found]), np.concatenate([p for _, p in found])


def _faiss_index(pool: torch.Tensor | Rows, index: str, k: int):
    """A faiss index (flat or HNSW) filled with the pool, block by block when the pool is :class:`Rows`."""
    import faiss

    ix = None
    for b in [pool] if isinstance(pool, torch.Tensor) else pool.blocks():
        xb = np.ascontiguousarray(b.reshape(len(b), -1).float().numpy(), dtype=np.float32)
        if ix is None:
            dim = xb.shape[1]
            if index == "faiss-flat":
                ix = faiss.IndexFlatL2(dim)
            else:
                ix = faiss.IndexHNSWFlat(dim, 32)
                ix.hnsw.efSearch = max(64, 2 * k)
            # size the vector storage once: adding block by block would otherwise grow it by reallocation
            store = ix if index == "faiss-flat" else faiss.downcast_index(ix.storage)
            store.codes.resize(len(pool) * store.code_size)
        ix.add(xb)
        del xb, b
    return ix
