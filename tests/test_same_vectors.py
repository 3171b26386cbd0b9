"""Workers and `lookalike index` run the one pipeline: an image gets the same vector from both,
whatever else is in its batch, and the same as a query for that image (real Redis; the worker's
images come as data URIs in the tasks, the way Label Studio can hold them)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.services import redis_server

from lookalike.config import Settings
from lookalike.core.folder_index import index_folder
from lookalike.core.query import image_query_vector
from lookalike.core.store import Collection
from lookalike.service.indexing import index_batch
from lookalike.service.runtime import Runtime

NAMES = ("chelsea", "coffee", "rocket", "astronaut", "camera", "coins")
# Vectors in Redis are 8-bit (a scale and one byte per dimension): the same vector comes back
# this close, and two different photos are far below it.
SAME = 0.9995


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, photos) -> list[Path]:
    """Large JPEGs (drafted), large PNGs (box-reduced) and a small PNG (neither)."""
    root = tmp_path_factory.mktemp("same")
    paths = []
    for i, name in enumerate(NAMES):
        image = photos[name].convert("RGB")
        if i < 4:
            image = image.resize((1800, 1200), Image.Resampling.BICUBIC)
        path = root / f"{i}-{name}.{'jpg' if i % 2 else 'png'}"
        image.save(path)
        paths.append(path)
    return paths


def data_uri(path: Path) -> str:
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("model", ["clip_random_embedder", "lite0_embedder"])
def test_worker_and_cli_store_the_same_vectors(model, request, tmp_path, redis_url, files):
    embedder = request.getfixturevalue(model)
    collection = Collection(tmp_path / "cli.lookalike", embedder.spec, embedder.dim)
    report = index_folder(collection, embedder, files)
    assert report.embedded == len(files) and not report.failed
    by_path = {payload["path"]: item for item, payload in collection.payloads.items()}
    cli = collection.get_many(np.array([by_path[str(p.resolve())] for p in files]))

    settings = Settings(redis_url=redis_url, data_dir=tmp_path, label_studio_api_key="unused")
    rt = Runtime(settings, embedder=embedder)  # data URIs: Label Studio is never called
    rt.redis.flushdb()
    tasks = [{"id": i + 1, "data": {"image": data_uri(p)}} for i, p in enumerate(files)]
    state = rt.state(1)
    state.replace_tasks([t["id"] for t in tasks], labeled=[])
    state.meta.update(image_key="image")
    # Other batches than the CLI's: reversed, in batches of two and four.
    assert index_batch(rt, 1, tasks[:1:-1])["indexed"] == 4
    assert index_batch(rt, 1, tasks[1::-1])["indexed"] == 2
    stored = state.vectors.get([t["id"] for t in tasks])
    worker = np.stack([stored[t["id"]] for t in tasks])

    assert (worker * cli).sum(1).min() > SAME
    # A query for the same file (the web process's path, a batch of one) gives the same vector.
    queries = np.stack([image_query_vector(embedder, path) for path in files])
    np.testing.assert_allclose(queries, cli, atol=1e-5)
    # The images are distinct: a tolerance that let any two vectors pass would fail here.
    assert (cli @ cli.T)[~np.eye(len(files), dtype=bool)].max() < SAME
