"""A collection of vectors keyed by int64 id in a Milvus server (or `milvus-lite server`).

The same contract as `store.Collection` where the two meet (`check_model`, `in`, `get`,
`get_many`, `search`, `upsert`, `remove`), plus a `labeled` flag per vector that searches
filter on inside Milvus (a filter expression, not over-fetching). Milvus holds the vectors:
the process keeps nothing but the collection's model and dimension.

Index: HNSW (M=16, efConstruction=200) on inner product over unit vectors (= cosine), searched
with ef = max(EF_MIN, 4k): recall@20 0.997 at 100k and 0.989 at 1M vectors with half of them
filtered out (`bench/bench_milvus_params.py`). Consistency level Strong: a vector upserted by a
worker a moment ago is seen by the next search in any process.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np

from lookalike.core.store import Hit, ModelMismatchError
from lookalike.errors import BadRequestError, UnavailableError

ID, VECTOR, LABELED, PAYLOAD = "task_id", "vector", "labeled", "payload"
PAYLOAD_MAX_CHARS = 8192  # a CLI collection's per-file JSON (path, size, mtime)
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
EF_MIN = 128
CONSISTENCY = "Strong"
_MODEL_PROPERTY, _DIM_PROPERTY = "lookalike.model", "lookalike.dim"
_READ_BATCH = 10_000  # ids per query / iterator page (Milvus caps a query at 16,384)
_WRITE_BATCH = 2_000  # vectors per upsert (well under gRPC's 64 MB message limit)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")

T = TypeVar("T")


class VectorDBError(BadRequestError):
    """The vector database setting is unusable (a bad URI, pymilvus missing)."""


class VectorDBUnavailableError(UnavailableError):
    """The vector database cannot be reached (or failed): retry when it is back."""


@dataclass(frozen=True)
class MilvusTarget:
    """Where the Milvus server is, from `LOOKALIKE_VECTOR_DB` and its token."""

    uri: str  # what pymilvus connects to: http(s)://host:port
    db_name: str
    token: str
    shown: str  # the URI without credentials, for messages

    @classmethod
    def parse(cls, value: str, token: str = "") -> MilvusTarget:
        """`milvus://host:port[/db]`, `milvus+tls://host:port[/db]` (TLS), or pymilvus's own
        `http://` / `https://`. Credentials come from the token, never the URI."""
        parts = urlsplit(value.strip())
        schemes = {"milvus": "http", "http": "http", "milvus+tls": "https", "https": "https"}
        if parts.scheme not in schemes or not parts.hostname:
            raise VectorDBError(
                f"LOOKALIKE_VECTOR_DB={value!r}: expected milvus://host:port (or "
                "milvus+tls://host:port for TLS, optionally /database), or empty for the "
                "embedded engine"
            )
        if parts.username or parts.password:
            raise VectorDBError(
                "LOOKALIKE_VECTOR_DB must not carry credentials: put them in "
                "LOOKALIKE_VECTOR_DB_TOKEN (user:password or an API key)"
            )
        try:
            port = parts.port or 19530
        except ValueError as exc:
            raise VectorDBError(f"LOOKALIKE_VECTOR_DB={value!r}: {exc}") from None
        db_name = parts.path.strip("/") or "default"
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        uri = f"{schemes[parts.scheme]}://{host}:{port}"
        return cls(uri, db_name, token, f"{parts.scheme}://{host}:{port}/{db_name}")


def connect(target: MilvusTarget, timeout: float) -> Any:
    """A pymilvus client; VectorDBUnavailableError if the server does not answer."""
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        raise VectorDBError(
            "LOOKALIKE_VECTOR_DB is set but pymilvus is not installed: "
            "pip install 'lookalike[milvus]'"
        ) from exc
    # pymilvus logs a traceback per failed call (one per second in an outage); ours carry
    # the reason once, where the user sees it.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    return _guarded(
        target.shown,
        lambda: MilvusClient(
            uri=target.uri, token=target.token, db_name=target.db_name, timeout=timeout
        ),
    )


def lazy_client(target: MilvusTarget, timeout: float = 10.0) -> Callable[[], Any]:
    """A factory that connects on first use and then returns the same client (thread-safe);
    a failed connection is tried again on the next call."""
    lock = threading.Lock()
    client: list[Any] = []

    def get() -> Any:
        with lock:
            if not client:
                client.append(connect(target, timeout))
            return client[0]

    return get


def _guarded(where: str, call: Callable[[], T]) -> T:
    """Run a pymilvus call; its failures become one clear error naming the server."""
    from pymilvus.exceptions import MilvusException

    try:
        return call()
    except MilvusException as exc:
        reason = getattr(exc, "message", "") or str(exc)
        raise VectorDBUnavailableError(
            f"the vector database at {where} failed or is unreachable ({reason}); "
            "searches and indexing resume when it answers again"
        ) from None


def collection_names(client_factory: Callable[[], Any], where: str,
                     timeout: float = 10.0) -> list[str]:
    """Every collection name in the database (also the cheapest "is it there?")."""
    client = _guarded(where, client_factory)
    return list(_guarded(where, lambda: client.list_collections(timeout=timeout)))


class _NotLoaded(Exception):
    """The collection exists but is not loaded into memory (searches need it loaded)."""


def _raw(call: Callable[[], T]) -> T:
    from pymilvus.exceptions import MilvusException

    try:
        return call()
    except MilvusException as exc:
        text = (getattr(exc, "message", "") or str(exc)).lower()
        if "not loaded" in text or "released" in text or "call load" in text:
            raise _NotLoaded() from exc
        raise


class MilvusCollection:
    """One Milvus collection: int64 `task_id` primary key, float vector, `labeled` flag."""

    def __init__(self, client_factory: Callable[[], Any], where: str, name: str,
                 timeout: float = 10.0) -> None:
        if not _NAME_RE.match(name):
            raise VectorDBError(f"{name!r} is not a valid Milvus collection name")
        self._client_factory = client_factory
        self.where = where
        self.name = name
        self.timeout = timeout
        self._shape: tuple[str, int] | None = None  # (model, dim) once known to exist

    # ------------------------------------------------------------------ plumbing
    def _call(self, method: str, **kwargs: Any) -> Any:
        client = _guarded(self.where, self._client_factory)

        def call() -> Any:
            return getattr(client, method)(collection_name=self.name, timeout=self.timeout,
                                           **kwargs)

        try:
            return _guarded(self.where, lambda: _raw(call))
        except _NotLoaded:
            # A restarted server (or an operator) released the collection: load it again.
            _guarded(self.where, lambda: client.load_collection(self.name,
                                                                timeout=self.timeout))
            return _guarded(self.where, call)

    def ping(self) -> None:
        collection_names(self._client_factory, self.where, self.timeout)

    def shape(self) -> tuple[str, int] | None:
        """(model spec, dimension) the collection was created with; None if it does not exist."""
        if self._shape is None:
            if not self._call("has_collection"):
                return None
            properties = self._call("describe_collection").get("properties") or {}
            self._shape = (
                str(properties.get(_MODEL_PROPERTY, "")),
                int(properties.get(_DIM_PROPERTY, 0)),
            )
        return self._shape

    @property
    def dim(self) -> int:
        shape = self.shape()
        return shape[1] if shape else 0

    def check_model(self, model: str, dim: int | None = None) -> None:
        shape = self.shape()
        if shape is None:
            return
        if shape[0] != model or (dim is not None and shape[1] != dim):
            raise ModelMismatchError(
                f"Milvus collection {self.name} holds vectors of {shape[0]} ({shape[1]}-d), "
                f"not {model}: reindex the project to change models"
            )

    def create(self, model: str, dim: int, payloads: bool = False) -> None:
        """Create the collection for `model` (a stale one of another model is dropped);
        `payloads`: with a JSON text field per vector (CLI collections)."""
        shape = self.shape()
        if shape == (model, dim):
            return
        if shape is not None:
            self.drop()
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field(LABELED, DataType.BOOL)
        if payloads:
            schema.add_field(PAYLOAD, DataType.VARCHAR, max_length=PAYLOAD_MAX_CHARS)
        index = MilvusClient.prepare_index_params()
        index.add_index(
            field_name=VECTOR, index_type="HNSW", metric_type="IP",
            params={"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION},
        )
        self._call(
            "create_collection", schema=schema, index_params=index,
            consistency_level=CONSISTENCY,
            properties={_MODEL_PROPERTY: model, _DIM_PROPERTY: str(int(dim))},
        )
        self._shape = (model, int(dim))

    def drop(self) -> None:
        self._call("drop_collection")
        self._shape = None

    # ------------------------------------------------------------------ writes
    def upsert(self, ids: Sequence[int], vectors: np.ndarray, labeled: Sequence[bool],
               payloads: Sequence[str] | None = None) -> None:
        """Insert or replace by id: a retried batch never duplicates."""
        vectors = np.asarray(vectors, dtype=np.float32)
        for start in range(0, len(ids), _WRITE_BATCH):
            stop = start + _WRITE_BATCH
            rows = [
                {ID: int(i), VECTOR: v.tolist(), LABELED: bool(flag)}
                for i, v, flag in zip(ids[start:stop], vectors[start:stop], labeled[start:stop],
                                      strict=True)
            ]
            if payloads is not None:
                for row, payload in zip(rows, payloads[start:stop], strict=True):
                    row[PAYLOAD] = payload
            self._call("upsert", data=rows)

    def set_labeled(self, ids: Iterable[int], labeled: bool) -> None:
        """Flag the stored vectors among `ids` (ids with no vector are left alone)."""
        present = sorted(self.present(ids))
        for start in range(0, len(present), _WRITE_BATCH):
            rows = [{ID: i, LABELED: labeled} for i in present[start : start + _WRITE_BATCH]]
            self._call("upsert", data=rows, partial_update=True)

    def remove(self, ids: Iterable[int]) -> None:
        ids = [int(i) for i in ids]
        if ids and self.shape() is not None:
            for start in range(0, len(ids), _READ_BATCH):
                self._call("delete", ids=ids[start : start + _READ_BATCH])

    # ------------------------------------------------------------------ reads
    def count(self) -> int:
        if self.shape() is None:
            return 0
        rows = self._call("query", filter="", output_fields=["count(*)"],
                          consistency_level=CONSISTENCY)
        return int(rows[0]["count(*)"])

    def present(self, ids: Iterable[int]) -> set[int]:
        ids = sorted({int(i) for i in ids})
        if not ids or self.shape() is None:
            return set()
        found: set[int] = set()
        for start in range(0, len(ids), _READ_BATCH):
            chunk = ids[start : start + _READ_BATCH]
            rows = self._call("query", filter=f"{ID} in {chunk}", output_fields=[ID],
                              consistency_level=CONSISTENCY)
            found.update(int(row[ID]) for row in rows)
        return found

    def ids(self, filter: str = "") -> set[int]:
        return {int(i) for batch, _ in self.iter_batches(filter, vectors=False) for i in batch}

    def labeled_ids(self) -> set[int]:
        return self.ids(f"{LABELED} == true")

    def iter_batches(
        self, filter: str = "", vectors: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored (ids, vectors) in pages (vectors empty when not asked for)."""
        for rows in self._pages(filter, [ID, VECTOR] if vectors else [ID]):
            ids = np.fromiter((r[ID] for r in rows), dtype=np.int64, count=len(rows))
            data = (np.asarray([r[VECTOR] for r in rows], dtype=np.float32) if vectors
                    else np.empty((len(rows), 0), dtype=np.float32))
            yield ids, data

    def payloads(self) -> dict[int, str]:
        """Every id's payload text (CLI collections)."""
        return {int(r[ID]): str(r.get(PAYLOAD) or "")
                for rows in self._pages("", [ID, PAYLOAD]) for r in rows}

    def _pages(self, filter: str, fields: list[str]) -> Iterator[list[dict[str, Any]]]:
        """Every matching row's `fields`, a page at a time (nothing if no collection)."""
        if self.shape() is None:
            return
        iterator = self._call("query_iterator", batch_size=_READ_BATCH, filter=filter,
                              output_fields=fields, consistency_level=CONSISTENCY)
        try:
            while rows := _guarded(self.where, iterator.next):
                yield rows
        finally:
            iterator.close()

    def get_vectors(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        ids = sorted({int(i) for i in ids})
        if not ids or self.shape() is None:
            return {}
        found: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), _READ_BATCH):
            rows = self._call("get", ids=ids[start : start + _READ_BATCH],
                              output_fields=[ID, VECTOR])
            found.update({int(r[ID]): np.asarray(r[VECTOR], dtype=np.float32) for r in rows})
        return found

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, int | np.integer) and bool(self.present([int(item_id)]))

    def get(self, item_id: int) -> np.ndarray:
        found = self.get_vectors([item_id])
        if int(item_id) not in found:
            raise KeyError(item_id)
        return found[int(item_id)]

    def get_many(self, ids: Sequence[int]) -> np.ndarray:
        found = self.get_vectors(ids)
        if not len(ids):
            return np.empty((0, self.dim), dtype=np.float32)
        return np.stack([found[int(i)] for i in ids])

    def search(
        self, vector: np.ndarray, k: int, exclude: Iterable[int] = ()
    ) -> list[Hit]:
        """The k nearest unlabeled vectors, skipping `exclude`, best first."""
        if k <= 0 or self.shape() is None:
            return []
        excluded = sorted({int(i) for i in exclude})
        expression = f"{LABELED} == false"
        if excluded:
            expression += f" and {ID} not in {excluded}"
        result = self._call(
            "search", data=[np.asarray(vector, dtype=np.float32).ravel().tolist()],
            anns_field=VECTOR, limit=int(k), filter=expression, output_fields=[ID],
            search_params={"metric_type": "IP", "params": {"ef": max(EF_MIN, 4 * int(k))}},
            consistency_level=CONSISTENCY,
        )
        return [Hit(int(hit[ID]), float(hit["distance"])) for hit in result[0]]
