"""The HTTP app: Label Studio's ML-backend protocol plus a small REST API. Kept thin.

Label Studio waits 1 s for /health and /webhook and 3 s for /setup: those only touch Redis
(enqueue or read) and never load the model or call Label Studio.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, Response, jsonify, request
from label_studio_sdk.label_interface import LabelInterface
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from rq import Queue, Retry

from lookalike import __version__, jobs
from lookalike.config import Settings
from lookalike.embedding import EmbedderError, TextNotSupportedError
from lookalike.images import ImageLoadError
from lookalike.ls_client import LabelStudioError, parse_project_id
from lookalike.observability import WebMetrics
from lookalike.search import QueryError
from lookalike.service import SimilarityService, SimilarQuery
from lookalike.state import ProjectState
from lookalike.store import StoreError

log = logging.getLogger(__name__)

STATUS_CONTROL = "lookalike_status"  # a TextArea in plugin_config.xml that shows our replies


class ApiError(ValueError):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError("expected a JSON object body")
    return body


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    redis_client = redis.Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=redis_client)
    metrics = WebMetrics(redis_client, settings.queue_name)
    service = SimilarityService(settings, redis_client, metrics.query_embed_seconds.observe)
    app.extensions["lookalike"] = service
    app.extensions["lookalike.queue"] = queue
    app.config["LOOKALIKE_SETTINGS"] = settings

    from lookalike.web import blueprint as web_blueprint

    app.register_blueprint(web_blueprint)

    # Errors become JSON with a clear message and a 4xx/5xx status, on every route
    # (blueprints included).
    for error_types, status in _ERROR_STATUS:
        for error_type in error_types:
            app.register_error_handler(error_type, _json_error(status))

    # ------------------------------------------------------------ the ML-backend protocol
    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class="Lookalike", version=__version__)

    @app.post("/setup")
    def setup():
        body = _json_body()
        project = parse_project_id(body.get("project"))
        # First contact with a project starts indexing it; later /setup calls (LS sends one
        # before every predict batch) must not pile up syncs.
        # The flag expires, so a first sync that failed (LS down, no <Image> yet) is retried.
        if redis_client.set(f"lookalike:project:{project}:first-sync", "1", nx=True, ex=600):
            queue.enqueue(jobs.sync_project, project, job_timeout=3600)
        return jsonify(model_version=settings.model_version)

    @app.get("/versions")
    def versions():
        return jsonify(versions=[settings.model_version])

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action", "")
        project_info = body.get("project") or {}
        project = (
            int(project_info["id"])
            if isinstance(project_info, dict) and "id" in project_info
            else None
        )
        if project is None:
            return jsonify(status="ignored", reason="no project"), 200
        enqueued = _enqueue_for_webhook(settings, queue, project, action, body)
        return jsonify(status="ok", action=action, enqueued=enqueued), 200

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks") or []
        params = body.get("params") or {}
        context = params.get("context") or {}
        regions = context.get("result") if isinstance(context, dict) else None
        if not regions:
            # Task opened / "Retrieve Predictions": no search, and no prediction either (an
            # empty list per task), so annotators' queues are never disturbed by these calls.
            return jsonify(results=[[] for _ in tasks])
        project = parse_project_id(body.get("project"))
        if not tasks:
            raise ApiError("an interactive /predict needs the task it was made on")
        task = tasks[0]
        query = _query_from_regions(int(task["id"]), regions)
        try:
            with metrics.time_search("interactive"):
                _, outcome = service.find_and_queue(project, query, task=task)
            message = outcome.message
        except (QueryError, ImageLoadError, StoreError, EmbedderError, LabelStudioError) as exc:
            message = f"Lookalike could not search: {exc}"
            log.warning("project %s task %s: %s", project, task.get("id"), exc)
        return jsonify(results=[_status_prediction(body.get("label_config"), message, settings)])

    # ------------------------------------------------------------ REST API for scripts
    @app.get("/api/projects/<int:project>/index-status")
    def index_status(project: int):
        status = ProjectState(redis_client, project).status()
        status["queued_jobs"] = queue.count
        return jsonify(status)

    @app.post("/api/projects/<int:project>/similar")
    def similar(project: int):
        body = _json_body()
        query = SimilarQuery.from_json(body)
        k = body.get("k", settings.similar_k)
        if not isinstance(k, int) or not 1 <= k <= 1000:
            raise ApiError("k must be an integer from 1 to 1000")
        with metrics.time_search("api"):
            if body.get("queue"):
                hits, outcome = service.find_and_queue(project, query, k)
            else:
                hits, outcome = service.find(project, query, k), None
        if outcome is not None:
            extra = {
                "view_id": outcome.view_id,
                "tab": outcome.title,
                "message": outcome.message,
                "priority": outcome.priority,
            }
        else:
            extra = {}
        return jsonify(results=[{"task_id": h.id, "score": h.score} for h in hits], **extra)

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.post("/api/projects/<int:project>/sync")
    def sync(project: int):
        job = queue.enqueue(jobs.sync_project, project, True, job_timeout=3600)
        return jsonify(job_id=job.id), 202

    @app.post("/api/projects/<int:project>/reindex")
    def reindex(project: int):
        job = queue.enqueue(jobs.reindex_project, project, job_timeout=3600)
        return jsonify(job_id=job.id), 202

    @app.errorhandler(404)
    def not_found(_exc):
        return jsonify(error=f"no such endpoint: {request.method} {request.path}"), 404

    @app.errorhandler(405)
    def not_allowed(_exc):
        return jsonify(error=f"{request.method} is not allowed on {request.path}"), 405

    return app


_ERROR_STATUS: list[tuple[tuple[type[Exception], ...], int]] = [
    ((QueryError, ImageLoadError, ValueError, TextNotSupportedError), 400),
    ((StoreError,), 409),
    ((LabelStudioError, EmbedderError), 502),
    ((redis.RedisError,), 503),
]


def _json_error(default_status: int):
    def handle(exc: Exception):
        status = exc.status if isinstance(exc, ApiError) else default_status
        message = str(exc) if not isinstance(exc, redis.RedisError) else f"Redis unavailable: {exc}"
        return jsonify(error=message), status

    return handle


def _enqueue_for_webhook(
    settings: Settings, queue: Queue, project: int, action: str, body: dict[str, Any]
) -> int:
    """Turn one Label Studio event into jobs. Only cheap Redis writes here: LS waits 1 s."""
    state = ProjectState(queue.connection, project)
    if action == "TASKS_CREATED":
        raw = body.get("tasks") or []
        tasks = [{"id": t["id"], "data": t.get("data") or {}} for t in raw]
        state.add_tasks(t["id"] for t in tasks)  # known at once: counted, and deletable
        state.mark_queued(t["id"] for t in tasks)
        state.mark_labeled(t["id"] for t in raw if t.get("total_annotations"))
        size = settings.index_batch_size
        batches = [tasks[start : start + size] for start in range(0, len(tasks), size)]
        with queue.connection.pipeline() as pipe:  # one round trip for a large import
            queue.enqueue_many(
                [
                    Queue.prepare_data(
                        jobs.index_tasks,
                        (project, batch),
                        timeout=1800,
                        retry=Retry(max=3, interval=[10, 60, 300]),
                    )
                    for batch in batches
                ],
                pipeline=pipe,
            )
            pipe.execute()
        return len(batches)
    if action == "TASKS_DELETED":
        ids = [int(t["id"]) for t in body.get("tasks") or []]
        if ids:
            queue.enqueue(jobs.remove_tasks, project, ids)
        return 1 if ids else 0
    if action in {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}:
        annotation = body.get("annotation") or {}
        task = body.get("task") or {}
        task_id = task.get("id") or annotation.get("task")
        if task_id is None:
            return 0
        # Excluded from searches right away, not when the job gets its turn in the queue.
        state.mark_labeled([int(task_id)])
        minimal = {"id": annotation.get("id"), "result": annotation.get("result") or []}
        queue.enqueue(jobs.auto_prioritize, project, int(task_id), minimal)
        return 1
    if action == "ANNOTATIONS_DELETED":
        for annotation in body.get("annotations") or []:
            if isinstance(annotation, dict) and annotation.get("id") is not None:
                state.remove_annotation(int(annotation["id"]))  # label counts go down too
    if action in {"ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"}:
        # Bulk changes: a resync relists which tasks are labeled (and repairs any drift).
        queue.enqueue(jobs.sync_project, project, job_timeout=3600)
        return 1
    if action == "START_TRAINING":
        # "Start Training" in Label Studio: a full resync that also retries failed tasks.
        queue.enqueue(jobs.sync_project, project, True, job_timeout=3600)
        return 1
    if action == "PROJECT_DELETED":
        queue.enqueue(jobs.drop_project, project)
        return 1
    return 0


def _query_from_regions(task_id: int, regions: list[dict[str, Any]]) -> SimilarQuery:
    """The last smart region the annotator made decides the query."""
    for region in reversed(regions):
        kind = str(region.get("type", "")).lower()
        value = region.get("value") or {}
        if kind == "textarea":
            texts = value.get("text") or []
            text = " ".join(t for t in texts if isinstance(t, str)).strip()
            if text:
                return SimilarQuery(task_id=task_id, text=text)
        elif kind in {"rectanglelabels", "rectangle"}:
            box = tuple(float(value.get(k, 0)) for k in ("x", "y", "width", "height"))
            return SimilarQuery(task_id=task_id, box=box)  # type: ignore[arg-type]
        elif kind in {"keypointlabels", "keypoint", "choices"}:
            return SimilarQuery(task_id=task_id)
    raise QueryError("draw a box, click a point or type a prompt to search")


def _status_prediction(label_config: str | None, message: str, settings: Settings) -> dict:
    """One prediction whose only region writes `message` into the status TextArea, if any."""
    result = []
    if label_config:
        try:
            interface = LabelInterface(label_config)
            control = interface.get_control(STATUS_CONTROL)
            result.append(
                {
                    "from_name": STATUS_CONTROL,
                    "to_name": control.to_name[0],
                    "type": "textarea",
                    "value": {"text": [message]},
                }
            )
        except Exception:
            pass
    return {
        "result": result,
        "score": 0.0,
        "model_version": settings.model_version,
        "message": message,
    }
