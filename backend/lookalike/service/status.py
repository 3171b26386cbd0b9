"""What admins see: each project's indexing progress, the project list, and the job queue
(shared by the REST API, the search page, /metrics and `lookalike status`)."""

from __future__ import annotations

import threading
import time
from typing import Any

from rq.job import Job
from rq.worker import Worker

from lookalike.core.embedding import ModelSpec
from lookalike.errors import LookalikeError
from lookalike.service.runtime import Runtime
from lookalike.service.state import known_projects

PROJECTS_TTL = 10.0  # seconds the Label Studio project list is reused (the page polls every 2 s)
MAX_FAILURES_SHOWN = 20
MAX_JOBS_SHOWN = 20


def index_status(rt: Runtime, project: int) -> dict[str, Any]:
    status = rt.state(project).status()
    status["queued_jobs"] = rt.jobs.queued_for(project)
    return status


def running_jobs(rt: Runtime, limit: int = -1) -> list[Job]:
    """The jobs workers are on now (their progress is in `job.meta`)."""
    registry = rt.jobs.queue.started_job_registry
    ids = registry.get_job_ids(0, limit - 1 if limit > 0 else -1)
    return [job for job in Job.fetch_many(ids, connection=rt.redis) if job is not None]


def job_info(job: Job) -> dict[str, Any]:
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


def jobs_overview(rt: Runtime, visible: set[int] | None = None) -> dict[str, Any]:
    """The RQ queue: waiting, running, scheduled (retries) and failed jobs, and the workers;
    running jobs only of the `visible` projects when given."""
    running = [job_info(j) for j in running_jobs(rt, MAX_JOBS_SHOWN)]
    if visible is not None:
        running = [j for j in running if j["project"] in visible]
    queue = rt.jobs.queue
    return {
        "queue": queue.name,
        "queued": queue.count,
        "started": queue.started_job_registry.count,
        "scheduled": queue.scheduled_job_registry.count,
        "failed": queue.failed_job_registry.count,
        "finished": queue.finished_job_registry.count,
        "workers": Worker.count(connection=rt.redis, queue=queue),
        "running": running,
    }


class ProjectList:
    """Label Studio's projects with this backend's index status, for the search page. The
    project list is reused for a few seconds (the page polls for progress)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._lock = threading.Lock()
        self._value: tuple[float, list[dict[str, Any]]] | None = None

    def overview(self, visible: set[int] | None = None) -> dict[str, Any]:
        """Every project, or only the `visible` ones (those the signed-in user can open)."""
        settings = self.rt.settings
        indexed = set(known_projects(self.rt.redis))
        error = None
        try:
            listed = self._listed()
        except LookalikeError as exc:
            # Progress stays visible while Label Studio is away: fall back to what Redis knows.
            listed, error = [], str(exc)  # the client scrubs credentials
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
                    "status": self._status(project["id"]) if connected else None,
                }
            )
        if visible is not None:
            out = [p for p in out if p["id"] in visible]
        # Projects this backend indexes first, then the others (searching them says "no index").
        out.sort(key=lambda p: (not p["connected"], p["id"]))
        return {
            "projects": out,
            "label_studio_url": settings.public_label_studio_url,
            "similar_k": settings.similar_k,
            "model": settings.model,
            "text_search": _text_search(settings.model),
            "error": error,
        }

    def _status(self, project: int) -> dict[str, Any]:
        status = self.rt.state(project).status()
        failures = status.pop("failures")
        status["failures"] = failures[:MAX_FAILURES_SHOWN]
        status["failures_total"] = len(failures)
        return status

    def _listed(self) -> list[dict[str, Any]]:
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
            for data in self.rt.ls.list_projects()
        ]
        with self._lock:
            self._value = (time.monotonic(), projects)
        return projects


def _text_search(model: str) -> bool:
    try:
        return ModelSpec.parse(model).has_text_tower
    except LookalikeError:
        return False
