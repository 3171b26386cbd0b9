"""A project's vectors (a hash keyed by task id) and their change log (a stream).

Vectors keyed by task id make indexing idempotent: a retried or duplicated job overwrites,
never duplicates. Every change is appended to the stream in the same transaction, so a web
process keeps its in-memory index current by reading only what changed since it last looked.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import redis

from lookalike.service.state.base import Pipeline, Structure, as_ids, project_key

CHANGES_MAXLEN = 200_000  # web processes further behind than this rebuild from the hash


class ChangeLogTrimmedError(LookupError):
    """Entries after the reader's position were trimmed away: rebuild from the hash."""


class VectorLog(Structure):
    name = "vectors"

    def __init__(self, connection: redis.Redis, project: int) -> None:
        super().__init__(connection, project)
        self._changes = project_key(project, "changes")

    # ------------------------------------------------------------------ writes
    def put(self, ids: list[int], vectors: np.ndarray, pipeline: Pipeline) -> None:
        """Store float32 vectors by task id, inside the caller's transaction."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        mapping = {str(i): v.tobytes() for i, v in zip(ids, vectors, strict=True)}
        pipeline.hset(self._key, mapping=mapping)
        self._log(pipeline, "upsert", ids)

    def remove(self, ids: list[int], pipeline: Pipeline) -> None:
        pipeline.hdel(self._key, *ids)
        self._log(pipeline, "remove", ids)

    def reset(self, pipeline: Pipeline) -> None:
        """Forget every vector: readers see a `reset` and start over."""
        pipeline.delete(self._key)
        self._log(pipeline, "reset", [])

    def _log(self, pipeline: Pipeline, op: str, ids: list[int]) -> None:
        fields = {"op": op, "ids": ",".join(map(str, ids))}
        pipeline.xadd(self._changes, fields, maxlen=CHANGES_MAXLEN, approximate=True)

    def delete(self, pipeline: Pipeline | None = None) -> None:
        """Drop vectors and log (a deleted project), leaving a `reset` for readers."""
        conn = self._conn(pipeline)
        conn.delete(self._key, self._changes)
        conn.xadd(self._changes, {"op": "reset", "ids": ""}, maxlen=CHANGES_MAXLEN)

    # ------------------------------------------------------------------ reads
    def ids(self) -> set[int]:
        return {int(i) for i in self._redis.hkeys(self._key)}

    def count(self, pipeline: Pipeline | None = None) -> int:
        return self._conn(pipeline).hlen(self._key)

    def get(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        ids = as_ids(ids)
        if not ids:
            return {}
        raw = self._redis.hmget(self._key, [str(i) for i in ids])
        return {i: np.frombuffer(v, dtype=np.float32) for i, v in zip(ids, raw, strict=True) if v}

    def iter_all(self, count: int = 2000) -> Iterator[tuple[int, np.ndarray]]:
        for key, value in self._redis.hscan_iter(self._key, count=count):
            yield int(key), np.frombuffer(value, dtype=np.float32)

    def last_change_id(self) -> str:
        entries = self._redis.xrevrange(self._changes, count=1)
        return entries[0][0].decode() if entries else "0-0"

    def changes_since(self, last_id: str, count: int = 10_000) -> list[tuple[str, str, list[int]]]:
        """(entry id, op, ids) after `last_id`; [] if none. ChangeLogTrimmedError if trimmed."""
        if last_id != "0-0":
            first = self._redis.xrange(self._changes, count=1)
            if first and _stream_id_lt(last_id, first[0][0].decode()):
                raise ChangeLogTrimmedError("change log trimmed")
        out = []
        for entry_id, fields in self._redis.xrange(self._changes, min=f"({last_id}", count=count):
            ids_field = fields.get(b"ids", b"").decode()
            ids = [int(i) for i in ids_field.split(",") if i]
            out.append((entry_id.decode(), fields[b"op"].decode(), ids))
        return out


def _stream_id_lt(a: str, b: str) -> bool:
    a_ms, _, a_seq = a.partition("-")
    b_ms, _, b_seq = b.partition("-")
    return (int(a_ms), int(a_seq or 0)) < (int(b_ms), int(b_seq or 0))
