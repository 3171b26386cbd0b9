"""What a task's interactive queries left behind: the last few replies (the short history the
annotator sees under "Lookalike says"; Label Studio shows only the latest prediction's text),
and the matches of the latest query (so a `label: NAME` prompt can suggest NAME for them)."""

from __future__ import annotations

import json

from redis.exceptions import WatchError

from lookalike.core.store import Hit
from lookalike.service.state.base import Structure

REPLIES_KEPT = 5


class Replies(Structure):
    name = "replies"

    def add(self, task_id: int, message: str) -> list[str]:
        """Record `message` for the task; returns the task's replies, newest first."""
        field = str(int(task_id))
        with self._redis.pipeline(transaction=True) as pipe:
            # WATCH/MULTI: two annotators querying the same task never drop each other's reply.
            while True:
                try:
                    pipe.watch(self._key)
                    current = pipe.hget(self._key, field)
                    replies = [message, *(json.loads(current) if current else [])][:REPLIES_KEPT]
                    pipe.multi()
                    pipe.hset(self._key, field, json.dumps(replies))
                    pipe.execute()
                    return replies
                except WatchError:
                    continue

    def get(self, task_id: int) -> list[str]:
        current = self._redis.hget(self._key, str(int(task_id)))
        return json.loads(current) if current else []


class LatestMatches(Structure):
    """Per task: the tab and the matches its latest interactive query queued."""

    name = "latest_matches"

    def set(self, task_id: int, title: str, hits: list[Hit]) -> None:
        entry = {"title": title, "matches": [[int(h.id), float(h.score)] for h in hits]}
        self._redis.hset(self._key, str(int(task_id)), json.dumps(entry))

    def get(self, task_id: int) -> tuple[str, list[Hit]] | None:
        current = self._redis.hget(self._key, str(int(task_id)))
        if not current:
            return None
        entry = json.loads(current)
        return entry["title"], [Hit(int(i), float(s)) for i, s in entry["matches"]]
