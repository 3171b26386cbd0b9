"""Which tasks a project has, which are labeled, and which wait for an index job."""

from __future__ import annotations

import time
from collections.abc import Iterable

from lookalike.service.state.base import Pipeline, Structure, as_ids

SADD_CHUNK = 10_000  # ids per SADD, so a million-task resync is not one giant command


class TaskSet(Structure):
    """A set of task ids: every task Label Studio has ("tasks"), or the labeled ones."""

    def add(self, task_ids: Iterable[int], pipeline: Pipeline | None = None) -> None:
        ids = as_ids(task_ids)
        conn = self._conn(pipeline)
        for start in range(0, len(ids), SADD_CHUNK):
            conn.sadd(self._key, *ids[start : start + SADD_CHUNK])

    def remove(self, task_ids: Iterable[int], pipeline: Pipeline | None = None) -> None:
        ids = as_ids(task_ids)
        if ids:
            self._conn(pipeline).srem(self._key, *ids)

    def replace(self, task_ids: Iterable[int], pipeline: Pipeline) -> None:
        """Swap in a fresh listing, inside the caller's transaction."""
        pipeline.delete(self._key)
        self.add(task_ids, pipeline)

    def ids(self) -> set[int]:
        return {int(i) for i in self._redis.smembers(self._key)}

    def __contains__(self, task_id: int) -> bool:
        return bool(self._redis.sismember(self._key, int(task_id)))

    def contains_many(self, task_ids: list[int]) -> list[bool]:
        if not task_ids:
            return []
        return [bool(x) for x in self._redis.smismember(self._key, task_ids)]

    def count(self, pipeline: Pipeline | None = None) -> int:
        return self._conn(pipeline).scard(self._key)


class IndexMarks(Structure):
    """Tasks whose index job is queued, with when: a sync does not queue them twice."""

    name = "queued"

    def mark(self, task_ids: Iterable[int]) -> None:
        now = time.time()
        mapping = {str(i): now for i in as_ids(task_ids)}
        if mapping:
            self._redis.zadd(self._key, mapping)

    def unmark(self, task_ids: Iterable[int], pipeline: Pipeline | None = None) -> None:
        ids = as_ids(task_ids)
        if ids:
            self._conn(pipeline).zrem(self._key, *ids)

    def recent(self, max_age: float) -> set[int]:
        """Tasks marked in the last `max_age` seconds (older marks: the job is presumed lost,
        e.g. its worker died, so a resync queues them again)."""
        since = time.time() - max_age
        return {int(i) for i in self._redis.zrangebyscore(self._key, since, "+inf")}
