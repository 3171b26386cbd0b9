"""The last few replies to a task's interactive queries: the short history the annotator sees
under "Lookalike says" (Label Studio shows only the latest prediction's text)."""

from __future__ import annotations

import json

from redis.exceptions import WatchError

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
