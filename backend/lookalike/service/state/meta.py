"""A project's metadata hash: its model claim, image field, label-config hash, last error."""

from __future__ import annotations

from typing import Any

from lookalike.errors import ConflictError
from lookalike.service.state.base import Pipeline, Structure


class ModelConflictError(ConflictError):
    """The project was indexed with another model: its vectors cannot be mixed."""


class ProjectMeta(Structure):
    name = "meta"

    def get(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self._redis.hgetall(self._key).items()}

    def update(self, pipeline: Pipeline | None = None, **values: Any) -> None:
        self._conn(pipeline).hset(self._key, mapping={k: str(v) for k, v in values.items()})

    def remove(self, *fields: str, pipeline: Pipeline | None = None) -> None:
        self._conn(pipeline).hdel(self._key, *fields)

    def claim_model(self, model: str, dim: int) -> None:
        """Record the model on first use; refuse vectors from any other model afterwards."""
        pipe = self._redis.pipeline(transaction=True)  # model and dim are claimed together
        pipe.hsetnx(self._key, "model", model)
        pipe.hsetnx(self._key, "dim", str(dim))
        pipe.execute()
        meta = self.get()
        if meta["model"] == model and int(meta["dim"]) == dim and "error" in meta:
            self.remove("error")
        if meta["model"] != model or int(meta["dim"]) != dim:
            raise ModelConflictError(
                f"project {self.project} was indexed with {meta['model']} ({meta['dim']}-d), "
                f"this process runs {model} ({dim}-d); reindex the project "
                f"(POST /api/projects/{self.project}/reindex) to switch models"
            )

    def forget_model(self, pipeline: Pipeline | None = None) -> None:
        self.remove("model", "dim", pipeline=pipeline)
