"""RQ jobs: syncing projects, indexing tasks, removing them, automatic prioritization.

Jobs run in `lookalike worker` processes. Each worker process loads the embedder once and keeps
it (RQ's SimpleWorker: no fork per job, so the model stays in memory). Jobs are idempotent:
vectors are keyed by task id, so a retried or duplicated job overwrites what it wrote before.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from functools import cache
from typing import Any

import redis
from rq import Queue, Retry, get_current_job

from lookalike.config import Settings
from lookalike.embedding import Embedder
from lookalike.images import ImageLimits, ImageLoadError, decode_image
from lookalike.ls_client import LabelStudioClient, LabelStudioError, image_field
from lookalike.observability import record_indexing
from lookalike.state import ModelConflictError, ProjectState

log = logging.getLogger(__name__)

# Reasons worth retrying: the file may come back. A corrupt image will not fix itself.
TRANSIENT_REASONS = {"timeout", "download_failed", "http_error", "unreadable"}
RETRY_DELAYS = (5, 30, 120)


@cache
def settings() -> Settings:
    return Settings.from_env()


@cache
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings().redis_url)


def embedder() -> Embedder:
    return service().embedder()  # one model per worker process, shared with searches


@cache
def label_studio() -> LabelStudioClient:
    s = settings()
    return LabelStudioClient(s.label_studio_url, s.label_studio_api_key)


def queue() -> Queue:
    return Queue(settings().queue_name, connection=redis_client())


def _progress(**values: Any) -> None:
    job = get_current_job()
    if job is not None:
        job.meta.update(values)
        job.save_meta()


def _image_key(state: ProjectState) -> str:
    meta = state.meta()
    if "image_key" in meta:
        return meta["image_key"]
    project = label_studio().project(state.project)
    _, key = image_field(project["label_config"])
    state.set_meta(image_key=key)
    return key


# ---------------------------------------------------------------------------- jobs
def sync_project(project: int, retry_failed: bool = False) -> dict[str, int]:
    """List every task of the project, index what is missing, drop what is gone.

    `retry_failed` (a sync asked for by a person) also retries tasks that failed for good.
    """
    state = ProjectState(redis_client(), project)
    lock = redis_client().lock(state.k_sync_lock, timeout=3600)
    if not lock.acquire(blocking=False):
        log.info("project %s: a sync is already running", project)
        return {"skipped": 1}
    try:
        return _sync_locked(state, retry_failed)
    finally:
        lock.release()


def reindex_project(project: int) -> dict[str, int]:
    """Forget every vector and index again; waits for a running sync instead of racing it."""
    state = ProjectState(redis_client(), project)
    lock = redis_client().lock(state.k_sync_lock, timeout=3600)
    if not lock.acquire(blocking=True, blocking_timeout=3600):
        raise RuntimeError(f"project {project}: a sync held the lock for an hour; try again")
    try:
        state.reset()
        return _sync_locked(state, retry_failed=True)
    finally:
        lock.release()


def _sync_locked(state: ProjectState, retry_failed: bool) -> dict[str, int]:
    s = settings()
    project = state.project
    ls = label_studio()
    project_info = ls.project(project)
    _, key = image_field(project_info["label_config"])
    config_hash = hashlib.sha256(project_info["label_config"].encode()).hexdigest()[:16]
    if state.meta().get("label_config_hash") != config_hash:
        retry_failed = True  # e.g. the image field changed: earlier failures may now succeed
    state.set_meta(image_key=key, label_config_hash=config_hash)
    # Snapshots before listing: a task created, indexed or labeled through a webhook while we
    # list is then neither dropped as "gone" nor un-marked.
    indexed_before = state.indexed_ids()
    labeled_before = state.labeled_ids()
    known_before = indexed_before | state.task_ids() | {f.task_id for f in state.failures()}
    tasks: dict[int, dict[str, Any]] = {}
    labeled: set[int] = set()
    for task in ls.iter_tasks(project):
        tasks[int(task["id"])] = {"id": task["id"], "data": task.get("data") or {}}
        if task.get("total_annotations") or task.get("is_labeled"):
            labeled.add(int(task["id"]))
        if len(tasks) % 1000 == 0:
            _progress(listed=len(tasks))
    indexed = state.indexed_ids()
    state.set_tasks(
        set(tasks) | (indexed - indexed_before), labeled | (state.labeled_ids() - labeled_before)
    )
    gone = sorted(known_before - set(tasks))  # vectors, failures and priorities go too
    state.remove_tasks(gone)
    failures = state.failures()
    if retry_failed:
        state.clear_failures([f.task_id for f in failures])
        skip = set()
    else:
        skip = {f.task_id for f in failures if f.final}
    skip |= state.recently_queued()  # a sync during a big import does not queue it twice
    missing = [t for i, t in tasks.items() if i not in indexed and i not in skip]
    q = queue()
    for start in range(0, len(missing), s.index_batch_size):
        enqueue_index(q, state, missing[start : start + s.index_batch_size])
    state.set_meta(last_sync=time.time())
    summary = {"tasks": len(tasks), "enqueued": len(missing), "removed": len(gone)}
    log.info("project %s synced: %s", project, summary)
    return summary


def enqueue_index(
    q: Queue, state: ProjectState, tasks: list[dict[str, Any]], attempt: int = 1
) -> None:
    """Queue one indexing batch; RQ retries a batch that fails as a whole (Redis, the model)."""
    state.mark_queued(t["id"] for t in tasks)
    project = state.project
    q.enqueue(
        index_tasks,
        project,
        tasks,
        attempt,
        job_timeout=1800,
        retry=Retry(max=3, interval=[10, 60, 300]),
        description=f"index {len(tasks)} tasks of project {project}",
    )


def index_tasks(project: int, tasks: list[dict[str, Any]], attempt: int = 1) -> dict[str, int]:
    """Fetch, embed and store a batch of tasks; record per-task failures and retry bounded."""
    s = settings()
    state = ProjectState(redis_client(), project)
    model = embedder()
    try:
        state.claim_model(model.spec, model.dim)
    except ModelConflictError as exc:
        state.set_meta(error=str(exc))  # shown by index-status, the search page and `status`
        raise
    key = _image_key(state)
    limits = ImageLimits.from_settings(s)
    cache_dir = s.data_dir / "task-files" / str(project)
    ls = label_studio()
    # Tasks deleted since this job was queued (TASKS_DELETED, a resync) must not come back.
    tasks = [t for t in tasks if state.is_task(int(t["id"]))]
    ids, images, retry = [], [], []
    failed = 0
    for done, task in enumerate(tasks):
        if done % 16 == 0:
            _progress(fetched=done, batch=len(tasks), attempt=attempt)
        task_id = int(task["id"])
        try:
            raw = ls.task_image_bytes(task, key, limits, cache_dir)
            images.append(
                decode_image(raw, limits, draft_size=model.input_size, name=f"task {task_id} image")
            )
            ids.append(task_id)
        except (ImageLoadError, LabelStudioError) as exc:
            reason = exc.reason if isinstance(exc, ImageLoadError) else "download_failed"
            final = reason not in TRANSIENT_REASONS or attempt >= s.max_attempts
            state.record_failure(task_id, str(exc), attempt, final)
            failed += 1
            if not final:
                retry.append(task)
            log.warning(
                "project %s task %s failed (attempt %d): %s", project, task_id, attempt, exc
            )
    embed_seconds = None
    if images:
        start = time.perf_counter()
        vectors = model.embed_images(images)
        embed_seconds = time.perf_counter() - start
        state.put_vectors(ids, vectors, only_known=True)
    record_indexing(redis_client(), len(ids), failed, embed_seconds)
    retrying = {int(t["id"]) for t in retry}
    state.unmark_queued(int(t["id"]) for t in tasks if int(t["id"]) not in retrying)
    if retry:
        delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS)) - 1]
        queue().enqueue_in(
            _timedelta(delay), index_tasks, project, retry, attempt + 1, job_timeout=1800
        )
    _progress(indexed=len(ids), failed=failed)
    return {"indexed": len(ids), "failed": failed, "retrying": len(retry)}


def remove_tasks(project: int, task_ids: Iterable[int]) -> int:
    ids = [int(i) for i in task_ids]
    ProjectState(redis_client(), project).remove_tasks(ids)
    return len(ids)


def drop_project(project: int) -> None:
    ProjectState(redis_client(), project).drop()
    redis_client().delete(f"lookalike:project:{int(project)}:first-sync")


def _timedelta(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)


def annotation_labels(annotation: dict[str, Any]) -> list[str]:
    """Every label an annotation's result carries (*labels / choices), but Lookalike's own."""
    labels: list[str] = []
    for region in annotation.get("result") or []:
        if str(region.get("from_name", "")).startswith("lookalike_"):
            continue  # our own "find similar" tools are queries, not labels
        value = region.get("value") or {}
        for name, content in value.items():
            if (name.endswith("labels") or name == "choices") and isinstance(content, list):
                labels.extend(str(v) for v in content)
    return labels


def auto_prioritize(project: int, task_id: int, annotation: dict[str, Any]) -> dict[str, Any]:
    """After an annotation: if it carries a rare label, queue unlabeled look-alikes of its task."""
    from lookalike.queueing import queue_matches, rare_labels
    from lookalike.service import SimilarQuery

    s = settings()
    state = ProjectState(redis_client(), project)
    labels = annotation_labels(annotation)
    if annotation.get("id") is not None:
        state.set_annotation_labels(int(annotation["id"]), task_id, labels)
    state.mark_labeled([task_id])
    if not s.auto_prioritize or not labels:
        return {"queued": 0, "reason": "off" if not s.auto_prioritize else "no labels"}
    counts = state.label_counts()
    hit_labels = sorted(set(labels) & rare_labels(counts, s.rare_share))
    if not hit_labels:
        return {"queued": 0, "reason": "no rare label", "counts": counts}
    if not state.vectors([task_id]):
        return {"queued": 0, "reason": f"task {task_id} is not indexed yet"}
    hits = service().find(project, SimilarQuery(task_id=task_id), k=s.auto_k)
    result = queue_matches(s, state, label_studio(), hits, f"Rare: {', '.join(hit_labels)}")
    log.info("project %s: %s", project, result.message)
    return {"queued": len(result.task_ids), "labels": hit_labels, "counts": counts}


@cache
def service():
    from lookalike.service import SimilarityService

    return SimilarityService(settings(), redis_client())
