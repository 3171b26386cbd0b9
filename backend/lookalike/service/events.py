"""Label Studio's webhook events, turned into jobs. Only cheap Redis writes here: Label Studio
waits 1 s for the webhook."""

from __future__ import annotations

from typing import Any

from lookalike.service.annotations import own_region_ids
from lookalike.service.indexing import queue_index
from lookalike.service.runtime import Runtime


def handle_webhook(rt: Runtime, body: dict[str, Any]) -> dict[str, Any]:
    action = str(body.get("action") or "")
    project_info = body.get("project")
    if not isinstance(project_info, dict) or "id" not in project_info:
        return {"status": "ignored", "reason": "no project"}
    project = int(project_info["id"])
    handler = _HANDLERS.get(action)
    enqueued = handler(rt, project, body) if handler else 0
    return {"status": "ok", "action": action, "enqueued": enqueued}


def _tasks_created(rt: Runtime, project: int, body: dict[str, Any]) -> int:
    raw = [t for t in body.get("tasks") or [] if isinstance(t, dict) and "id" in t]
    tasks = [{"id": t["id"], "data": t.get("data") or {}} for t in raw]
    state = rt.state(project)
    state.tasks.add(t["id"] for t in tasks)  # known at once: counted, and deletable
    state.mark_labeled(t["id"] for t in raw if t.get("total_annotations"))
    return queue_index(rt, state, tasks)


def _tasks_deleted(rt: Runtime, project: int, body: dict[str, Any]) -> int:
    ids = [int(t["id"]) for t in body.get("tasks") or [] if isinstance(t, dict) and "id" in t]
    if ids:
        rt.jobs.remove(project, ids)
    return 1 if ids else 0


def _annotation_saved(rt: Runtime, project: int, body: dict[str, Any]) -> int:
    annotation = body.get("annotation") or {}
    task = body.get("task") or {}
    task_id = task.get("id") or annotation.get("task")
    if task_id is None:
        return 0
    # Excluded from searches right away, not when the job gets its turn in the queue.
    rt.state(project).mark_labeled([int(task_id)])
    result = annotation.get("result") or []
    if own_region_ids(result) and annotation.get("id") is not None:
        # Query regions are not labels: the clean-up job saves the annotation without them,
        # and Label Studio's ANNOTATION_UPDATED for that brings us back here, clean.
        rt.jobs.clean_annotation(project, int(annotation["id"]))
        return 1
    minimal = {"id": annotation.get("id"), "result": result}
    rt.jobs.auto_prioritize(project, int(task_id), minimal)
    return 1


def _annotations_bulk(rt: Runtime, project: int, body: dict[str, Any]) -> int:
    if body.get("action") == "ANNOTATIONS_DELETED":
        labels = rt.state(project).labels
        for annotation in body.get("annotations") or []:
            if isinstance(annotation, dict) and annotation.get("id") is not None:
                labels.remove(int(annotation["id"]))  # label counts go down too
    # Bulk changes: a resync relists which tasks are labeled (and repairs any drift).
    rt.jobs.sync(project)
    return 1


def _start_training(rt: Runtime, project: int, body: dict[str, Any]) -> int:
    # "Start Training" in Label Studio: a full resync that also retries failed tasks.
    rt.jobs.sync(project, retry_failed=True)
    return 1


def _project_deleted(rt: Runtime, project: int, body: dict[str, Any]) -> int:
    rt.jobs.drop(project)
    return 1


_HANDLERS = {
    "TASKS_CREATED": _tasks_created,
    "TASKS_DELETED": _tasks_deleted,
    "ANNOTATION_CREATED": _annotation_saved,
    "ANNOTATION_UPDATED": _annotation_saved,
    "ANNOTATIONS_CREATED": _annotations_bulk,
    "ANNOTATIONS_DELETED": _annotations_bulk,
    "START_TRAINING": _start_training,
    "PROJECT_DELETED": _project_deleted,
}
