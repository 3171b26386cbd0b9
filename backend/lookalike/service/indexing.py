"""Indexing Label Studio projects: a sync lists tasks and queues the missing ones; an index
batch runs the one indexing pipeline (`lookalike.core.pipeline`) with a reader that fetches
task images through Label Studio and a writer that stores vectors and failures in Redis.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from lookalike.core.images import ImageLoadError, decode_image
from lookalike.core.pipeline import Item, run_pipeline
from lookalike.errors import UnavailableError
from lookalike.service.annotations import annotation_labels
from lookalike.service.ls_client import LabelStudioError, image_field
from lookalike.service.metrics import record_indexing
from lookalike.service.runtime import Runtime
from lookalike.service.state import ModelConflictError, ProjectState
from lookalike.timeouts import (
    DOWNLOAD_RETRY_DELAYS,
    LABEL_STUDIO_OUTAGE_RETRY_DELAYS,
    QUEUED_MARK_MAX_AGE,
)

log = logging.getLogger(__name__)

# Reasons worth retrying: the file may come back. A corrupt image will not fix itself.
TRANSIENT_REASONS = frozenset(
    {"timeout", "download_failed", "http_error", "unreadable", "vector_db_unavailable"}
)
# No answer at all (connection refused, timed out): Label Studio, the image host or the vector
# database is down. Retried on the outage schedule (about an hour), not turned into final
# failures in minutes.
OUTAGE_REASONS = frozenset({"timeout", "download_failed", "vector_db_unavailable"})
LISTING_PROGRESS_EVERY = 1000

Report = Callable[..., None]  # job progress: report(listed=..., indexed=...)


def _no_report(**_values: Any) -> None:
    pass


# ---------------------------------------------------------------------------- syncing
def sync_project(rt: Runtime, project: int, retry_failed: bool, report: Report = _no_report):
    """List every task of the project, index what is missing, drop what is gone.

    Caller holds the project's sync lock. `retry_failed` (a sync asked for by a person) also
    retries tasks that failed for good."""
    state = rt.state(project)
    _authenticate_webhooks(rt, project)
    project_info = rt.ls.project(project)
    _, key = image_field(project_info["label_config"])
    config_hash = hashlib.sha256(project_info["label_config"].encode()).hexdigest()[:16]
    if state.meta.get().get("label_config_hash") != config_hash:
        retry_failed = True  # e.g. the image field changed: earlier failures may now succeed
    state.meta.update(image_key=key, label_config_hash=config_hash)
    # Snapshots before listing: a task created, indexed or labeled through a webhook while we
    # list is then neither dropped as "gone" nor un-marked.
    indexed_before = state.vectors.ids()
    labeled_before = state.labeled.ids()
    tasks_before = state.tasks.ids()
    known_before = indexed_before | tasks_before | {f.task_id for f in state.failures.all()}
    tasks: dict[int, dict[str, Any]] = {}
    labeled: set[int] = set()
    for task in rt.ls.iter_tasks(project):
        tasks[int(task["id"])] = {"id": task["id"], "data": task.get("data") or {}}
        if task.get("total_annotations") or task.get("is_labeled"):
            labeled.add(int(task["id"]))
        _record_labels(state, task)
        if len(tasks) % LISTING_PROGRESS_EVERY == 0:
            report(listed=len(tasks))
    indexed = state.vectors.ids()
    # Tasks a webhook announced while we listed (Label Studio may list them only later) stay.
    arrived = (indexed - indexed_before) | (state.tasks.ids() - tasks_before)
    state.replace_tasks(set(tasks) | arrived, labeled | (state.labeled.ids() - labeled_before))
    gone = sorted(known_before - set(tasks))  # vectors, failures and priorities go too
    state.remove_tasks(gone)
    failures = state.failures.all()
    if retry_failed:
        state.failures.clear(f.task_id for f in failures)
        skip = set()
    else:
        skip = {f.task_id for f in failures if f.final}
    if not retry_failed:
        # An automatic sync during an import leaves queued tasks to their jobs; a person's sync
        # (retry_failed) queues them again: their job may be gone with a dead worker, and
        # indexing is idempotent per task id.
        skip |= state.index_marks.recent(QUEUED_MARK_MAX_AGE)
    missing = [t for i, t in tasks.items() if i not in indexed and i not in skip]
    queue_index(rt, state, missing)
    state.meta.update(last_sync=time.time())
    summary = {"tasks": len(tasks), "enqueued": len(missing), "removed": len(gone)}
    log.info("project %s synced: %s", project, summary)
    return summary


def _authenticate_webhooks(rt: Runtime, project: int) -> None:
    settings = rt.settings
    if not settings.auth_enabled:
        return
    credentials = f"{settings.basic_auth_user}:{settings.basic_auth_pass}".encode()
    header = "Basic " + base64.b64encode(credentials).decode()
    try:
        if rt.ls.authenticate_webhooks(project, settings.basic_auth_user, header):
            log.info("project %s: Label Studio's webhook now sends our basic auth", project)
    except LabelStudioError as exc:  # the sync still runs; webhooks answer 401 meanwhile
        log.warning("project %s: could not add basic auth to the webhook: %s", project, exc)


def _record_labels(state: ProjectState, task: dict[str, Any]) -> None:
    """Labels given before Lookalike was connected (or missed webhooks): rare-label counts and
    label suggestions see them too."""
    for annotation in task.get("annotations") or []:
        if isinstance(annotation, dict) and annotation.get("id") is not None:
            labels = annotation_labels(annotation)
            state.labels.set(int(annotation["id"]), int(task["id"]), labels)


def queue_index(rt: Runtime, state: ProjectState, tasks: list[dict[str, Any]]) -> int:
    """Mark `tasks` as queued and enqueue their index batches; returns the number of jobs."""
    state.index_marks.mark(int(t["id"]) for t in tasks)
    return rt.jobs.index(state.project, tasks)


# ---------------------------------------------------------------------------- one batch
class TaskImageReader:
    """Pipeline reader: a batch of tasks, their images fetched through Label Studio."""

    def __init__(self, rt: Runtime, state: ProjectState, tasks: list[dict[str, Any]]) -> None:
        self.rt, self.tasks = rt, tasks
        self.image_key = image_key(rt, state)
        self.cache_dir = rt.task_files_dir / str(state.project)

    def items(self):
        return (Item(int(task["id"]), task) for task in self.tasks)

    def load(self, item: Item, draft_size: int | None) -> Image.Image:
        try:
            raw = self.rt.ls.task_image_bytes(
                item.source,
                self.image_key,
                self.rt.limits,
                self.cache_dir,
                self.rt.settings.task_cache_mb * 1024**2,
            )
        except LabelStudioError as exc:
            raise ImageLoadError("download_failed", str(exc)) from exc
        return decode_image(
            raw, self.rt.limits, draft_size=draft_size, name=f"task {item.key} image"
        )


class ProjectStateWriter:
    """Pipeline writer: vectors into the project's state; failures recorded per task, with
    the ones worth another try collected for a later attempt."""

    def __init__(self, state: ProjectState, attempt: int, max_attempts: int) -> None:
        self.state, self.attempt, self.max_attempts = state, attempt, max_attempts
        self.indexed = 0
        self.failed = 0
        self.retry: list[dict[str, Any]] = []
        self.outage = False  # some retried task got no answer at all

    def write(self, items: list[Item], vectors: np.ndarray) -> None:
        try:
            self.state.put_vectors([item.key for item in items], vectors, only_known=True)
        except UnavailableError as exc:  # the vector database is down: retried when back
            for item in items:
                self.fail(item, exc)
            return
        self.indexed += len(items)

    def fail(self, item: Item, error: Exception) -> None:
        if isinstance(error, ImageLoadError):
            reason, message = error.reason, str(error)
        elif isinstance(error, UnavailableError):
            reason, message = "vector_db_unavailable", str(error)
        else:  # a bug or an unexpected library error: that task fails, not its batch
            reason, message = "error", f"error: {type(error).__name__}: {error}"
        outage = reason in OUTAGE_REASONS
        limit = len(LABEL_STUDIO_OUTAGE_RETRY_DELAYS) + 1 if outage else self.max_attempts
        final = reason not in TRANSIENT_REASONS or self.attempt >= limit
        self.state.failures.record(item.key, message, self.attempt, final)
        self.failed += 1
        if not final:
            self.retry.append(item.source)
            self.outage |= outage
        log.warning(
            "project %s task %s failed (attempt %d): %s",
            self.state.project,
            item.key,
            self.attempt,
            message,
        )

    def flush(self) -> None:
        pass  # every write is already one Redis transaction


def index_batch(
    rt: Runtime,
    project: int,
    tasks: list[dict[str, Any]],
    attempt: int = 1,
    report: Report = _no_report,
) -> dict[str, int]:
    """Fetch, embed and store a batch of tasks; record per-task failures and retry bounded."""
    state = rt.state(project)
    model = rt.embedder()
    try:
        state.meta.claim_model(model.spec, model.dim)
    except ModelConflictError as exc:
        state.meta.update(error=str(exc))  # shown by index-status, the search page and `status`
        raise
    # Tasks deleted since this job was queued (TASKS_DELETED, a resync) must not come back.
    tasks = [t for t in tasks if int(t["id"]) in state.tasks]
    writer = ProjectStateWriter(state, attempt, rt.settings.max_attempts)
    try:
        state.vectors.ping()
    except UnavailableError as exc:  # no vector database: wait for it instead of embedding
        for task in tasks:
            writer.fail(Item(int(task["id"]), task), exc)
        record_indexing(rt.redis, 0, writer.failed, None)
    else:
        done = 0

        def progress(count: int) -> None:
            nonlocal done
            done += count
            report(fetched=done, batch=len(tasks), attempt=attempt)

        reader = TaskImageReader(rt, state, tasks)
        result = run_pipeline(reader, model, writer, progress=progress)
        record_indexing(rt.redis, writer.indexed, writer.failed, result.embed_seconds or None)
        retrying = {int(t["id"]) for t in writer.retry}
        state.index_marks.unmark(int(t["id"]) for t in tasks if int(t["id"]) not in retrying)
    if writer.retry:
        delays = LABEL_STUDIO_OUTAGE_RETRY_DELAYS if writer.outage else DOWNLOAD_RETRY_DELAYS
        delay = delays[min(attempt, len(delays)) - 1]
        rt.jobs.retry_index(project, writer.retry, attempt + 1, delay)
    report(indexed=writer.indexed, failed=writer.failed)
    return {"indexed": writer.indexed, "failed": writer.failed, "retrying": len(writer.retry)}


def image_key(rt: Runtime, state: ProjectState) -> str:
    """The task data key of the project's image (cached in the project's metadata)."""
    meta = state.meta.get()
    if "image_key" in meta:
        return meta["image_key"]
    _, key = image_field(rt.ls.project(state.project)["label_config"])
    state.meta.update(image_key=key)
    return key


def remove_tasks(rt: Runtime, project: int, task_ids: list[int]) -> int:
    rt.state(project).remove_tasks(task_ids)
    return len(task_ids)
