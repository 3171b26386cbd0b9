"""The vector store: one FAISS collection per name, vectors keyed by integer id.

A collection lives in a single file, `<data_dir>/collections/<name>.lookalike`, holding the
serialized FAISS index and a JSON header (model spec, dimension, per-id payloads). Saving
writes a temporary file, fsyncs it and `os.replace`s it over the old one, so a crash mid-save
leaves the previous version loadable and readers never see half a file.

The index type is private to this module: today an exact inner-product `IndexFlatIP` wrapped
in `IndexIDMap2` (vectors are L2-normalised, so inner product is cosine similarity).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lookalike.errors import ConflictError

FORMAT_VERSION = 1
SUFFIX = ".lookalike"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StoreError(ConflictError):
    """The store cannot do what was asked (bad name, corrupt file, ...)."""


class ModelMismatchError(StoreError):
    """Vectors from a different model (or dimension) than the collection was built with."""


@dataclass(frozen=True)
class Hit:
    id: int
    score: float


# What identifies one saved version of a collection file. `save` replaces the file with a new
# one, so the inode changes on every save even where mtime is coarse (1 s on some filesystems,
# a clock tick on older kernels) and two saves land in the same tick.
_Signature = tuple[int, int, int, int]


def _signature(stat: os.stat_result) -> _Signature:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _as_ids(ids: Iterable[int]) -> np.ndarray:
    return np.ascontiguousarray(np.fromiter((int(i) for i in ids), dtype=np.int64))


def _as_vectors(vectors: np.ndarray, dim: int) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ModelMismatchError(
            f"vectors have shape {array.shape}, but this collection holds {dim}-d vectors"
        )
    return array


class Collection:
    """Vectors keyed by int64 id, with an optional JSON payload per id.

    Not safe for concurrent writers: callers keep one writer per collection (the CLI is one
    process; the backend's workers hold a Redis lock per project).
    """

    def __init__(self, path: Path, model: str, dim: int) -> None:
        self.path = Path(path)
        self.model = model
        self.dim = int(dim)
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._id_set: set[int] = set()  # mirrors the index's ids, for O(1) membership
        self.payloads: dict[int, Any] = {}
        self.meta: dict[str, Any] = {}
        self._signature: _Signature | None = None  # of the file last loaded or saved
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- persistence
    @classmethod
    def load(cls, path: Path) -> Collection:
        try:
            # Stat the open file, not the path: a save landing between reading and stat-ing
            # would otherwise pair the old content with the new file's signature, and this
            # copy would never be seen as stale.
            with open(path, "rb") as handle:
                signature = _signature(os.fstat(handle.fileno()))
                with np.load(handle, allow_pickle=False) as archive:
                    header = json.loads(bytes(archive["header"]).decode("utf-8"))
                    index_bytes = archive["index"]
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise StoreError(f"{path} is not a readable Lookalike collection: {exc}") from exc
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            found = header.get("format") if isinstance(header, dict) else None
            raise StoreError(f"{path} has format {found}, expected {FORMAT_VERSION}")
        try:
            collection = cls(path, header["model"], header["dim"])
            index = faiss.deserialize_index(index_bytes)
            if index.d != collection.dim:
                raise ValueError(f"index holds {index.d}-d vectors, header says {collection.dim}")
            collection._index = index
            collection._id_set = set(collection.ids().tolist())
            collection.payloads = {int(k): v for k, v in header.get("payloads", {}).items()}
        except Exception as exc:
            raise StoreError(f"{path} is not a readable Lookalike collection: {exc}") from exc
        collection.meta = header.get("meta", {})
        collection._signature = signature
        return collection

    def save(self) -> None:
        """Write atomically: temp file in the same directory, fsync, rename over the old one."""
        with self._lock:
            header = {
                "format": FORMAT_VERSION,
                "model": self.model,
                "dim": self.dim,
                "payloads": {str(k): v for k, v in self.payloads.items()},
                "meta": self.meta,
            }
            header_bytes = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
            index_bytes = faiss.serialize_index(self._index)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                prefix=self.path.name, suffix=".tmp", dir=self.path.parent
            )
            try:
                # mkstemp makes the file 0600; give it the usual umask-based mode instead.
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(fd, 0o666 & ~umask)
                with os.fdopen(fd, "wb") as handle:
                    np.savez(handle, header=header_bytes, index=index_bytes)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp_name, self.path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
            _fsync_dir(self.path.parent)
            self._signature = _signature(os.stat(self.path))

    def is_stale(self) -> bool:
        """True when the file on disk is not the one this object last loaded or saved."""
        try:
            return _signature(os.stat(self.path)) != self._signature
        except FileNotFoundError:
            return self._signature is not None

    # ----------------------------------------------------------------- reads and writes
    def check_model(self, model: str, dim: int | None = None) -> None:
        if model != self.model or (dim is not None and int(dim) != self.dim):
            raise ModelMismatchError(
                f"collection {self.path.stem!r} was built with {self.model} ({self.dim}-d); "
                f"it cannot take vectors from {model}"
                + (f" ({dim}-d)" if dim is not None else "")
                + ". Reindex it with the new model (delete it, or use a new collection name)."
            )

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, int | np.integer) and int(item_id) in self._id_set

    def ids(self) -> np.ndarray:
        with self._lock:
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def upsert(
        self,
        ids: Iterable[int],
        vectors: np.ndarray,
        payloads: Sequence[Any] | None = None,
    ) -> None:
        """Insert or replace vectors by id (payloads aligned with ids); the last one wins."""
        id_array = _as_ids(ids)
        array = _as_vectors(vectors, self.dim)
        if len(id_array) != len(array) or (payloads is not None and len(payloads) != len(array)):
            raise StoreError(f"{len(id_array)} ids, {len(array)} vectors: counts must match")
        # Keep only the last occurrence of an id repeated within one call.
        _, last_reversed = np.unique(id_array[::-1], return_index=True)
        keep = np.sort(len(id_array) - 1 - last_reversed)
        with self._lock:
            # remove_ids scans the whole index (O(N)); only pay it for ids really being
            # replaced, so adding a new task stays O(1) however large the collection is.
            present = self._present(id_array)
            if len(present):
                self._index.remove_ids(present)
            self._index.add_with_ids(array[keep], id_array[keep])
            self._id_set.update(id_array.tolist())
            if payloads is not None:
                for position in keep.tolist():
                    self.payloads[int(id_array[position])] = payloads[position]

    def remove(self, ids: Iterable[int]) -> int:
        id_array = _as_ids(ids)
        with self._lock:
            present = self._present(id_array)
            # Skip the O(N) scan when none of the ids is here (e.g. a replayed removal).
            removed = int(self._index.remove_ids(present)) if len(present) else 0
            for key in id_array.tolist():
                self._id_set.discard(key)
                self.payloads.pop(key, None)
        return removed

    def _present(self, id_array: np.ndarray) -> np.ndarray:
        """The ids of `id_array` that this collection holds (O(len(id_array)))."""
        return np.fromiter(
            (i for i in dict.fromkeys(id_array.tolist()) if i in self._id_set), dtype=np.int64
        )

    def get(self, item_id: int) -> np.ndarray:
        with self._lock:
            if int(item_id) not in self._id_set:
                raise KeyError(item_id)
            return self._index.reconstruct(int(item_id))

    def get_many(self, ids: Sequence[int]) -> np.ndarray:
        if len(ids) == 0:
            return np.empty((0, self.dim), np.float32)
        return np.stack([self.get(i) for i in ids])

    def search(
        self,
        query: np.ndarray,
        k: int = 20,
        exclude: Iterable[int] = (),
        min_score: float | None = None,
    ) -> list[Hit]:
        """Top-k ids by cosine score for one query vector, best first."""
        vector = _as_vectors(query, self.dim)
        if len(vector) != 1:
            raise StoreError("search takes exactly one query vector")
        excluded = {int(i) for i in exclude}
        with self._lock:
            total = len(self)
            if total == 0 or k <= 0:
                return []
            params = None
            if excluded:
                # Filtered inside FAISS: no over-fetching however many tasks are excluded
                # (every labeled task is, and that can be most of a project).
                batch = faiss.IDSelectorBatch(np.fromiter(excluded, dtype=np.int64))
                params = faiss.SearchParameters(sel=faiss.IDSelectorNot(batch))
            scores, labels = self._index.search(vector, min(total, k), params=params)
        hits: list[Hit] = []
        for score, label in zip(scores[0].tolist(), labels[0].tolist(), strict=True):
            if label < 0 or label in excluded:
                continue
            if min_score is not None and score < min_score:
                break
            hits.append(Hit(int(label), float(score)))
            if len(hits) == k:
                break
        return hits


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class VectorStore:
    """Named collections under one directory, with reload-on-change for readers."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._cache: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def path_for(self, name: str) -> Path:
        if not _NAME_RE.match(name):
            raise StoreError(
                f"collection name {name!r} must be 1-128 letters, digits, '.', '_' or '-'"
            )
        return self.root / f"{name}{SUFFIX}"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}"))

    def exists(self, name: str) -> bool:
        return self.path_for(name).is_file()

    def open(self, name: str, model: str | None = None, dim: int | None = None) -> Collection:
        """Open a collection, creating it if `model` and `dim` are given and it does not exist.

        A cached collection is reloaded when another process has replaced the file since.
        With `model`, an existing collection built by another model raises ModelMismatchError.
        """
        path = self.path_for(name)
        with self._lock:
            collection = self._cache.get(name)
            if collection is None or collection.is_stale():
                try:
                    collection = Collection.load(path)
                except FileNotFoundError:
                    if model is None or dim is None:
                        raise StoreError(
                            f"no collection {name!r} under {self.root}; index something first"
                        ) from None
                    collection = Collection(path, model, dim)
                self._cache[name] = collection
        if model is not None:
            collection.check_model(model, dim)
        return collection

    def drop(self, name: str) -> bool:
        with self._lock:
            self._cache.pop(name, None)
        path = self.path_for(name)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed
