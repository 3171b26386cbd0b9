"""Tasks that could not be indexed, with their reason: what index-status shows the user."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass

from lookalike.service.state.base import Pipeline, Structure, as_ids


@dataclass(frozen=True)
class Failure:
    task_id: int
    reason: str
    attempts: int
    final: bool
    at: float


class Failures(Structure):
    name = "failures"

    def record(self, task_id: int, reason: str, attempts: int, final: bool) -> None:
        failure = {"reason": reason, "attempts": attempts, "final": final, "at": time.time()}
        self._redis.hset(self._key, str(int(task_id)), json.dumps(failure))

    def clear(self, task_ids: Iterable[int], pipeline: Pipeline | None = None) -> None:
        ids = as_ids(task_ids)
        if ids:
            self._conn(pipeline).hdel(self._key, *ids)

    def all(self) -> list[Failure]:
        out = []
        for key, value in self._redis.hgetall(self._key).items():
            data = json.loads(value)
            out.append(
                Failure(int(key), data["reason"], data["attempts"], data["final"], data["at"])
            )
        return sorted(out, key=lambda f: f.task_id)
