"""The CLI's named collections (`lookalike index` / `search` / `collections`) in Milvus, when
LOOKALIKE_VECTOR_DB is set: the same contract as `store.VectorStore` and `store.Collection`
where the CLI and `folder_index` use them. Each file's payload (path, size, mtime) is a JSON text
field of its vector, so a rerun embeds only new or changed files, as with collection files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from lookalike.core.milvus_collection import MilvusCollection, collection_names
from lookalike.core.store import Hit, StoreError, _as_vectors, validate_name

PREFIX = "lookalike_cli_"


def _encode(name: str) -> str:
    """A CLI name (letters, digits, '.', '_', '-') as a Milvus name (letters, digits, '_')."""
    return PREFIX + name.replace("_", "__").replace(".", "_d").replace("-", "_h")


def _decode(milvus_name: str) -> str:
    out, text, i = [], milvus_name[len(PREFIX):], 0
    while i < len(text):
        if text[i] == "_" and i + 1 < len(text):
            out.append({"_": "_", "d": ".", "h": "-"}.get(text[i + 1], "?"))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class MilvusFolderCollection:
    """A CLI collection in Milvus; `payloads` are read once when it is opened."""

    def __init__(self, collection: MilvusCollection, model: str, dim: int) -> None:
        self._collection = collection
        self.model, self.dim = model, int(dim)
        self.payloads: dict[int, Any] = {
            i: json.loads(text) for i, text in collection.payloads().items() if text
        }
        self.meta: dict[str, Any] = {}

    def check_model(self, model: str, dim: int | None = None) -> None:
        self._collection.check_model(model, dim)

    def __len__(self) -> int:
        return self._collection.count()

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._collection

    def ids(self) -> np.ndarray:
        return np.fromiter(sorted(self._collection.ids()), dtype=np.int64)

    def upsert(self, ids: Iterable[int], vectors: np.ndarray,
               payloads: Sequence[Any] | None = None) -> None:
        ids = [int(i) for i in ids]
        array = _as_vectors(vectors, self.dim)
        texts = [json.dumps(p) for p in payloads] if payloads is not None else [""] * len(ids)
        self._collection.upsert(ids, array, [False] * len(ids), texts)
        if payloads is not None:
            self.payloads.update(zip(ids, payloads, strict=True))

    def remove(self, ids: Iterable[int]) -> int:
        ids = [int(i) for i in ids]
        present = self._collection.present(ids)
        self._collection.remove(present)
        for item in ids:
            self.payloads.pop(item, None)
        return len(present)

    def get(self, item_id: int) -> np.ndarray:
        return self._collection.get(item_id)

    def get_many(self, ids: Sequence[int]) -> np.ndarray:
        return self._collection.get_many(ids)

    def search(self, query: np.ndarray, k: int = 20, exclude: Iterable[int] = (),
               min_score: float | None = None) -> list[Hit]:
        hits = self._collection.search(_as_vectors(query, self.dim)[0], k, exclude)
        return [h for h in hits if min_score is None or h.score >= min_score]

    # Milvus maintains its own index and persists every write: nothing to do here.
    def needs_rebuild(self) -> bool:
        return False

    def rebuild(self) -> bool:
        return False

    def save(self) -> None:
        pass


class MilvusStore:
    """Named CLI collections in one Milvus database (collections `lookalike_cli_<name>`)."""

    def __init__(self, client_factory: Callable[[], Any], where: str,
                 timeout: float = 10.0) -> None:
        self._client_factory = client_factory
        self.root = where  # shown in messages where VectorStore shows its directory
        self.timeout = timeout

    def _collection(self, name: str) -> MilvusCollection:
        validate_name(name)
        return MilvusCollection(self._client_factory, self.root, _encode(name), self.timeout)

    def names(self) -> list[str]:
        names = collection_names(self._client_factory, self.root, self.timeout)
        return sorted(_decode(n) for n in names if n.startswith(PREFIX))

    def exists(self, name: str) -> bool:
        return self._collection(name).shape() is not None

    def open(self, name: str, model: str | None = None,
             dim: int | None = None) -> MilvusFolderCollection:
        collection = self._collection(name)
        shape = collection.shape()
        if shape is None:
            if model is None or dim is None:
                raise StoreError(f"no collection {name!r} in {self.root}; index something first")
            collection.create(model, dim, payloads=True)
            shape = (model, int(dim))
        if model is not None:
            collection.check_model(model, dim)
        return MilvusFolderCollection(collection, *shape)

    def drop(self, name: str) -> bool:
        collection = self._collection(name)
        existed = collection.shape() is not None
        if existed:
            collection.drop()
        return existed
