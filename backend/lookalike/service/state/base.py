"""What every per-project Redis structure shares: its key naming and the optional pipeline.

Each structure is one small class that owns its key (private), in the style of RQ's
`registry.py`: writes accept `pipeline=` so a caller can make several of them one transaction.
"""

from __future__ import annotations

from typing import TypeAlias

import redis

Pipeline: TypeAlias = redis.client.Pipeline
Connection: TypeAlias = "redis.Redis | Pipeline"

KEY_PREFIX = "lookalike:project"


def project_key(project: int, name: str) -> str:
    return f"{KEY_PREFIX}:{int(project)}:{name}"


def project_of_key(key: bytes | str) -> int:
    """The project id in a key made by `project_key`."""
    text = key.decode() if isinstance(key, bytes) else key
    return int(text.split(":")[2])


class Structure:
    """One Redis key of one project."""

    name = ""  # the key's last part; subclasses set it (or pass `name=`)

    def __init__(self, connection: redis.Redis, project: int, name: str | None = None) -> None:
        self._redis = connection
        self.project = int(project)
        self._key = project_key(project, name or self.name)

    def _conn(self, pipeline: Pipeline | None) -> Connection:
        return pipeline if pipeline is not None else self._redis

    def delete(self, pipeline: Pipeline | None = None) -> None:
        self._conn(pipeline).delete(self._key)

    def exists(self) -> bool:
        return bool(self._redis.exists(self._key))


def as_ids(ids: object) -> list[int]:
    return [int(i) for i in ids]  # type: ignore[attr-defined]
