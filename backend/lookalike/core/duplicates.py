"""Near-duplicate groups: pairs of vectors above a cosine threshold, joined into groups.

Each vector's nearest neighbours come from FAISS (exact below `EXACT_LIMIT` vectors; past it an
IVF index with 8-bit codes, `nprobe` lists scanned), in batches of queries; candidate pairs are
then re-scored exactly from the float vectors, so a reported score is the true cosine. Pairs are
joined by union-find: copies of copies land in one group. A vector with more than `k`
near-duplicates is still grouped with all of them through its neighbours' lists.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np

EXACT_LIMIT = 50_000
NEIGHBOURS = 16  # nearest neighbours looked at per vector
QUERY_BATCH = 8192
NPROBE = 8


@dataclass(frozen=True)
class DuplicateGroup:
    task_ids: tuple[int, ...]  # ascending
    max_score: float  # the closest pair's cosine


@dataclass(frozen=True)
class GroupingReport:
    groups: list[DuplicateGroup]
    vectors: int
    pairs: int
    seconds: float
    index: str


def near_duplicate_groups(
    ids: np.ndarray, vectors: np.ndarray, threshold: float, k: int = NEIGHBOURS
) -> GroupingReport:
    """Groups of ids whose vectors (unit length) have cosine >= `threshold`, largest first."""
    start = time.perf_counter()
    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(ids) < 2:
        return GroupingReport([], len(ids), 0, time.perf_counter() - start, "none")
    index, kind = _neighbour_index(vectors)
    k = min(k + 1, len(ids))
    left: list[np.ndarray] = []
    right: list[np.ndarray] = []
    for begin in range(0, len(vectors), QUERY_BATCH):
        batch = vectors[begin : begin + QUERY_BATCH]
        scores, labels = index.search(batch, k)
        rows = np.repeat(np.arange(begin, begin + len(batch)), k).reshape(len(batch), k)
        # Approximate scores only pick candidates (with slack for 8-bit error); exact below.
        keep = (labels > rows) & (scores >= threshold - 0.02)
        left.append(rows[keep])
        right.append(labels[keep])
    a = np.concatenate(left)
    b = np.concatenate(right)
    exact = np.einsum("ij,ij->i", vectors[a], vectors[b]) if len(a) else np.empty(0)
    keep = exact >= threshold
    a, b, exact = a[keep], b[keep], exact[keep]
    groups = _union(len(ids), a, b, exact, ids)
    return GroupingReport(groups, len(ids), len(a), time.perf_counter() - start, kind)


def _neighbour_index(vectors: np.ndarray) -> tuple[faiss.Index, str]:
    n, dim = vectors.shape
    if n <= EXACT_LIMIT:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, "exact"
    nlist = int(2 ** round(np.log2(4 * np.sqrt(n))))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    sample = vectors[np.random.default_rng(0).choice(n, min(n, 32 * nlist), replace=False)]
    index.train(sample)
    index.add(vectors)
    index.nprobe = NPROBE
    return index, f"IVF{nlist},SQ8 nprobe={NPROBE}"


def _union(
    n: int, a: np.ndarray, b: np.ndarray, scores: np.ndarray, ids: np.ndarray
) -> list[DuplicateGroup]:
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    members: dict[int, list[int]] = {}
    best: dict[int, float] = {}
    for x, score in zip(a.tolist(), scores.tolist(), strict=True):
        r = root(x)
        best[r] = max(best.get(r, -1.0), float(score))
    for x in set(a.tolist()) | set(b.tolist()):
        members.setdefault(root(x), []).append(int(ids[x]))
    groups = [
        DuplicateGroup(tuple(sorted(m)), round(best[r], 6)) for r, m in members.items()
    ]
    groups.sort(key=lambda g: (-len(g.task_ids), -g.max_score, g.task_ids[0]))
    return groups


def one_per_group(hits: list, vectors: np.ndarray, threshold: float, k: int) -> list:
    """Varied results: walk `hits` (best first, `vectors` aligned) and keep a hit only if it is
    not a near-duplicate (cosine >= `threshold`) of one already kept; at most `k`."""
    kept: list[int] = []
    for position in range(len(hits)):
        if len(kept) == k:
            break
        if kept and float(np.max(vectors[kept] @ vectors[position])) >= threshold:
            continue
        kept.append(position)
    return [hits[p] for p in kept]
