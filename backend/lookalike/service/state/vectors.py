"""A project's vectors, stored compactly by task id, and their change log (a stream).

Each vector is 8-bit: a float32 scale and one int8 per dimension (516 bytes at 512-d instead
of 2 KB of float32; the cosine error is about 1e-4). Vectors sit in fixed-width slots of
string "buckets" of about 128 KB (`SETRANGE` writes one slot in O(1), with no per-entry
overhead), and a bitmap says which task ids hold one (`SETBIT`/`BITCOUNT`). A hash entry per
vector cost about 2.6 KB in Redis; a slot costs about 520 bytes.

Vectors keyed by task id make indexing idempotent: a retried or duplicated job overwrites,
never duplicates. Every change is appended to the stream in the same transaction, so a web
process keeps its in-memory index current by reading only what changed since it last looked.
The stream also carries labeling changes (`label`, `labels`), the other thing a search filters
by. Collections written by older versions (a hash of float32 vectors) are still read; every
write moves the vectors it touches to the compact form.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import redis

from lookalike.service.state.base import Pipeline, Structure, as_ids, project_key

CHANGES_MAXLEN = 200_000  # web processes further behind than this rebuild from the store
_BUCKET_BYTES = (1 << 17) - 32  # one 128 KiB allocation with room for the string's header
_SCALE = np.dtype("<f4")


class ChangeLogTrimmedError(LookupError):
    """Entries after the reader's position were trimmed away: rebuild from the store."""


def encode(vectors: np.ndarray) -> np.ndarray:
    """Rows of (float32 scale, int8 codes) as bytes: v ~= codes * scale."""
    vectors = np.asarray(vectors, dtype=np.float32)
    scale = np.abs(vectors).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8)
    out = np.empty((len(vectors), _SCALE.itemsize + vectors.shape[1]), dtype=np.uint8)
    out[:, : _SCALE.itemsize] = scale.astype(_SCALE).view(np.uint8).reshape(-1, _SCALE.itemsize)
    out[:, _SCALE.itemsize :] = codes.view(np.uint8)
    return out


def decode(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.uint8).reshape(len(rows), -1)
    scale = rows[:, : _SCALE.itemsize].copy().view(_SCALE)[:, 0]
    vectors = rows[:, _SCALE.itemsize :].view(np.int8).astype(np.float32) * scale[:, None]
    # Stored vectors are unit length; rounding moved them off it by ~1e-3 (more at low
    # dimension): back onto the sphere, so scores stay cosines in [-1, 1].
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class VectorLog(Structure):
    name = "vectors"  # the hash older versions wrote; read until every vector is rewritten
    engine = "redis"  # where the vectors are, recorded with the project (see ProjectState)

    def __init__(self, connection: redis.Redis, project: int) -> None:
        super().__init__(connection, project)
        self._changes = project_key(project, "changes")
        self._present = project_key(project, "vectors:present")
        self._dim = project_key(project, "vectors:dim")
        self._dim_cache: int | None = None

    # ------------------------------------------------------------------ layout
    def _bucket_key(self, bucket: int) -> str:
        return project_key(self.project, f"vectors:{bucket}")

    @staticmethod
    def _layout(dim: int) -> tuple[int, int]:
        """(bytes per slot, slots per bucket) for `dim`-d vectors."""
        width = dim + _SCALE.itemsize
        return width, _BUCKET_BYTES // width

    def dim(self) -> int | None:
        if self._dim_cache is None:
            raw = self._redis.get(self._dim)
            self._dim_cache = int(raw) if raw else None
        return self._dim_cache

    # ------------------------------------------------------------------ writes
    def put(self, ids: list[int], vectors: np.ndarray, pipeline: Pipeline) -> None:
        """Store vectors by task id, inside the caller's transaction."""
        rows = encode(vectors)
        dim = rows.shape[1] - _SCALE.itemsize
        # (one model per project: ProjectMeta.claim_model refuses another dimension first)
        pipeline.set(self._dim, dim)
        self._dim_cache = dim
        width, slots = self._layout(dim)
        sized: set[int] = set()
        for task_id, row in zip(ids, rows, strict=True):
            bucket, slot = divmod(int(task_id), slots)
            key = self._bucket_key(bucket)
            if bucket not in sized:
                # Size a new bucket once, to the full 128 KiB, instead of letting SETRANGE
                # grow it (Redis doubles a growing string: up to 2x the memory).
                pipeline.setrange(key, slots * width, b"\0")
                sized.add(bucket)
            pipeline.setrange(key, slot * width, row.tobytes())
            pipeline.setbit(self._present, int(task_id), 1)
        pipeline.hdel(self._key, *ids)  # the old form of the same vectors, if any
        self.note("upsert", ids, pipeline)

    def remove(self, ids: list[int], pipeline: Pipeline) -> None:
        for task_id in ids:
            pipeline.setbit(self._present, int(task_id), 0)
        pipeline.hdel(self._key, *ids)
        self.note("remove", ids, pipeline)

    def reset(self, pipeline: Pipeline) -> None:
        """Forget every vector: readers see a `reset` and start over."""
        self._delete_vectors(pipeline)
        self.note("reset", [], pipeline)

    def note(self, op: str, ids: list[int], pipeline: Pipeline) -> None:
        """Append a change for readers (also used for labeling changes)."""
        fields = {"op": op, "ids": ",".join(map(str, ids))}
        pipeline.xadd(self._changes, fields, maxlen=CHANGES_MAXLEN, approximate=True)

    # Hooks the Milvus engine uses (`service.vector_db.MilvusVectors`); here the change log
    # already carries everything.
    def labeled_changed(self, ids: list[int]) -> None:
        pass

    def labels_replaced(self) -> None:
        pass

    def ping(self) -> None:
        pass

    def _delete_vectors(self, pipeline: Pipeline) -> None:
        dim = self.dim()
        keys = [self._key, self._present, self._dim]
        if dim is not None:
            _, slots = self._layout(dim)
            keys += [self._bucket_key(b) for b in np.unique(self._present_ids() // slots)]
        pipeline.delete(*keys)
        self._dim_cache = None

    def delete(self, pipeline: Pipeline | None = None) -> None:
        """Drop vectors and log (a deleted project), leaving a `reset` for readers."""
        pipe = pipeline if pipeline is not None else self._redis.pipeline()
        self._delete_vectors(pipe)
        pipe.delete(self._changes)
        pipe.xadd(self._changes, {"op": "reset", "ids": ""}, maxlen=CHANGES_MAXLEN)
        if pipeline is None:
            pipe.execute()

    # ------------------------------------------------------------------ reads
    def _present_ids(self) -> np.ndarray:
        raw = self._redis.get(self._present) or b""
        return np.flatnonzero(np.unpackbits(np.frombuffer(raw, dtype=np.uint8))).astype(np.int64)

    def ids(self) -> set[int]:
        legacy = {int(i) for i in self._redis.hkeys(self._key)}
        return set(self._present_ids().tolist()) | legacy

    def count(self, pipeline: Pipeline | None = None) -> int:
        """Vectors stored (one command; a pipeline gets one result)."""
        # Compact and legacy entries never overlap: every write removes the legacy one.
        script = "return redis.call('BITCOUNT', KEYS[1]) + redis.call('HLEN', KEYS[2])"
        return self._conn(pipeline).eval(script, 2, self._present, self._key)

    def get(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        ids = as_ids(ids)
        if not ids:
            return {}
        dim = self.dim()
        found: dict[int, np.ndarray] = {}
        if dim is not None:
            width, slots = self._layout(dim)
            pipe = self._redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.getbit(self._present, task_id)
                bucket, slot = divmod(task_id, slots)
                pipe.getrange(self._bucket_key(bucket), slot * width, (slot + 1) * width - 1)
            replies = pipe.execute()
            held = [(i, raw) for i, bit, raw in zip(ids, replies[::2], replies[1::2], strict=True)
                    if bit and len(raw) == width]
            if held:
                rows = np.frombuffer(b"".join(raw for _, raw in held), np.uint8).reshape(-1, width)
                found = dict(zip([i for i, _ in held], decode(rows), strict=True))
        rest = [i for i in ids if i not in found]
        if rest:
            raw = self._redis.hmget(self._key, [str(i) for i in rest])
            found.update(
                {i: np.frombuffer(v, dtype=np.float32) for i, v in zip(rest, raw, strict=True) if v}
            )
        return found

    def iter_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored vector as (ids, float32 vectors) batches, one bucket at a time."""
        dim = self.dim()
        if dim is not None:
            width, slots = self._layout(dim)
            present = self._present_ids()
            buckets = present // slots
            for bucket in np.unique(buckets).tolist():
                raw = self._redis.get(self._bucket_key(bucket)) or b""
                ids = present[buckets == bucket]
                data = np.frombuffer(raw, dtype=np.uint8)
                offsets = (ids - bucket * slots) * width
                ok = offsets + width <= len(data)
                rows = data[offsets[ok, None] + np.arange(width)]
                yield ids[ok], decode(rows)
        legacy_ids: list[int] = []
        legacy: list[np.ndarray] = []
        for key, value in self._redis.hscan_iter(self._key, count=2000):
            legacy_ids.append(int(key))
            legacy.append(np.frombuffer(value, dtype=np.float32))
        if legacy_ids:
            yield np.array(legacy_ids, dtype=np.int64), np.stack(legacy)

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


def gather(batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """`iter_batches()` (of either engine) as one (ids, vectors) pair; empty arrays if none."""
    parts = list(batches)
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    return np.concatenate([ids for ids, _ in parts]), np.concatenate([v for _, v in parts])


def _stream_id_lt(a: str, b: str) -> bool:
    a_ms, _, a_seq = a.partition("-")
    b_ms, _, b_seq = b.partition("-")
    return (int(a_ms), int(a_seq or 0)) < (int(b_ms), int(b_seq or 0))
