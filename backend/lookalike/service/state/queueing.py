"""What queueing remembers per project: priorities (and the predictions that carry them), the
tabs it made, and the labels annotations carry (for automatic prioritization)."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import redis

from lookalike.service.state.base import Pipeline, Structure, as_ids, project_key


class Priorities(Structure):
    """Task id -> the id of its one Lookalike prediction, and the score that prediction holds."""

    name = "priority"

    def __init__(self, connection: redis.Redis, project: int) -> None:
        super().__init__(connection, project)
        self._predictions = project_key(project, "predictions")
        self._requests = project_key(project, "requests")

    def next_request(self) -> int:
        """Number the project's queueing requests 1, 2, 3, ...: later ones are served first."""
        return int(self._redis.incr(self._requests))

    def prediction_ids(self, task_ids: Iterable[int]) -> dict[int, int]:
        return {i: int(v) for i, v in self._hmget(self._predictions, task_ids).items()}

    def scores(self, task_ids: Iterable[int]) -> dict[int, float]:
        return {i: float(v) for i, v in self._hmget(self._key, task_ids).items()}

    def set(self, task_id: int, prediction_id: int, score: float) -> None:
        """Recorded per task, so a failure halfway never leaves a duplicate prediction."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._predictions, str(int(task_id)), str(int(prediction_id)))
        pipe.hset(self._key, str(int(task_id)), repr(float(score)))
        pipe.execute()

    def set_prediction(self, task_id: int, prediction_id: int) -> None:
        """A prediction that carries no request priority (coverage mode's)."""
        self._redis.hset(self._predictions, str(int(task_id)), str(int(prediction_id)))

    def forget_scores(self, task_ids: Iterable[int], pipeline: Pipeline | None = None) -> None:
        """Labeled tasks lose their priority (the prediction itself stays in Label Studio)."""
        ids = as_ids(task_ids)
        if ids:
            self._conn(pipeline).hdel(self._key, *ids)

    def remove(self, task_ids: Iterable[int], pipeline: Pipeline | None = None) -> None:
        ids = as_ids(task_ids)
        if ids:
            conn = self._conn(pipeline)
            conn.hdel(self._key, *ids)
            conn.hdel(self._predictions, *ids)

    def delete(self, pipeline: Pipeline | None = None) -> None:
        self._conn(pipeline).delete(self._key, self._predictions, self._requests)

    def _hmget(self, key: str, task_ids: Iterable[int]) -> dict[int, bytes]:
        ids = as_ids(task_ids)
        if not ids:
            return {}
        raw = self._redis.hmget(key, [str(i) for i in ids])
        return {i: v for i, v in zip(ids, raw, strict=True) if v is not None}


class Views(Structure):
    """Tab title -> Data Manager view id, so asking again updates the same tab."""

    name = "views"

    def get(self, title: str) -> int | None:
        value = self._redis.hget(self._key, title)
        return int(value) if value else None

    def set(self, title: str, view_id: int) -> None:
        self._redis.hset(self._key, title, str(view_id))


class LabelStats(Structure):
    """Annotation id -> (task, labels): counts per label, for finding the rare ones."""

    name = "annotation_labels"

    def set(self, annotation_id: int, task_id: int, labels: list[str]) -> None:
        value = json.dumps({"task": task_id, "labels": labels})
        self._redis.hset(self._key, str(annotation_id), value)

    def remove(self, annotation_id: int) -> None:
        self._redis.hdel(self._key, str(annotation_id))

    def counts(self) -> dict[str, int]:
        """How many annotations carry each label (an annotation counts once per label)."""
        counts: dict[str, int] = {}
        for value in self._redis.hvals(self._key):
            for label in set(json.loads(value)["labels"]):
                counts[label] = counts.get(label, 0) + 1
        return counts

    def by_task(self) -> dict[int, set[str]]:
        """Task id -> every label its annotations carry (for label suggestions)."""
        out: dict[int, set[str]] = {}
        for value in self._redis.hvals(self._key):
            data = json.loads(value)
            out.setdefault(int(data["task"]), set()).update(data["labels"])
        return out


class DuplicateReport(Structure):
    """The latest near-duplicate grouping of the project (JSON), and a flag while one runs."""

    name = "duplicates"

    def get(self) -> dict | None:
        raw = self._redis.get(self._key)
        return json.loads(raw) if raw else None

    def set(self, report: dict) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._key, json.dumps(report))
        pipe.set(f"{self._key}:threshold", repr(float(report["threshold"])))
        pipe.execute()

    def threshold(self) -> float | None:
        """The threshold of the latest report (without reading the report)."""
        raw = self._redis.get(f"{self._key}:threshold")
        return float(raw) if raw else None

    def claim_run(self, threshold: float, seconds: int) -> bool:
        """Whether this caller should start a grouping at `threshold` (one at a time)."""
        return bool(self._redis.set(f"{self._key}:running:{threshold}", 1, nx=True, ex=seconds))

    def release_run(self, threshold: float) -> None:
        self._redis.delete(f"{self._key}:running:{threshold}")

    def delete(self, pipeline: Pipeline | None = None) -> None:
        self._conn(pipeline).delete(self._key, f"{self._key}:threshold")


class CoverageState(Structure):
    """Coverage mode's clusters: the centres (and the project size they were computed at), and
    the cluster each task's prediction carries."""

    name = "coverage"

    def __init__(self, connection: redis.Redis, project: int) -> None:
        super().__init__(connection, project)
        self._centroids = project_key(project, "coverage:centroids")
        self._running = project_key(project, "coverage:running")

    def centroids(self) -> tuple[np.ndarray | None, int]:
        raw = self._redis.hgetall(self._centroids)
        if not raw:
            return None, 0
        k, dim = int(raw[b"k"]), int(raw[b"dim"])
        return np.frombuffer(raw[b"data"], dtype=np.float32).reshape(k, dim), int(raw[b"n"])

    def set_centroids(self, centroids: np.ndarray, n: int) -> None:
        data = np.ascontiguousarray(centroids, dtype=np.float32)
        mapping = {"k": len(data), "dim": data.shape[1], "n": n, "data": data.tobytes()}
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._centroids, mapping=mapping)
        pipe.delete(self._key)  # new clusters: every task is written again
        pipe.execute()

    def forget_centroids(self) -> None:
        self._redis.delete(self._centroids)

    def assigned(self) -> dict[int, int]:
        return {int(t): int(c) for t, c in self._redis.hgetall(self._key).items()}

    def set_assigned(self, task_id: int, cluster: int) -> None:
        self._redis.hset(self._key, str(int(task_id)), str(int(cluster)))

    def claim_run(self, seconds: int) -> bool:
        return bool(self._redis.set(self._running, 1, nx=True, ex=seconds))

    def release_run(self) -> None:
        self._redis.delete(self._running)

    def delete(self, pipeline: Pipeline | None = None) -> None:
        self._conn(pipeline).delete(self._key, self._centroids, self._running)
