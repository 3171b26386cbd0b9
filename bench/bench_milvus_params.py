"""HNSW parameters for the Milvus engine, measured: recall@20 and latency of FAISS's HNSW (the
algorithm Milvus's knowhere HNSW implements) with Lookalike's Milvus settings (M=16,
efConstruction=200, inner product) on bench_scale.py's data: 512-d vectors around 2,000
centres, half of the ids filtered out (the labeled tasks) plus the query's own, k=20.

milvus-lite, the Milvus-protocol server the tests use, is a Python development server: its
search speed says nothing about Milvus. This measures the index Lookalike asks Milvus to build
and the `ef` it searches with, against an exact search.

    .venv/bin/python bench/bench_milvus_params.py             # 100k and 1M
    .venv/bin/python bench/bench_milvus_params.py --n 100000

Prints a table and writes bench/results/milvus-params.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_scale import DIM, K, chunk_vectors, chunks, exact_truth, excluded_mask, pct

from lookalike.core.milvus_collection import EF_MIN, HNSW_EF_CONSTRUCTION, HNSW_M

EFS = (32, 64, EF_MIN, 256)


def measure(n: int, queries_n: int) -> list[dict]:
    start = time.perf_counter()
    index = faiss.IndexHNSWFlat(DIM, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    for _, vectors in chunks(n):
        index.add(vectors)
    build_s = time.perf_counter() - start
    mask = excluded_mask(n)
    query_ids = np.arange(queries_n, dtype=np.int64) * (n // queries_n)
    queries = chunk_vectors(n + 1000, n + 1000 + queries_n, seed=5)
    truth = exact_truth(n, queries, query_ids, mask)
    allowed = ~mask.contains(np.arange(n, dtype=np.int64))
    rows = []
    for ef in EFS:
        found, times = [], []
        for query, query_id in zip(queries, query_ids, strict=True):
            keep = allowed.copy()
            keep[query_id] = False
            bits = np.packbits(keep, bitorder="little")
            selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bits))
            params = faiss.SearchParametersHNSW(efSearch=max(ef, K), sel=selector)
            t0 = time.perf_counter()
            _, labels = index.search(query[None, :], K, params=params)
            times.append(time.perf_counter() - t0)
            found.append(labels[0])
        recall = float(np.mean([len(set(f) & set(t)) / K for f, t in
                                zip(found, truth, strict=True)]))
        rows.append({"n": n, "M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "ef": ef,
                     "build_s": build_s, "recall_at_20": recall,
                     "search_p50_ms": pct(times, 50), "search_p99_ms": pct(times, 99)})
        print(f"{n:>9,} | ef {ef:>3} | build {build_s:7.1f} s | recall@20 {recall:.3f} | "
              f"p50 {rows[-1]['search_p50_ms']:.2f} ms | p99 {rows[-1]['search_p99_ms']:.2f} ms",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, action="append", help="sizes (default 100k and 1M)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results/milvus-params.json")
    args = parser.parse_args()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rows = [row for n in args.n or [100_000, 1_000_000] for row in measure(n, args.queries)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"k": K, "dim": DIM, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
