"""Find similar tasks in a project and queue them: the one place the HTTP app and jobs call.

Queries: a task (its stored vector), a box on a task's image (a crop, embedded now), a text
prompt, an uploaded image or URL. Results exclude the query task and labeled tasks.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from lookalike.config import Settings
from lookalike.embedding import Embedder, embedder_from_settings
from lookalike.images import ImageLimits, crop, decode_image, load_image
from lookalike.ls_client import LabelStudioClient, LabelStudioError, image_field
from lookalike.project_index import ProjectIndexes
from lookalike.queueing import QueueResult, queue_matches
from lookalike.search import QueryError, Searcher, SearchOptions
from lookalike.state import ProjectState
from lookalike.store import Hit

log = logging.getLogger(__name__)


@dataclass
class SimilarQuery:
    """What to search by: exactly one of task_id / text / image / url (box with task or image)."""

    task_id: int | None = None
    text: str | None = None
    image: bytes | None = None
    url: str | None = None
    box: tuple[float, float, float, float] | None = None  # x, y, w, h in percent

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SimilarQuery:
        given = [k for k in ("task_id", "text", "image", "url") if body.get(k) not in (None, "")]
        if len(given) != 1:
            raise QueryError("give exactly one of task_id, text, image (base64) or url")
        image = None
        if body.get("image"):
            raw = str(body["image"])
            try:
                image = base64.b64decode(raw.split(",", 1)[-1], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise QueryError("image must be base64 (optionally a data: URI)") from exc
        box = body.get("box")
        if box is not None:
            if isinstance(box, dict):
                box = [box.get(k) for k in ("x", "y", "width", "height")]
            try:
                box = tuple(float(v) for v in box)
            except (TypeError, ValueError):
                box = ()
            if len(box) != 4:
                raise QueryError("box is {x, y, width, height} in percent of the image")
        for name in ("text", "url"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise QueryError(f"{name} must be a string")
        url = body.get("url")
        if url and not str(url).lower().startswith(("http://", "https://")):
            # Never a path: this API must not read the server's own files.
            raise QueryError("url must be an http(s) URL")
        task_id = body.get("task_id")
        if task_id is not None and not str(task_id).isdigit():
            raise QueryError("task_id must be an integer")
        return cls(
            task_id=int(task_id) if task_id is not None else None,
            text=body.get("text"),
            image=image,
            url=body.get("url"),
            box=box,  # type: ignore[arg-type]
        )

    def title(self) -> str:
        if self.text:
            return f"Text: {self.text.strip()[:60]}"
        if self.task_id is not None:
            return f"Similar to #{self.task_id}" + (" (box)" if self.box else "")
        if self.url:
            return f"Similar to {self.url.rsplit('/', 1)[-1][:40]}"
        return "Similar to uploaded image"


class SimilarityService:
    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        observe_embed: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.observe_embed = observe_embed
        self.redis = redis_client
        self.indexes = ProjectIndexes(redis_client)
        self.limits = ImageLimits.from_settings(settings)
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()
        self._ls: LabelStudioClient | None = None

    @property
    def ls(self) -> LabelStudioClient:
        if self._ls is None:
            self._ls = LabelStudioClient(
                self.settings.label_studio_url, self.settings.label_studio_api_key
            )
        return self._ls

    def warm_up(self) -> None:
        """Load the model in the background, so the first crop or text query is fast while
        /health and /setup answer at once; a failure is logged and retried on first use."""

        def load() -> None:
            try:
                self.embedder()
            except Exception as exc:  # reported again, to the user, on the first query
                log.error("could not load the model %s: %s", self.settings.model, exc)

        threading.Thread(target=load, name="model-warm-up", daemon=True).start()

    def embedder(self) -> Embedder:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = embedder_from_settings(self.settings)
            return self._embedder

    def state(self, project: int) -> ProjectState:
        return ProjectState(self.redis, project)

    def task_image(self, project: int, task: dict[str, Any]):
        state = self.state(project)
        key = state.meta().get("image_key")
        if not key:
            _, key = image_field(self.ls.project(project)["label_config"])
        raw = self.ls.task_image_bytes(
            task, key, self.limits, self.settings.data_dir / "task-files" / str(project)
        )
        return decode_image(raw, self.limits, name=f"task {task.get('id')} image")

    def query_vector(
        self, project: int, query: SimilarQuery, task: dict | None = None
    ) -> np.ndarray:
        collection = self.indexes.get(project)
        searcher = Searcher(collection, self.embedder, self.limits)
        if query.text:
            return self._timed(lambda: searcher.text_vector(query.text))
        if query.image is not None or query.url:
            source = query.image if query.image is not None else query.url
            image = load_image(source, self.limits)  # type: ignore[arg-type]
            if query.box:
                image = crop(image, query.box, "%")
            return self._embed_one(image)
        assert query.task_id is not None
        if query.box and not _covers_whole_image(query.box):
            task = task or self._task(project, query.task_id)
            image = crop(self.task_image(project, task), query.box, "%")
            return self._embed_one(image)
        if query.task_id in collection:
            return collection.get(query.task_id)
        # Not indexed yet (just imported): embed it now rather than fail the annotator.
        task = task or self._task(project, query.task_id)
        return self._embed_one(self.task_image(project, task))

    def _task(self, project: int, task_id: int) -> dict[str, Any]:
        try:
            task = self.ls.task(task_id)
        except LabelStudioError as exc:
            if "HTTP 404" in str(exc):
                raise QueryError(f"task {task_id} does not exist") from exc
            raise
        if int(task.get("project") or project) != project:
            raise QueryError(f"task {task_id} is not in project {project}")
        return task

    def _embed_one(self, image) -> np.ndarray:
        return self._timed(lambda: self.embedder().embed_images([image])[0])

    def _timed(self, compute: Callable[[], np.ndarray]) -> np.ndarray:
        start = time.perf_counter()
        vector = compute()
        if self.observe_embed is not None:
            self.observe_embed(time.perf_counter() - start)
        return vector

    def find(
        self, project: int, query: SimilarQuery, k: int | None = None, task: dict | None = None
    ) -> list[Hit]:
        collection = self.indexes.get(project)
        searcher = Searcher(collection, self.embedder, self.limits)
        exclude = self.state(project).labeled_ids()
        if query.task_id is not None:
            exclude.add(query.task_id)
        vector = self.query_vector(project, query, task)
        return searcher.by_vector(
            vector, SearchOptions(k=k or self.settings.similar_k, exclude=exclude)
        )

    def find_and_queue(
        self, project: int, query: SimilarQuery, k: int | None = None, task: dict | None = None
    ) -> tuple[list[Hit], QueueResult]:
        hits = self.find(project, query, k, task)
        result = queue_matches(self.settings, self.state(project), self.ls, hits, query.title())
        return hits, result


def _covers_whole_image(box: tuple[float, float, float, float]) -> bool:
    x, y, w, h = box
    return x <= 1 and y <= 1 and x + w >= 99 and y + h >= 99
