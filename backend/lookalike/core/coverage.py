"""Coverage: cluster a collection so that labeling can visit every kind of image early.

k-means (FAISS, spherical) over unit vectors; each vector's cluster and its typicality (cosine
to the cluster's centre). `coverage_order` is the order "one task of every cluster, most
typical first, then a second of each" that Label Studio's Uncertainty sampling produces from
these clusters and scores; the benchmark compares it with random order.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

MAX_K = 1000
KMEANS_ITERATIONS = 25


def auto_k(n: int) -> int:
    """Clusters for n tasks: about 2·sqrt(n), at least 2, at most MAX_K. More clusters than
    kinds of image costs little (a kind split in two is visited twice early); fewer leaves
    kinds unvisited until the second round: 2·sqrt(n) covered more classes in the first 10
    and 20 tasks than sqrt(n / 2) or sqrt(n) in bench_coverage.py."""
    return int(min(MAX_K, max(2, round(2 * n**0.5)), max(n, 1)))


@dataclass(frozen=True)
class Clustering:
    centroids: np.ndarray  # (k, d), unit length
    labels: np.ndarray  # cluster per vector
    typicality: np.ndarray  # cosine to the vector's centroid

    @property
    def k(self) -> int:
        return len(self.centroids)


def cluster(vectors: np.ndarray, k: int | None = None, seed: int = 0) -> Clustering:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    k = min(k or auto_k(len(vectors)), len(vectors))
    # Several starts, the best kept: one bad start splits a group and merges two others.
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, nredo=5,
                          spherical=True, min_points_per_centroid=1, verbose=False)
    kmeans.train(vectors)
    return assign(vectors, kmeans.centroids)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> Clustering:
    """Each vector's nearest centre (new tasks between two clusterings)."""
    centroids = np.asarray(centroids, dtype=np.float32)
    similarities = np.asarray(vectors, dtype=np.float32) @ centroids.T
    labels = similarities.argmax(axis=1)
    return Clustering(centroids, labels, similarities[np.arange(len(labels)), labels])


def coverage_score(labels: np.ndarray, typicality: np.ndarray) -> np.ndarray:
    """Prediction scores in [0, 1), above every request's band (negative scores). Label Studio
    serves the lowest first among clusters the annotator labeled equally often, so: the
    largest cluster's tasks lowest (a representative set covers what is common first, an
    outlier alone in its cluster last), and within a cluster the most typical lowest."""
    labels = np.asarray(labels)
    sizes = np.bincount(labels)
    by_size = np.argsort(-sizes, kind="stable")  # cluster ids, largest first
    rank = np.empty(len(sizes), dtype=np.float64)
    rank[by_size] = np.arange(len(sizes))
    within = np.clip((1.0 - np.asarray(typicality, dtype=np.float64)) / 2.0, 0.0, 0.999)
    return (rank[labels] + within) / len(sizes)


def coverage_order(labels: np.ndarray, typicality: np.ndarray) -> np.ndarray:
    """Positions in serving order: round after round (the annotator's labels per cluster),
    clusters by score, each cluster's next most typical."""
    order = np.lexsort((-typicality, labels))  # by cluster, most typical first
    rounds = np.empty(len(labels), dtype=np.int64)
    for value in np.unique(labels):
        members = order[labels[order] == value]
        rounds[members] = np.arange(len(members))
    return np.lexsort((coverage_score(labels, typicality), rounds))
