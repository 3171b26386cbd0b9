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
from PIL import Image

from lookalike.core.duplicates import one_per_group
from lookalike.core.embedding import Embedder
from lookalike.core.images import ImageLoadError, decode_image
from lookalike.core.query import (
    QueryError,
    feedback_vector,
    image_query_vector,
    normalise,
    text_query_vector,
)
from lookalike.core.safe_fetch import UrlPolicy, UrlRefusedError, fetch_public_url
from lookalike.core.store import Collection, Hit
from lookalike.core.vector_index import IndexPlan
from lookalike.errors import BusyError, ConflictError, NotFoundError
from lookalike.service.duplicates import default_threshold
from lookalike.service.indexing import image_key
from lookalike.service.ls_client import LabelStudioError, TaskImageError
from lookalike.service.project_index import ProjectIndexes
from lookalike.service.queueing import QueueResult, queue_matches
from lookalike.service.runtime import Runtime
from lookalike.service.vector_db import MilvusIndexes, MilvusProject

log = logging.getLogger(__name__)


@dataclass
class SimilarQuery:
    """What to search by: exactly one of task_id / text / image / url / task_ids (box with task
    or image), optionally refined by examples marked "not this" (`not_like`)."""

    task_id: int | None = None
    text: str | None = None
    image: bytes | None = None
    url: str | None = None
    box: tuple[float, float, float, float] | None = None  # x, y, w, h in percent
    more_like: tuple[int, ...] = ()  # positive examples (task ids)
    not_like: tuple[int, ...] = ()  # negative examples (task ids)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SimilarQuery:
        kinds = ("task_id", "text", "image", "url", "task_ids")
        given = [k for k in kinds if body.get(k) not in (None, "", [])]
        if len(given) != 1:
            raise QueryError("give exactly one of task_id, task_ids, text, image (base64) or url")
        more_like = _task_ids(body.get("task_ids"), "task_ids")
        not_like = _task_ids(body.get("not_task_ids"), "not_task_ids")
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
            more_like=more_like,
            not_like=not_like,
        )

    def title(self) -> str:
        return self._title() + (" (refined)" if self.not_like else "")

    def _title(self) -> str:
        if self.more_like:
            return "Similar to " + ", ".join(f"#{t}" for t in self.more_like[:5])
        if self.text:
            return f"Text: {self.text.strip()[:60]}"
        if self.task_id is not None:
            return f"Similar to #{self.task_id}" + (" (box)" if self.box else "")
        if self.url:
            return f"Similar to {self.url.rsplit('/', 1)[-1][:40]}"
        return "Similar to uploaded image"


MAX_EXAMPLES = 100
DIVERSE_POOL = 4  # candidates per wanted result when keeping one per near-duplicate group


def _task_ids(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > MAX_EXAMPLES
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise QueryError(f"{name} must be a list of at most {MAX_EXAMPLES} task ids")
    return tuple(dict.fromkeys(value))


class SimilarityService:
    """Searches a project's index and queues the matches; shared by the web app and jobs."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # Milvus answers searches itself; the embedded engine keeps an index per project here.
        self.indexes: ProjectIndexes | MilvusIndexes = (
            MilvusIndexes(rt.state) if rt.vector_db is not None
            else ProjectIndexes(rt.redis, rt.settings.snapshots_dir,
                                IndexPlan.from_settings(rt.settings))
        )
        self.url_policy = UrlPolicy.parse(rt.settings.url_allow)
        # Searches past this many at once are turned away (503, Retry-After) instead of
        # queueing for the server's threads: /health, /setup and /webhook always find one free.
        self.max_searches = max(1, rt.settings.max_searches)
        self._searches = threading.BoundedSemaphore(self.max_searches)
        # One query forward pass at a time: torch already uses every core for one, and
        # concurrent passes only slow each other down (and everything else in the process).
        self._forward = threading.Lock()

    def task(self, project: int, task_id: int) -> dict[str, Any]:
        """The task from Label Studio; NotFoundError if it is not in `project`."""
        try:
            task = self.rt.ls.task(task_id)
        except LabelStudioError as exc:
            if exc.status == 404:
                raise NotFoundError(f"task {task_id} does not exist") from exc
            raise
        if int(task.get("project") or project) != project:
            raise NotFoundError(f"task {task_id} is not in project {project}")
        return task

    def task_image_bytes(self, project: int, task: dict[str, Any]) -> bytes:
        """The task's image file. A failed download is Label Studio's (or the image host's)
        failure, not the caller's: it becomes an UpstreamError."""
        key = image_key(self.rt, self.rt.state(project))
        cache_dir = self.rt.task_files_dir / str(project)
        try:
            return self.rt.ls.task_image_bytes(
                task, key, self.rt.limits, cache_dir, self.rt.settings.task_cache_mb * 1024**2
            )
        except ImageLoadError as exc:
            message = self.rt.ls.scrub(f"task {task.get('id')} image: {exc}")
            raise TaskImageError(message, exc.reason) from None

    def task_image(self, project: int, task: dict[str, Any]) -> Image.Image:
        """The task's image at full resolution (thumbnails)."""
        raw = self.task_image_bytes(project, task)
        try:
            return decode_image(raw, self.rt.limits, name=f"task {task.get('id')} image")
        except ImageLoadError as exc:
            raise TaskImageError(str(exc), exc.reason) from exc

    def query_vector(
        self, project: int, query: SimilarQuery, task: dict | None = None
    ) -> np.ndarray:
        collection = self.indexes.get(project)
        if query.text:
            return self._embedded(collection, lambda e: text_query_vector(e, query.text or ""))
        if query.image is not None or query.url:
            # A searcher's URL is fetched only from public addresses (no SSRF); task images
            # from the project's own data are fetched as Label Studio's data says.
            source = query.image if query.image is not None else self._fetch_query_url(query.url)
            return self._embedded(
                collection, lambda e: image_query_vector(e, source, self.rt.limits, query.box, "%")
            )
        assert query.task_id is not None
        whole = query.box is None or _covers_whole_image(query.box)
        if whole and query.task_id in collection:
            return collection.get(query.task_id)
        # A box, or a task not indexed yet (just imported): embed it now.
        task = task or self.task(project, query.task_id)
        raw = self.task_image_bytes(project, task)
        box = None if whole else query.box
        try:
            return self._embedded(
                collection, lambda e: image_query_vector(e, raw, self.rt.limits, box, "%")
            )
        except ImageLoadError as exc:
            raise TaskImageError(str(exc), exc.reason) from exc

    def _fetch_query_url(self, url: str | None) -> bytes:
        try:
            return fetch_public_url(str(url), self.rt.limits, self.url_policy)
        except UrlRefusedError as exc:
            raise QueryError(str(exc)) from None

    def _embedded(
        self, collection: Collection | MilvusProject, compute: Callable[[Embedder], np.ndarray]
    ) -> np.ndarray:
        embedder = self.rt.embedder()
        collection.check_model(embedder.spec, embedder.dim)  # never mix two models' vectors
        start = time.perf_counter()
        with self._forward:
            vector = compute(embedder)
        if self.rt.observe_query_embed is not None:
            self.rt.observe_query_embed(time.perf_counter() - start)
        return vector

    def find(
        self,
        project: int,
        query: SimilarQuery,
        k: int | None = None,
        task: dict | None = None,
        source: str = "api",
        diverse: bool = False,
    ) -> list[Hit]:
        """The k best matches; `diverse`: at most one per near-duplicate group."""
        if not self._searches.acquire(blocking=False):
            raise BusyError(
                f"{self.max_searches} searches are already running here; "
                "try again in a few seconds"
            )
        start = time.perf_counter()
        try:
            return self._find(project, query, k or self.rt.settings.similar_k, task, diverse)
        finally:
            self._searches.release()
            if self.rt.observe_search is not None:
                self.rt.observe_search(source, time.perf_counter() - start)

    def _find(
        self, project: int, query: SimilarQuery, k: int, task: dict | None, diverse: bool
    ) -> list[Hit]:
        # Labeled tasks are the collection's standing exclusions; these are this query's own.
        exclude = {query.task_id} if query.task_id is not None else set()
        exclude.update(query.more_like, query.not_like)  # the examples are not results
        collection = self.indexes.get(project)
        base = None if query.more_like else self.query_vector(project, query, task)
        if query.more_like or query.not_like:
            vector = feedback_vector(
                base,
                self._examples(collection, query.more_like),
                self._examples(collection, query.not_like),
            )
        else:
            vector = normalise(base)
        if vector.shape[0] != collection.dim:
            raise ConflictError(
                f"query vector has {vector.shape[0]} dimensions, the index {collection.dim}"
            )
        if not diverse:
            return collection.search(vector, k, exclude)
        # A pool a few times k, then the best of each near-duplicate group (a video's frames
        # or re-encoded copies would otherwise fill the whole tab).
        pool = collection.search(vector, k * DIVERSE_POOL, exclude)
        if len(pool) < 2:
            return pool
        vectors = collection.get_many([h.id for h in pool])
        threshold = default_threshold(self.rt, project)
        return one_per_group(pool, vectors, threshold, k)

    @staticmethod
    def _examples(
        collection: Collection | MilvusProject, task_ids: tuple[int, ...]
    ) -> np.ndarray:
        missing = [t for t in task_ids if t not in collection]
        if missing:
            raise QueryError(f"example tasks not indexed: {missing[:10]}")
        return collection.get_many(list(task_ids))

    def find_and_queue(
        self,
        project: int,
        query: SimilarQuery,
        k: int | None = None,
        task: dict | None = None,
        source: str = "api",
        suggest: str | None = None,
        diverse: bool | None = None,
    ) -> tuple[list[Hit], QueueResult]:
        """Find and put the matches in front of annotators; varied by default (one task per
        near-duplicate group, LOOKALIKE_DIVERSE)."""
        diverse = self.rt.settings.diverse if diverse is None else diverse
        hits = self.find(project, query, k, task, source, diverse)
        return hits, queue_matches(self.rt, project, hits, query.title(), suggest)


def _covers_whole_image(box: tuple[float, float, float, float]) -> bool:
    x, y, w, h = box
    return x <= 1 and y <= 1 and x + w >= 99 and y + h >= 99
