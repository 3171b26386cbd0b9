"""Search a collection by image, crop, text, existing id(s) or a raw vector.

Queries become one L2-normalised vector; the store returns ids with cosine scores, best first.
The embedder is only built when a query needs it (id and vector queries do not).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lookalike.core.embedding import Embedder
from lookalike.core.images import DEFAULT_LIMITS, Box, ImageLimits, crop, load_image
from lookalike.core.store import Collection, Hit
from lookalike.errors import BadRequestError

ImageSource = bytes | str | os.PathLike[str]


class QueryError(BadRequestError):
    """The query itself is unusable (unknown id, empty text, no query given, ...)."""


# ---------------------------------------------------------------- the one query-embedding path
def query_draft_size(
    input_size: int, box: Box | None = None, box_unit: str = "px"
) -> int | tuple[int, int] | None:
    """What to ask the decoder for so that the image the embedder sees keeps full quality.

    No box: `input_size` on the shorter side. A percent box: enough pixels that the crop still
    has `input_size` on each side (a 10 % box needs the image at 10x). A pixel box: no draft,
    since its coordinates refer to the full-resolution image.
    """
    if box is None:
        return input_size
    if box_unit != "%":
        return None
    x, y, w, h = (float(v) for v in box)
    visible_w = min(x + w, 100.0) - max(x, 0.0)  # the part of the box inside the image
    visible_h = min(y + h, 100.0) - max(y, 0.0)
    if visible_w <= 0 or visible_h <= 0:
        return None  # `crop` reports the empty box
    # +1: the crop rounds its edges to whole pixels and may lose one.
    return (
        math.ceil((input_size + 1) * 100.0 / visible_w),
        math.ceil((input_size + 1) * 100.0 / visible_h),
    )


def image_query_vector(
    embedder: Embedder,
    source: ImageSource,
    limits: ImageLimits = DEFAULT_LIMITS,
    box: Box | None = None,
    box_unit: str = "px",
) -> np.ndarray:
    """The vector of an image (bytes, a path or an http(s) URL), or of a box on it.

    `box` is (x, y, width, height) in pixels (`box_unit="px"`) or percent (`"%"`). JPEGs are
    decoded at a reduced scale whenever that leaves the embedder as many pixels as it uses.
    """
    draft = query_draft_size(embedder.input_size, box, box_unit)
    image = load_image(source, limits, draft_size=draft)
    if box is not None:
        image = crop(image, box, box_unit)
    return embedder.embed_images([image])[0]


def text_query_vector(embedder: Embedder, text: str) -> np.ndarray:
    """The vector of a text query (CLIP models); `QueryError` if the text is empty."""
    return embedder.embed_text([_query_text(text)])[0]


def _query_text(text: str) -> str:
    if not text or not text.strip():
        raise QueryError("text query is empty")
    return text.strip()


def normalise(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise QueryError("query vector is zero or not finite")
    return vector / norm


# Rocchio's relevance feedback (Manning et al., "Introduction to Information Retrieval", 9.1.1):
# the query moves towards the examples marked relevant and away from those marked "not this".
ROCCHIO_ALPHA, ROCCHIO_BETA, ROCCHIO_GAMMA = 1.0, 0.75, 0.25


def feedback_vector(
    query: np.ndarray | None, positives: np.ndarray, negatives: np.ndarray
) -> np.ndarray:
    """alpha*q + beta*mean(positives) - gamma*mean(negatives), unit length.

    Without a query vector, the positives' mean is the query (alpha and beta both apply to it:
    "more like these" has no other anchor)."""
    parts = []
    if query is not None:
        parts.append(ROCCHIO_ALPHA * normalise(query))
    if len(positives):
        weight = ROCCHIO_BETA if query is not None else ROCCHIO_ALPHA
        parts.append(weight * normalise(np.mean(_unit_rows(positives), axis=0)))
    if not parts:
        raise QueryError("relevance feedback needs a query or at least one positive example")
    vector = np.sum(parts, axis=0)
    if len(negatives):
        vector = vector - ROCCHIO_GAMMA * normalise(np.mean(_unit_rows(negatives), axis=0))
    return normalise(vector)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    rows = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


@dataclass
class SearchOptions:
    k: int = 20
    exclude: Iterable[int] = field(default_factory=tuple)
    min_score: float | None = None


class Searcher:
    """Turns queries into vectors and searches one collection with them."""

    def __init__(
        self,
        collection: Collection,
        embedder: Embedder | Callable[[], Embedder],
        limits: ImageLimits = DEFAULT_LIMITS,
    ) -> None:
        self.collection = collection
        self._embedder = embedder
        self.limits = limits

    @property
    def embedder(self) -> Embedder:
        if callable(self._embedder) and not hasattr(self._embedder, "embed_images"):
            self._embedder = self._embedder()
        embedder = self._embedder
        self.collection.check_model(embedder.spec, embedder.dim)
        return embedder

    # ------------------------------------------------------------ query vectors
    def image_vector(
        self, source: ImageSource, box: Box | None = None, box_unit: str = "px"
    ) -> np.ndarray:
        return image_query_vector(self.embedder, source, self.limits, box, box_unit)

    def text_vector(self, text: str) -> np.ndarray:
        _query_text(text)  # an empty query fails before the model is built
        return text_query_vector(self.embedder, text)

    def ids_vector(self, ids: Sequence[int]) -> np.ndarray:
        if not ids:
            raise QueryError("no ids given")
        missing = [i for i in ids if i not in self.collection]
        if missing:
            raise QueryError(f"ids not in the index: {missing[:10]}")
        return normalise(self.collection.get_many(list(ids)).mean(axis=0))

    # ------------------------------------------------------------ searches
    def by_vector(self, vector: np.ndarray, options: SearchOptions | None = None) -> list[Hit]:
        options = options or SearchOptions()
        vector = normalise(vector)
        if vector.shape[0] != self.collection.dim:
            raise QueryError(
                f"query vector has {vector.shape[0]} dimensions, the index {self.collection.dim}"
            )
        return self.collection.search(vector, options.k, options.exclude, options.min_score)

    def by_image(
        self,
        source: ImageSource,
        options: SearchOptions | None = None,
        box: Box | None = None,
        box_unit: str = "px",
    ) -> list[Hit]:
        return self.by_vector(self.image_vector(source, box, box_unit), options)

    def by_text(self, text: str, options: SearchOptions | None = None) -> list[Hit]:
        return self.by_vector(self.text_vector(text), options)

    def by_ids(self, ids: Sequence[int], options: SearchOptions | None = None) -> list[Hit]:
        """More like these (their mean); the query ids themselves are excluded."""
        options = options or SearchOptions()
        ids = [int(i) for i in ids]
        exclude = set(options.exclude) | set(ids)
        return self.by_vector(
            self.ids_vector(ids), SearchOptions(options.k, exclude, options.min_score)
        )

    def by_id(self, item_id: int, options: SearchOptions | None = None) -> list[Hit]:
        return self.by_ids([item_id], options)
