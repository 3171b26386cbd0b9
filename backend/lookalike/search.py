"""Search a collection by image, crop, text, existing id(s) or a raw vector.

Queries become one L2-normalised vector; the store returns ids with cosine scores, best first.
The embedder is only built when a query needs it (id and vector queries do not).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from lookalike.embedding import Embedder
from lookalike.images import DEFAULT_LIMITS, Box, ImageLimits, crop, load_image
from lookalike.store import Collection, Hit

ImageSource = bytes | str | os.PathLike[str]


class QueryError(ValueError):
    """The query itself is unusable (unknown id, empty text, no query given, ...)."""


def normalise(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise QueryError("query vector is zero or not finite")
    return vector / norm


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
    def image_vector(self, source: ImageSource, box: Box | None = None, box_unit: str = "px"):
        embedder = self.embedder
        # Draft decoding changes pixel sizes, so only use it when no pixel box must line up.
        draft = embedder.input_size if box is None or box_unit == "%" else None
        image = load_image(source, self.limits, draft_size=draft)
        if box is not None:
            image = crop(image, box, box_unit)
        return embedder.embed_images([image])[0]

    def text_vector(self, text: str) -> np.ndarray:
        if not text or not text.strip():
            raise QueryError("text query is empty")
        return self.embedder.embed_text([text.strip()])[0]

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
