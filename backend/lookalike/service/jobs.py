"""RQ job entry points, run by `lookalike worker` (enqueued through `service.jobqueue`).

Each worker process installs its `Runtime` once (`install`), so the model is loaded once and
kept (RQ's SimpleWorker: no fork per job). Jobs are thin: they take plain arguments, find the
runtime, and call one service function. Jobs are idempotent: vectors are keyed by task id, so a
retried or duplicated job overwrites what it wrote before.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq import get_current_job

from lookalike.service import autoprioritize, coverage, duplicates, indexing, protocol
from lookalike.service.runtime import Runtime
from lookalike.service.similarity import SimilarityService
from lookalike.timeouts import SYNC_TIMEOUT

log = logging.getLogger(__name__)

_runtime: Runtime | None = None
_service: SimilarityService | None = None


def install(rt: Runtime) -> None:
    """Make `rt` the runtime every job in this process uses (called by `lookalike worker`)."""
    global _runtime, _service
    _runtime, _service = rt, SimilarityService(rt)


def _rt() -> Runtime:
    if _runtime is None:
        raise RuntimeError("jobs run in `lookalike worker`, which installs the runtime first")
    return _runtime


def _similarity() -> SimilarityService:
    _rt()
    assert _service is not None
    return _service


def _report(**values: Any) -> None:
    """Progress shown by `lookalike status`, the search page and /api/jobs."""
    job = get_current_job()
    if job is not None:
        job.meta.update(values)
        try:
            job.save_meta()
        except redis.RedisError as exc:  # progress is cosmetic: the work itself goes on
            log.warning("could not report progress: %s", exc)


def sync_project(project: int, retry_failed: bool = False) -> dict[str, int]:
    rt = _rt()
    lock = rt.state(project).locks.sync()
    if not lock.acquire(blocking=False):
        log.info("project %s: a sync is already running", project)
        return {"skipped": 1}
    try:
        return indexing.sync_project(rt, project, retry_failed, _report)
    finally:
        lock.release()


def reindex_project(project: int) -> dict[str, int]:
    """Forget every vector and index again; waits for a running sync instead of racing it."""
    rt = _rt()
    state = rt.state(project)
    lock = state.locks.sync()
    if not lock.acquire(blocking=True, blocking_timeout=SYNC_TIMEOUT):
        raise RuntimeError(f"project {project}: a sync held the lock for an hour; try again")
    try:
        state.reset()
        return indexing.sync_project(rt, project, True, _report)
    finally:
        lock.release()


def index_tasks(project: int, tasks: list[dict[str, Any]], attempt: int = 1) -> dict[str, int]:
    rt = _rt()
    result = indexing.index_batch(rt, project, tasks, attempt, _report)
    if result["indexed"]:
        if coverage.settings_of(rt, project)["enabled"]:
            coverage.start(rt, project)  # new tasks get their cluster
        duplicates.refresh(rt, project)  # and join their near-duplicate groups
    return result


def remove_tasks(project: int, task_ids: list[int]) -> int:
    return indexing.remove_tasks(_rt(), project, [int(i) for i in task_ids])


def drop_project(project: int) -> None:
    _rt().state(project).drop()


def auto_prioritize(project: int, task_id: int, annotation: dict[str, Any]) -> dict[str, Any]:
    return autoprioritize.auto_prioritize(_similarity(), project, task_id, annotation)


def clean_annotation(project: int, annotation_id: int) -> int:
    return protocol.clean_annotation(_rt(), project, annotation_id)


def find_duplicates(project: int, threshold: float) -> dict[str, Any]:
    return duplicates.compute(_rt(), project, threshold)


def apply_coverage(project: int) -> dict[str, int]:
    return coverage.apply(_rt(), project)
