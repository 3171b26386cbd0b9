"""The vector store: one FAISS collection per name, vectors keyed by integer id.

A collection lives in a single file, `<data_dir>/collections/<name>.lookalike`, holding the
serialized FAISS index and a JSON header (model spec, dimension, per-id payloads). Saving
writes a temporary file, fsyncs it and `os.replace`s it over the old one, so a crash mid-save
leaves the previous version loadable and readers never see half a file.

The search engine is `vector_index.VectorIndex`: exact below `IndexPlan.exact_limit` vectors,
an 8-bit IVF index above it, O(1) per added or removed id either way. Files of format 1 (an
exact `IndexIDMap2`) are migrated when loaded.
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

from lookalike.core.vector_index import IdBitmap, IndexPlan, VectorIndex
from lookalike.errors import ConflictError

FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)  # format 1: an IndexIDMap2 over IndexFlatIP, migrated on load
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

    def __init__(self, path: Path, model: str, dim: int, plan: IndexPlan | None = None) -> None:
        self.path = Path(path)
        self.model = model
        self.dim = int(dim)
        self.plan = plan or IndexPlan()
        self._index = VectorIndex(self.dim, self.plan)
        # Ids every search skips (a project's labeled tasks), kept current by the caller.
        self.excluded = IdBitmap()
        self.payloads: dict[int, Any] = {}
        self.meta: dict[str, Any] = {}
        self._signature: _Signature | None = None  # of the file last loaded or saved
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- persistence
    @classmethod
    def load(cls, path: Path, plan: IndexPlan | None = None) -> Collection:
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
        found = header.get("format") if isinstance(header, dict) else None
        if found not in _READABLE_FORMATS:
            raise StoreError(
                f"{path} has format {found}; this version reads {_READABLE_FORMATS}. "
                "Re-create it with `lookalike index` (delete the file first)."
            )
        try:
            collection = cls(path, header["model"], header["dim"], plan)
            if found == 1:
                collection._index = _migrated(faiss.deserialize_index(index_bytes), collection.plan)
            else:
                collection._index = VectorIndex.from_bytes(index_bytes, collection.plan)
            if collection._index.dim != collection.dim:
                raise ValueError(
                    f"index holds {collection._index.dim}-d vectors, header says {collection.dim}"
                )
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
            index_bytes = self._index.to_bytes()
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
        return len(self._index)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def ids(self) -> np.ndarray:
        return self._index.ids()

    @property
    def index_kind(self) -> str:
        return self._index.kind

    def needs_rebuild(self) -> bool:
        return self._index.needs_rebuild()

    def rebuild(self) -> bool:
        """Re-choose and re-train the index for the current size (searches go on meanwhile)."""
        return self._index.rebuild()

    def train(self, sample: np.ndarray, expected: int) -> None:
        """Before a bulk load into an empty collection: see VectorIndex.train."""
        self._index.train(_as_vectors(sample, self.dim), expected)

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
            self._index.upsert(id_array[keep], array[keep])
            if payloads is not None:
                for position in keep.tolist():
                    self.payloads[int(id_array[position])] = payloads[position]

    def remove(self, ids: Iterable[int]) -> int:
        id_array = _as_ids(ids)
        with self._lock:
            removed = self._index.remove(id_array)
            for key in id_array.tolist():
                self.payloads.pop(key, None)
        return removed

    def get(self, item_id: int) -> np.ndarray:
        return self.get_many([int(item_id)])[0]

    def get_many(self, ids: Sequence[int]) -> np.ndarray:
        return self._index.get_many(_as_ids(ids))

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
        extra = _as_ids(exclude)
        if len(self) == 0 or k <= 0:
            return []
        # Filtered inside FAISS: no over-fetching however many ids are excluded (every
        # labeled task is, and that can be most of a project).
        scores, labels = self._index.search(vector[0], k, self.excluded, extra)
        hits: list[Hit] = []
        for score, label in zip(scores.tolist(), labels.tolist(), strict=True):
            if label < 0:
                continue
            if min_score is not None and score < min_score:
                break
            hits.append(Hit(int(label), float(score)))
        return hits


def _migrated(old: faiss.Index, plan: IndexPlan) -> VectorIndex:
    """A format-1 index (IndexIDMap2 over a flat index) moved into the current engine."""
    ids = faiss.vector_to_array(old.id_map).astype(np.int64)
    index = VectorIndex(old.d, plan)
    if len(ids):
        index.upsert(ids, old.index.reconstruct_n(0, old.ntotal))  # inner order = id_map order
    if index.needs_rebuild():
        index.rebuild()
    return index


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise StoreError(
            f"collection name {name!r} must be 1-128 letters, digits, '.', '_' or '-'"
        )
    return name


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

    def __init__(self, root: Path | str, plan: IndexPlan | None = None) -> None:
        self.root = Path(root)
        self.plan = plan or IndexPlan()
        self._cache: dict[str, Collection] = {}
        self._lock = threading.Lock()

    def path_for(self, name: str) -> Path:
        return self.root / f"{validate_name(name)}{SUFFIX}"

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
                    collection = Collection.load(path, self.plan)
                except FileNotFoundError:
                    if model is None or dim is None:
                        raise StoreError(
                            f"no collection {name!r} under {self.root}; index something first"
                        ) from None
                    collection = Collection(path, model, dim, self.plan)
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
