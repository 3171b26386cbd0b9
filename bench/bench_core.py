"""Core benchmarks: image decoding, embedding throughput, vector search, store save/load.

Prints a table and writes JSON (bench/results/core.json). The machines are shared and noisy, so
the numbers that matter are ratios measured in the same run (draft vs full decode, batched vs
one-by-one embedding), not absolute seconds.

    .venv/bin/python bench/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

from lookalike.core.embedding import load_embedder
from lookalike.core.images import ImageLimits, decode_image
from lookalike.core.store import Collection
from lookalike.core.weights import EFFICIENTNET_LITE0_SPEC, convert_efficientnet_lite0


def best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_decode(repeat: int) -> dict:
    """A 12-megapixel JPEG decoded in full vs in Pillow draft mode for a 224-px model."""
    photo = Image.fromarray(skdata.astronaut()).resize((4000, 3000), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    raw = buffer.getvalue()
    limits = ImageLimits()
    full = best_of(lambda: decode_image(raw, limits), repeat)
    draft = best_of(lambda: decode_image(raw, limits, draft_size=224), repeat)
    size = decode_image(raw, limits, draft_size=224).size
    return {"full_s": full, "draft_s": draft, "speedup": full / draft, "draft_size": size}


def bench_embed(weights: Path, n_images: int, repeat: int) -> dict:
    """Images per second by batch size (1 = one by one; the CPU default is 8)."""
    base = Image.fromarray(skdata.chelsea())
    images = [base.rotate(i * 3) for i in range(n_images)]
    per_batch = {}
    for batch_size in (1, 8, 32):
        embedder = load_embedder(
            EFFICIENTNET_LITE0_SPEC,
            weights=str(weights),
            cache_dir=weights.parent,
            batch_size=batch_size,
        )
        embedder.embed_images(images[:2])  # warm-up
        per_batch[batch_size] = n_images / best_of(
            lambda e=embedder: e.embed_images(images), repeat
        )
    return {
        "model": EFFICIENTNET_LITE0_SPEC,
        "device": embedder.device,
        "images": n_images,
        "img_per_s_by_batch": per_batch,
        "batch8_vs_single": per_batch[8] / per_batch[1],
        "batch8_vs_batch32": per_batch[8] / per_batch[32],
    }


def bench_search(sizes: list[int], dim: int, queries: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        collection = Collection(Path("bench"), "bench", dim)
        start = time.perf_counter()
        collection.upsert(np.arange(n), vectors)
        upsert_s = time.perf_counter() - start
        latencies = []
        for q in vectors[:queries]:
            start = time.perf_counter()
            collection.search(q, k=20, exclude=range(100))
            latencies.append(time.perf_counter() - start)
        # Half the collection excluded (labeled tasks): filtered inside FAISS.
        half = np.arange(0, n, 2)
        excluded_latencies = []
        for q in vectors[1 : queries + 1]:
            start = time.perf_counter()
            collection.search(q, k=20, exclude=half)
            excluded_latencies.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            collection.path = Path(tmp) / "bench.lookalike"
            save_s = best_of(collection.save, 1)
            path = collection.path
            load_s = best_of(lambda path=path: Collection.load(path), 1)
            file_mb = collection.path.stat().st_size / 1e6
        rows.append(
            {
                "vectors": n,
                "dim": dim,
                "upsert_s": upsert_s,
                "search_p50_ms": 1000 * statistics.median(latencies),
                "search_p95_ms": 1000 * float(np.percentile(latencies, 95)),
                "search_half_excluded_p50_ms": 1000 * statistics.median(excluded_latencies),
                "save_s": save_s,
                "load_s": load_s,
                "file_mb": file_mb,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "core.json"))
    args = parser.parse_args()
    repeat = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        weights = convert_efficientnet_lite0(Path(tmp) / "efficientnet_lite0.pth")
        results = {
            "machine": {"python": platform.python_version(), "cpu": platform.processor()},
            "decode": bench_decode(repeat),
            "embed": bench_embed(weights, 16 if args.quick else 64, 1 if args.quick else 2),
            "search": bench_search([10_000] if args.quick else [10_000, 100_000, 500_000], 512, 50),
        }
    d, e = results["decode"], results["embed"]
    print(f"{'measure':<44}{'value':>14}")
    print(f"{'decode 12 MP JPEG, full (s)':<44}{d['full_s']:>14.4f}")
    print(f"{'decode 12 MP JPEG, draft for 224 px (s)':<44}{d['draft_s']:>14.4f}")
    print(f"{'draft-mode speed-up (x)':<44}{d['speedup']:>14.1f}")
    for batch_size, rate in e["img_per_s_by_batch"].items():
        label = f"embed, batch {batch_size} (img/s, {e['device']})"
        print(f"{label:<44}{rate:>14.1f}")
    print(f"{'batch 8 vs one by one (x)':<44}{e['batch8_vs_single']:>14.2f}")
    print(f"{'batch 8 vs batch 32 (x)':<44}{e['batch8_vs_batch32']:>14.2f}")
    print(
        f"\n{'vectors':>10}{'p50 ms':>10}{'p95 ms':>10}{'½ excl ms':>10}{'upsert s':>10}"
        f"{'save s':>10}{'load s':>10}{'MB':>10}"
    )
    for row in results["search"]:
        print(
            f"{row['vectors']:>10}{row['search_p50_ms']:>10.2f}{row['search_p95_ms']:>10.2f}"
            f"{row['search_half_excluded_p50_ms']:>10.2f}{row['upsert_s']:>10.2f}{row['save_s']:>10.2f}{row['load_s']:>10.2f}"
            f"{row['file_mb']:>10.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
