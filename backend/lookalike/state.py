"""Per-project state in Redis: the vectors, task sets, failures and priorities.

Redis is the only thing workers and web processes share (besides Label Studio), so workers can
run on other machines with no shared volume. Vectors live in a hash keyed by task id, which
makes indexing idempotent per task: a retried or duplicated job overwrites, never duplicates.
Every vector change is also appended to a stream, so a web process can keep its in-memory FAISS
index current by reading only what changed since it last looked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

CHANGES_MAXLEN = 200_000  # web processes further behind than this rebuild from the hash


def _key(project: int, name: str) -> str:
    return f"lookalike:project:{int(project)}:{name}"


class ModelConflictError(RuntimeError):
    """The project was indexed with another model: its vectors cannot be mixed."""


@dataclass(frozen=True)
class Failure:
    task_id: int
    reason: str
    attempts: int
    final: bool
    at: float


class ProjectState:
    def __init__(self, redis_client: redis.Redis, project: int) -> None:
        self.r = redis_client
        self.project = int(project)
        self.k_meta = _key(project, "meta")  # hash: model, dim, label_config, image_field, ...
        self.k_tasks = _key(project, "tasks")  # set: every task id Label Studio has
        self.k_labeled = _key(project, "labeled")  # set: task ids with annotations
        self.k_vectors = _key(project, "vectors")  # hash: task id -> float32 bytes
        self.k_changes = _key(project, "changes")  # stream: op=upsert|remove|reset, ids
        self.k_failures = _key(project, "failures")  # hash: task id -> json Failure
        self.k_predictions = _key(project, "predictions")  # hash: task id -> prediction id
        self.k_priority = _key(project, "priority")  # hash: task id -> priority score
        self.k_labels = _key(project, "annotation_labels")  # hash: annotation id -> json labels
        self.k_views = _key(project, "views")  # hash: tab title -> view id
        self.k_queued = _key(project, "queued")  # zset: task id -> when its index job was queued
        self.k_sync_lock = _key(project, "sync-lock")
        self.k_priority_lock = _key(project, "priority-lock")

    # ------------------------------------------------------------------ meta
    def meta(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.k_meta).items()}

    def set_meta(self, **values: Any) -> None:
        self.r.hset(self.k_meta, mapping={k: str(v) for k, v in values.items()})

    def claim_model(self, model: str, dim: int) -> None:
        """Record the model on first use; refuse vectors from any other model afterwards."""
        pipe = self.r.pipeline(transaction=True)  # model and dim are claimed together
        pipe.hsetnx(self.k_meta, "model", model)
        pipe.hsetnx(self.k_meta, "dim", str(dim))
        pipe.execute()
        meta = self.meta()
        if meta["model"] == model and int(meta["dim"]) == dim and "error" in meta:
            self.r.hdel(self.k_meta, "error")
        if meta["model"] != model or int(meta["dim"]) != dim:
            raise ModelConflictError(
                f"project {self.project} was indexed with {meta['model']} ({meta['dim']}-d), "
                f"this process runs {model} ({dim}-d); reindex the project "
                f"(POST /api/projects/{self.project}/reindex) to switch models"
            )

    # ------------------------------------------------------------------ tasks
    def set_tasks(self, task_ids: Iterable[int], labeled: Iterable[int]) -> None:
        """Replace the known task sets with a fresh listing (a resync)."""
        ids = [int(i) for i in task_ids]
        done = [int(i) for i in labeled]
        pipe = self.r.pipeline()
        pipe.delete(self.k_tasks, self.k_labeled)
        for start in range(0, len(ids), 10_000):
            pipe.sadd(self.k_tasks, *ids[start : start + 10_000])
        for start in range(0, len(done), 10_000):
            pipe.sadd(self.k_labeled, *done[start : start + 10_000])
        pipe.execute()

    def add_tasks(self, task_ids: Iterable[int]) -> None:
        ids = [int(i) for i in task_ids]
        if ids:
            self.r.sadd(self.k_tasks, *ids)

    def task_ids(self) -> set[int]:
        return {int(i) for i in self.r.smembers(self.k_tasks)}

    def mark_labeled(self, task_ids: Iterable[int]) -> None:
        """Labeled tasks leave every search, and their priority goes with them."""
        ids = [int(i) for i in task_ids]
        if ids:
            self.r.sadd(self.k_labeled, *ids)
            self.r.hdel(self.k_priority, *ids)

    def labeled_ids(self) -> set[int]:
        return {int(i) for i in self.r.smembers(self.k_labeled)}

    # ------------------------------------------------------------------ vectors
    def mark_queued(self, task_ids: Iterable[int]) -> None:
        now = time.time()
        mapping = {str(int(i)): now for i in task_ids}
        if mapping:
            self.r.zadd(self.k_queued, mapping)

    def unmark_queued(self, task_ids: Iterable[int]) -> None:
        ids = [int(i) for i in task_ids]
        if ids:
            self.r.zrem(self.k_queued, *ids)

    def recently_queued(self, max_age: float = 3600.0) -> set[int]:
        """Tasks whose index job was queued in the last `max_age` seconds (older: presumed lost,
        e.g. a worker died, so a resync queues them again)."""
        since = time.time() - max_age
        return {int(i) for i in self.r.zrangebyscore(self.k_queued, since, "+inf")}

    def is_task(self, task_id: int) -> bool:
        return bool(self.r.sismember(self.k_tasks, int(task_id)))

    def put_vectors(
        self, ids: Iterable[int], vectors: np.ndarray, only_known: bool = False
    ) -> None:
        """Store vectors by task id (overwriting), in one transaction with a change entry.

        `only_known` drops ids no longer in the task set (deleted while being embedded)."""
        ids = [int(i) for i in ids]
        if only_known and ids:
            known = self.r.smismember(self.k_tasks, ids)
            keep = [n for n, present in enumerate(known) if present]
            ids, vectors = [ids[n] for n in keep], np.asarray(vectors)[keep]
        if not ids:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(
            self.k_vectors, mapping={str(i): v.tobytes() for i, v in zip(ids, vectors, strict=True)}
        )
        pipe.hdel(self.k_failures, *ids)
        self._log_change(pipe, "upsert", ids)
        pipe.execute()

    def _log_change(self, pipe: redis.client.Pipeline, op: str, ids: list[int]) -> None:
        """Append to the change stream, inside the caller's transaction."""
        fields = {"op": op, "ids": ",".join(map(str, ids))}
        pipe.xadd(self.k_changes, fields, maxlen=CHANGES_MAXLEN, approximate=True)

    def remove_tasks(self, ids: Iterable[int]) -> None:
        ids = [int(i) for i in ids]
        if not ids:
            return
        pipe = self.r.pipeline(transaction=True)
        for key in (self.k_vectors, self.k_failures, self.k_predictions, self.k_priority):
            pipe.hdel(key, *ids)
        pipe.srem(self.k_tasks, *ids)
        pipe.srem(self.k_labeled, *ids)
        pipe.zrem(self.k_queued, *ids)
        self._log_change(pipe, "remove", ids)
        pipe.execute()

    def reset(self) -> None:
        """Forget every vector (reindex): readers see a `reset` and start over."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.k_vectors, self.k_failures)
        pipe.hdel(self.k_meta, "model", "dim")
        self._log_change(pipe, "reset", [])
        pipe.execute()

    def indexed_ids(self) -> set[int]:
        return {int(i) for i in self.r.hkeys(self.k_vectors)}

    def vectors(self, ids: Iterable[int]) -> dict[int, np.ndarray]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        raw = self.r.hmget(self.k_vectors, [str(i) for i in ids])
        return {i: np.frombuffer(v, dtype=np.float32) for i, v in zip(ids, raw, strict=True) if v}

    def iter_all_vectors(self, count: int = 2000) -> Iterator[tuple[int, np.ndarray]]:
        for key, value in self.r.hscan_iter(self.k_vectors, count=count):
            yield int(key), np.frombuffer(value, dtype=np.float32)

    def last_change_id(self) -> str:
        entries = self.r.xrevrange(self.k_changes, count=1)
        return entries[0][0].decode() if entries else "0-0"

    def changes_since(self, last_id: str, count: int = 10_000) -> list[tuple[str, str, list[int]]]:
        """(entry id, op, ids) after `last_id`; [] if none. Raises LookupError if trimmed away."""
        if last_id != "0-0":
            first = self.r.xrange(self.k_changes, count=1)
            if first and _stream_id_lt(last_id, first[0][0].decode()):
                # Entries in between may have been trimmed: the caller must rebuild.
                raise LookupError("change log trimmed")
        out = []
        for entry_id, fields in self.r.xrange(self.k_changes, min=f"({last_id}", count=count):
            ids_field = fields.get(b"ids", b"").decode()
            ids = [int(i) for i in ids_field.split(",") if i]
            out.append((entry_id.decode(), fields[b"op"].decode(), ids))
        return out

    # ------------------------------------------------------------------ failures
    def record_failure(self, task_id: int, reason: str, attempts: int, final: bool) -> None:
        failure = {"reason": reason, "attempts": attempts, "final": final, "at": time.time()}
        self.r.hset(self.k_failures, str(int(task_id)), json.dumps(failure))

    def clear_failures(self, task_ids: Iterable[int]) -> None:
        ids = [int(i) for i in task_ids]
        if ids:
            self.r.hdel(self.k_failures, *ids)

    def failures(self) -> list[Failure]:
        out = []
        for key, value in self.r.hgetall(self.k_failures).items():
            data = json.loads(value)
            out.append(
                Failure(int(key), data["reason"], data["attempts"], data["final"], data["at"])
            )
        return sorted(out, key=lambda f: f.task_id)

    # ------------------------------------------------------------------ priorities
    def prediction_ids(self, task_ids: Iterable[int]) -> dict[int, int]:
        ids = [int(i) for i in task_ids]
        if not ids:
            return {}
        raw = self.r.hmget(self.k_predictions, [str(i) for i in ids])
        return {i: int(v) for i, v in zip(ids, raw, strict=True) if v}

    def set_prediction_ids(self, mapping: dict[int, int]) -> None:
        if mapping:
            self.r.hset(self.k_predictions, mapping={str(k): v for k, v in mapping.items()})

    def priorities(self, task_ids: Iterable[int]) -> dict[int, float]:
        ids = [int(i) for i in task_ids]
        if not ids:
            return {}
        raw = self.r.hmget(self.k_priority, [str(i) for i in ids])
        return {i: float(v) for i, v in zip(ids, raw, strict=True) if v is not None}

    def set_priorities(self, mapping: dict[int, float]) -> None:
        if mapping:
            self.r.hset(self.k_priority, mapping={str(k): v for k, v in mapping.items()})

    # ------------------------------------------------------------------ labels seen
    def set_annotation_labels(self, annotation_id: int, task_id: int, labels: list[str]) -> None:
        self.r.hset(
            self.k_labels, str(annotation_id), json.dumps({"task": task_id, "labels": labels})
        )

    def remove_annotation(self, annotation_id: int) -> None:
        self.r.hdel(self.k_labels, str(annotation_id))

    def label_counts(self) -> dict[str, int]:
        """How many annotations carry each label (an annotation counts once per label)."""
        counts: dict[str, int] = {}
        for value in self.r.hvals(self.k_labels):
            for label in set(json.loads(value)["labels"]):
                counts[label] = counts.get(label, 0) + 1
        return counts

    # ------------------------------------------------------------------ views
    def view_id(self, title: str) -> int | None:
        value = self.r.hget(self.k_views, title)
        return int(value) if value else None

    def set_view_id(self, title: str, view_id: int) -> None:
        self.r.hset(self.k_views, title, str(view_id))

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        pipe = self.r.pipeline()
        pipe.scard(self.k_tasks)
        pipe.hlen(self.k_vectors)
        pipe.scard(self.k_labeled)
        total, indexed, labeled = pipe.execute()
        failures = self.failures()
        final = [f for f in failures if f.final]
        meta = self.meta()
        return {
            "project": self.project,
            "total": int(total),
            "indexed": int(indexed),
            "failed": len(final),
            "pending": max(0, int(total) - int(indexed) - len(final)),
            "retrying": len(failures) - len(final),
            "labeled": int(labeled),
            "model": meta.get("model"),
            "error": meta.get("error"),
            "last_sync": float(meta["last_sync"]) if "last_sync" in meta else None,
            "failures": [
                {"task_id": f.task_id, "reason": f.reason, "attempts": f.attempts, "final": f.final}
                for f in failures
            ],
        }

    def drop(self) -> None:
        keys = [v for k, v in vars(self).items() if k.startswith("k_")]
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*keys)
        self._log_change(pipe, "reset", [])  # web processes drop their copy of the index
        pipe.execute()


def _stream_id_lt(a: str, b: str) -> bool:
    a_ms, _, a_seq = a.partition("-")
    b_ms, _, b_seq = b.partition("-")
    return (int(a_ms), int(a_seq or 0)) < (int(b_ms), int(b_seq or 0))


def known_projects(redis_client: redis.Redis) -> list[int]:
    projects = set()
    for key in redis_client.scan_iter(match="lookalike:project:*:tasks", count=1000):
        projects.add(int(key.decode().split(":")[2]))
    return sorted(projects)
