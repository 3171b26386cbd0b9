"""Near-duplicate grouping time and memory (`core.duplicates`) at 100k and 1M vectors.

bench_scale.py's synthetic 512-d vectors (2,000 clusters; members of a cluster at cosine ~0.6,
so none is a near-duplicate of another), plus 1 % planted near-duplicates: copies of random
vectors with noise, at cosine ~0.97 to their original. Reports the time to group the whole
collection at the CLIP default threshold (0.92), the process's memory growth (the vectors
themselves included), the groups found and the share of planted pairs recovered.

    .venv/bin/python bench/bench_duplicates.py            # 100k and 1M
    .venv/bin/python bench/bench_duplicates.py --n 100000

Prints a table and writes bench/results/duplicates.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import faiss
import numpy as np
from bench_scale import DIM, chunk_vectors, rss_bytes

from lookalike.core.duplicates import near_duplicate_groups

THRESHOLD = 0.92
PLANTED_SHARE = 0.01


def dataset(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n vectors: the last 1 % are noisy copies of random earlier ones; (vectors, originals)."""
    planted = int(n * PLANTED_SHARE)
    vectors = chunk_vectors(0, n)
    rng = np.random.default_rng(3)
    originals = rng.choice(n - planted, planted, replace=False)
    noise = rng.standard_normal((planted, DIM)).astype(np.float32) * (0.25 / DIM**0.5)
    copies = vectors[originals] + noise
    vectors[n - planted :] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return vectors, originals


def measure(n: int) -> dict:
    vectors, originals = dataset(n)
    planted = len(originals)
    gc.collect()
    before = rss_bytes()
    report = near_duplicate_groups(np.arange(n, dtype=np.int64), vectors, THRESHOLD)
    grown = rss_bytes() - before
    pairs = {tuple(sorted((int(o), n - planted + i))) for i, o in enumerate(originals)}
    found = {g.task_ids for g in report.groups if len(g.task_ids) == 2}
    in_groups = {i for g in report.groups for i in g.task_ids}
    return {
        "n": n,
        "index": report.index,
        "seconds": report.seconds,
        "rss_growth_mb": grown / 2**20,
        "vectors_mb": vectors.nbytes / 2**20,
        "groups": len(report.groups),
        "planted_pairs": planted,
        "planted_found": len(found & pairs) / planted,
        "grouped_not_planted": len(in_groups - {i for p in pairs for i in p}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, action="append", help="sizes (default 100k and 1M)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results/duplicates.json")
    args = parser.parse_args()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    rows = []
    print("n | index | seconds | RSS growth MB | vectors MB | groups | planted found | extra")
    for n in args.n or [100_000, 1_000_000]:
        row = measure(n)
        rows.append(row)
        print(f"{n:,} | {row['index']} | {row['seconds']:.1f} | {row['rss_growth_mb']:.0f} | "
              f"{row['vectors_mb']:.0f} | {row['groups']:,} | {row['planted_found']:.3f} | "
              f"{row['grouped_not_planted']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threshold": THRESHOLD, "dim": DIM, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
