"""What the REST API and the search page do, minus HTTP: each function takes parsed request
values, calls the services, and returns a JSON-able dict (or image bytes)."""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from PIL import Image

from lookalike.core.store import Hit
from lookalike.errors import BadRequestError, NotFoundError
from lookalike.service import coverage as coverage_mode
from lookalike.service import duplicates as near_duplicates
from lookalike.service.queueing import queue_matches
from lookalike.service.similarity import SimilarityService, SimilarQuery

MAX_K = 1000
MAX_QUEUE_RESULTS = 1000
MAX_TITLE_CHARS = 200
THUMBNAIL_SIZES = (32, 1024)
THUMBNAIL_CACHE_ITEMS = 512
THUMBNAIL_TTL = 600.0


def similar(service: SimilarityService, project: int, body: dict[str, Any]) -> dict[str, Any]:
    """`POST /api/projects/{id}/similar`: search, and with `queue` also fill a tab."""
    require_known_project(service, project)
    query = SimilarQuery.from_json(body)
    k = body.get("k", service.rt.settings.similar_k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise BadRequestError(f"k must be an integer from 1 to {MAX_K}")
    extra: dict[str, Any] = {}
    suggest = _suggested_label(body)
    if suggest is not None and not body.get("queue"):
        raise BadRequestError("suggest goes with queue: true (the matches get the label)")
    diverse = body.get("diverse", service.rt.settings.diverse if body.get("queue") else False)
    if not isinstance(diverse, bool):
        raise BadRequestError("diverse is true or false (one result per near-duplicate group)")
    if body.get("queue"):
        hits, outcome = service.find_and_queue(project, query, k, suggest=suggest,
                                               diverse=diverse)
        extra = {
            "view_id": outcome.view_id,
            "tab": outcome.title,
            "message": outcome.message,
            "priority": outcome.priority,
        }
    else:
        hits = service.find(project, query, k, diverse=diverse)
    return {"results": [{"task_id": h.id, "score": h.score} for h in hits], **extra}


def queue_results(service: SimilarityService, project: int, body: dict[str, Any]) -> dict[str, Any]:
    """`POST /api/projects/{id}/queue`: put exactly the given results in the tab `title`."""
    require_known_project(service, project)
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > MAX_TITLE_CHARS:
        raise BadRequestError(
            f"title must be a non-empty string of at most {MAX_TITLE_CHARS} characters"
        )
    results = body.get("results")
    if not isinstance(results, list) or not results or len(results) > MAX_QUEUE_RESULTS:
        raise BadRequestError(
            f"results must be a list of 1 to {MAX_QUEUE_RESULTS} {{task_id, score}}"
        )
    hits: dict[int, Hit] = {}
    for item in results:
        try:
            task_id, score = int(item["task_id"]), float(item["score"])
        except (TypeError, KeyError, ValueError):
            raise BadRequestError("each result is {task_id: integer, score: number}") from None
        if not -1.0 <= score <= 1.0 + 1e-6:
            raise BadRequestError(f"score {score} of task {task_id} is not a similarity in [-1, 1]")
        hits.setdefault(task_id, Hit(task_id, min(score, 1.0)))
    ids = list(hits)
    known = service.rt.state(project).tasks.contains_many(ids)
    unknown = [i for i, ok in zip(ids, known, strict=True) if not ok]
    if unknown:
        raise BadRequestError(
            f"tasks not in project {project}: {', '.join(map(str, unknown[:10]))}"
        )
    ordered = sorted(hits.values(), key=lambda h: -h.score)
    suggest = _suggested_label(body)
    outcome = queue_matches(service.rt, project, ordered, title.strip(), suggest)
    public = service.rt.settings.public_label_studio_url
    return {
        "message": outcome.message,
        "tab": outcome.title,
        "view_id": outcome.view_id,
        "priority": outcome.priority,
        "task_ids": outcome.task_ids,
        "url": f"{public}/projects/{project}/data?tab={outcome.view_id}",
    }


def _suggested_label(body: dict[str, Any]) -> str | None:
    """`suggest`: a label of the project's Choices that the queued matches get as a prediction
    (accept it with Label Studio's "Create Annotations From Predictions")."""
    label = body.get("suggest")
    if label is None:
        return None
    if not isinstance(label, str) or not label.strip():
        raise BadRequestError("suggest must be one of the project's labels")
    return label.strip()


class Thumbnails:
    """Task images as small JPEGs for the search page, cached (LRU with a time limit)."""

    def __init__(self, service: SimilarityService) -> None:
        self.service = service
        self._data: OrderedDict[tuple[int, int, int], tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, project: int, task_id: int, size: str) -> bytes:
        """The task's image as a JPEG at most `size` px on its longer side."""
        low, high = THUMBNAIL_SIZES
        if not size.isdigit() or not low <= int(size) <= high:
            raise BadRequestError(f"size must be an integer from {low} to {high}")
        key = (project, task_id, int(size))
        body = self._cached(key)
        if body is None:
            body = self._render(project, task_id, int(size))
            self._put(key, body)
        return body

    def _render(self, project: int, task_id: int, size: int) -> bytes:
        task = self.service.task(project, task_id)
        image = self.service.task_image(project, task).convert("RGB")
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        return buffer.getvalue()

    def _cached(self, key: tuple[int, int, int]) -> bytes | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None or time.monotonic() - entry[0] > THUMBNAIL_TTL:
                self._data.pop(key, None)
                return None
            self._data.move_to_end(key)
            return entry[1]

    def _put(self, key: tuple[int, int, int], value: bytes) -> None:
        with self._lock:
            self._data[key] = (time.monotonic(), value)
            self._data.move_to_end(key)
            while len(self._data) > THUMBNAIL_CACHE_ITEMS:
                self._data.popitem(last=False)


def require_known_project(service: SimilarityService, project: int) -> None:
    if not service.rt.state(project).is_known():
        raise NotFoundError(
            f"Lookalike does not know project {project}: connect the backend to it in Label "
            f"Studio, or POST /api/projects/{project}/sync"
        )


def duplicates(
    service: SimilarityService, project: int, args: Mapping[str, str]
) -> tuple[dict[str, Any], bool]:
    """`GET /api/projects/{id}/duplicates?threshold=&page=&page_size=`: the latest groups."""
    require_known_project(service, project)
    threshold = near_duplicates.parse_threshold(args.get("threshold"), service.rt, project)
    page, size = args.get("page", "1"), args.get("page_size", "100")
    if not (page.isdigit() and size.isdigit()):
        raise BadRequestError("page and page_size are positive integers")
    return near_duplicates.report(service.rt, project, threshold, int(page), int(size))


def coverage(
    service: SimilarityService, project: int, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`GET|PUT /api/projects/{id}/coverage` (`{"enabled": bool, "k": int | null}`)."""
    require_known_project(service, project)
    if body is None:
        return coverage_mode.settings_of(service.rt, project)
    return coverage_mode.configure(service.rt, project, body.get("enabled"), body.get("k"))


def reindex(service: SimilarityService, project: int) -> str:
    """`POST /api/projects/{id}/reindex`: forget the vectors and index again; the job id."""
    require_known_project(service, project)
    return service.rt.jobs.reindex(project).id
