"""The search page (`/`) and the JSON endpoints only it uses (projects, thumbnails, jobs, queue).

The browser never sees Label Studio's API key: projects, task images and tabs are reached by
this process with its own credentials, and images come back as re-encoded JPEG thumbnails.
Errors raised here (ValueError, StoreError, LabelStudioError, ...) become JSON through the
app-wide handlers registered in `lookalike.app`.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template, request
from PIL import Image
from rq import Queue
from rq.job import Job
from rq.worker import Worker

from lookalike import __version__
from lookalike.config import Settings
from lookalike.images import ImageLoadError
from lookalike.ls_client import LabelStudioError
from lookalike.queueing import queue_matches
from lookalike.service import SimilarityService
from lookalike.state import ProjectState, known_projects
from lookalike.store import Hit

blueprint = Blueprint(
    "web",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/assets",
)

PROJECTS_TTL = 10.0  # seconds the Label Studio project list is reused (the page polls every 2 s)
THUMBNAIL_SIZES = (32, 1024)
THUMBNAIL_CACHE_ITEMS = 512
THUMBNAIL_TTL = 600.0
MAX_FAILURES_SHOWN = 20
MAX_JOBS_SHOWN = 20
MAX_QUEUE_RESULTS = 1000


def _settings() -> Settings:
    return current_app.config["LOOKALIKE_SETTINGS"]


def _service() -> SimilarityService:
    return current_app.extensions["lookalike"]


def _queue() -> Queue:
    return current_app.extensions["lookalike.queue"]


def _scrub(text: str) -> str:
    """Remove Label Studio credentials from a message before it reaches the browser."""
    secrets = {_settings().label_studio_api_key, *_service().ls.secrets()}
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


# ------------------------------------------------------------------------------ the page
@blueprint.get("/")
def index():
    response = Response(render_template("index.html", version=__version__))
    response.headers["Cache-Control"] = "no-cache"
    return response


# ------------------------------------------------------------------------------ projects
class _ProjectListCache:
    """Label Studio's project list, reused for a few seconds (the page polls for progress)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: tuple[float, list[dict[str, Any]]] | None = None

    def get(self, service: SimilarityService) -> list[dict[str, Any]]:
        with self._lock:
            if self._value and time.monotonic() - self._value[0] < PROJECTS_TTL:
                return self._value[1]
        projects = [
            {
                "id": int(data["id"]),
                "title": data.get("title") or f"Project {data['id']}",
                "task_count": data.get("task_number"),
                "labeled_count": data.get("num_tasks_with_annotations"),
            }
            for data in service.ls.list_projects()  # LabelStudioError, scrubbed, on failure
        ]
        with self._lock:
            self._value = (time.monotonic(), projects)
        return projects


_project_list = _ProjectListCache()


def _status(project: int) -> dict[str, Any]:
    status = ProjectState(_service().redis, project).status()
    failures = status.pop("failures")
    status["failures"] = failures[:MAX_FAILURES_SHOWN]
    status["failures_total"] = len(failures)
    return status


@blueprint.get("/api/projects")
def projects():
    """Label Studio's projects (id, title, task count) with this backend's index status."""
    service, settings = _service(), _settings()
    indexed = set(known_projects(service.redis))
    error = None
    try:
        listed = _project_list.get(service)
    except LabelStudioError as exc:
        # Progress stays visible while Label Studio is away: fall back to what Redis knows.
        listed, error = [], _scrub(str(exc))
    seen = {p["id"] for p in listed}
    listed = listed + [
        {"id": p, "title": f"Project {p}", "task_count": None, "labeled_count": None}
        for p in sorted(indexed - seen)
    ]
    out = []
    for project in listed:
        connected = project["id"] in indexed
        out.append(
            {
                **project,
                "connected": connected,
                "url": f"{settings.public_label_studio_url}/projects/{project['id']}/data",
                "status": _status(project["id"]) if connected else None,
            }
        )
    # Projects this backend indexes first, then the others (searching them says "no index").
    out.sort(key=lambda p: (not p["connected"], p["id"]))
    return jsonify(
        projects=out,
        label_studio_url=settings.public_label_studio_url,
        similar_k=settings.similar_k,
        model=settings.model,
        error=error,
    )


# ------------------------------------------------------------------------------ thumbnails
class _ThumbnailCache:
    def __init__(self, items: int, ttl: float) -> None:
        self.items, self.ttl = items, ttl
        self._data: OrderedDict[tuple[int, int, int], tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int, int]) -> bytes | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None or time.monotonic() - entry[0] > self.ttl:
                self._data.pop(key, None)
                return None
            self._data.move_to_end(key)
            return entry[1]

    def put(self, key: tuple[int, int, int], value: bytes) -> None:
        with self._lock:
            self._data[key] = (time.monotonic(), value)
            self._data.move_to_end(key)
            while len(self._data) > self.items:
                self._data.popitem(last=False)


_thumbnails = _ThumbnailCache(THUMBNAIL_CACHE_ITEMS, THUMBNAIL_TTL)


@blueprint.get("/api/projects/<int:project>/tasks/<int:task_id>/thumbnail")
def thumbnail(project: int, task_id: int):
    """The task's image as a JPEG at most `size` px on its longer side."""
    size = request.args.get("size", "256")
    if not size.isdigit() or not THUMBNAIL_SIZES[0] <= int(size) <= THUMBNAIL_SIZES[1]:
        raise ValueError(
            f"size must be an integer from {THUMBNAIL_SIZES[0]} to {THUMBNAIL_SIZES[1]}"
        )
    key = (project, task_id, int(size))
    body = _thumbnails.get(key)
    if body is None:
        service = _service()
        try:
            task = service.ls.task(task_id)
        except Exception as exc:  # the SDK's NotFoundError and friends
            raise LabelStudioError(f"task {task_id}: {_scrub(str(exc))[:200]}") from exc
        if int(task.get("project") or project) != project:
            raise ValueError(f"task {task_id} is not in project {project}")
        try:
            image = service.task_image(project, task)
        except ImageLoadError as exc:
            raise ImageLoadError(exc.reason, _scrub(str(exc.args[0]))) from None
        except LabelStudioError as exc:
            raise LabelStudioError(_scrub(str(exc))) from None
        image = image.convert("RGB")
        image.thumbnail((int(size), int(size)), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        body = buffer.getvalue()
        _thumbnails.put(key, body)
    response = Response(body, mimetype="image/jpeg")
    response.headers["Cache-Control"] = "private, max-age=600"
    return response


# ------------------------------------------------------------------------------ queueing
@blueprint.post("/api/projects/<int:project>/queue")
def queue_selected(project: int):
    """Put exactly the given results in the tab `title` (created or replaced) with priority."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object body")
    title = body.get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > 200:
        raise ValueError("title must be a non-empty string of at most 200 characters")
    results = body.get("results")
    if not isinstance(results, list) or not results or len(results) > MAX_QUEUE_RESULTS:
        raise ValueError(f"results must be a list of 1 to {MAX_QUEUE_RESULTS} {{task_id, score}}")
    hits: dict[int, Hit] = {}
    for item in results:
        try:
            task_id, score = int(item["task_id"]), float(item["score"])
        except (TypeError, KeyError, ValueError):
            raise ValueError("each result is {task_id: integer, score: number}") from None
        if not -1.0 <= score <= 1.0 + 1e-6:
            raise ValueError(f"score {score} of task {task_id} is not a similarity in [-1, 1]")
        hits.setdefault(task_id, Hit(task_id, min(score, 1.0)))
    service = _service()
    state = service.state(project)
    ids = list(hits)
    known = service.redis.smismember(state.k_tasks, ids)
    unknown = [i for i, ok in zip(ids, known, strict=True) if not ok]
    if unknown:
        raise ValueError(f"tasks not in project {project}: {', '.join(map(str, unknown[:10]))}")
    ordered = sorted(hits.values(), key=lambda h: -h.score)
    outcome = queue_matches(_settings(), state, service.ls, ordered, title.strip())
    settings = _settings()
    return jsonify(
        message=outcome.message,
        tab=outcome.title,
        view_id=outcome.view_id,
        priority=outcome.priority,
        task_ids=outcome.task_ids,
        url=f"{settings.public_label_studio_url}/projects/{project}/data?tab={outcome.view_id}",
    )


# ------------------------------------------------------------------------------ jobs
def _job_info(job: Job) -> dict[str, Any]:
    try:
        args = list(job.args or [])
        function = (job.func_name or "").rsplit(".", 1)[-1]
    except Exception:  # a job this process cannot deserialize: show what is known
        args, function = [], "?"
    return {
        "id": job.id,
        "function": function,
        "project": args[0] if args and isinstance(args[0], int) else None,
        "tasks": len(args[1]) if len(args) > 1 and isinstance(args[1], list) else None,
        "description": (job.description or "")[:120],
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "meta": {k: v for k, v in (job.meta or {}).items() if isinstance(v, int | float | str)},
    }


@blueprint.get("/api/jobs")
def jobs():
    """The RQ queue: waiting, running, scheduled (retries) and failed jobs, and the workers."""
    queue = _queue()
    started_ids = queue.started_job_registry.get_job_ids(0, MAX_JOBS_SHOWN - 1)
    running = [j for j in Job.fetch_many(started_ids, connection=queue.connection) if j]
    return jsonify(
        queue=queue.name,
        queued=queue.count,
        started=queue.started_job_registry.count,
        scheduled=queue.scheduled_job_registry.count,
        failed=queue.failed_job_registry.count,
        finished=queue.finished_job_registry.count,
        workers=Worker.count(connection=queue.connection, queue=queue),
        running=[_job_info(j) for j in running],
    )
