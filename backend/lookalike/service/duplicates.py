"""Near-duplicate groups of a project's tasks, a "Near-duplicates" tab of the redundant copies,
and the groups whose members carry different labels.

Grouping reads every vector of the project (from Redis or Milvus) and runs in a worker job
(`core.duplicates`: seconds at 100k tasks, minutes at 1M); the API returns the latest result
and starts a new one when the project changed since. Of each group one task is kept: the
labeled one if any (the lowest labeled id), else the lowest id. The others are the redundant
copies, listed in the tab for people to review, skip or delete with Label Studio's own actions:
Lookalike never deletes tasks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lookalike.core.duplicates import near_duplicate_groups
from lookalike.errors import BadRequestError
from lookalike.service.indexing import image_key
from lookalike.service.queueing import BY_ID
from lookalike.service.runtime import Runtime
from lookalike.service.state.vectors import gather

log = logging.getLogger(__name__)

TAB = "Near-duplicates"
TAB_LIMIT = 2000  # tasks listed in the tab (its filter is one item per task)
RUN_SECONDS = 3600  # how long a started grouping blocks another at the same threshold
# Defaults by model family, where no LOOKALIKE_DUPLICATE_THRESHOLD is set. timm (ImageNet
# features) measured here with EfficientNet-Lite0 on scikit-image photos: augmented copies
# (crop, mirror, colour, JPEG q60) score 0.785-0.88 with their originals, distinct photos at
# most 0.47, the two views of the stereo motorcycle 0.90. CLIP embeddings sit closer together
# (unrelated photos often 0.5-0.7): 0.92, the usual near-duplicate cut for CLIP, not measured
# here (no CLIP weights offline).
DEFAULT_THRESHOLDS = {"timm": 0.75, "open_clip": 0.92}
MAX_PAGE_SIZE = 500


def default_threshold(rt: Runtime, project: int) -> float:
    if rt.settings.duplicate_threshold > 0:
        return rt.settings.duplicate_threshold
    model = rt.state(project).meta.get().get("model") or rt.settings.model
    return DEFAULT_THRESHOLDS.get(model.split(":", 1)[0], 0.92)


def parse_threshold(raw: str | None, rt: Runtime, project: int) -> float:
    if raw in (None, ""):
        return default_threshold(rt, project)
    try:
        value = round(float(raw), 4)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise BadRequestError("threshold is a cosine in (0, 1], e.g. 0.95")
    return value


def compute(rt: Runtime, project: int, threshold: float) -> dict[str, Any]:
    """Group the project's vectors now; store the report and refresh the tab (a worker job)."""
    state = rt.state(project)
    try:
        change = state.vectors.last_change_id()  # first: a later change makes it stale
        ids, vectors = gather(state.vectors.iter_batches())
        grouping = near_duplicate_groups(ids, vectors, threshold)
        labeled = state.labeled.ids()
        labels = state.labels.by_task()
        groups, conflicting = [], []
        for group in grouping.groups:
            members = list(group.task_ids)
            keep = min((t for t in members if t in labeled), default=members[0])
            carried = {t: sorted(labels[t]) for t in members if labels.get(t)}
            entry = {"task_ids": members, "max_score": group.max_score, "keep": keep,
                     "labels": {str(t): v for t, v in carried.items()}}
            groups.append(entry)
            if len({tuple(v) for v in carried.values()}) > 1:
                conflicting.append(entry)
        report = {
            "threshold": threshold, "change": change, "computed_at": time.time(),
            "seconds": round(grouping.seconds, 3), "vectors": grouping.vectors,
            "index": grouping.index, "groups": groups, "conflicting": conflicting,
        }
        redundant = sorted(t for g in groups for t in g["task_ids"] if t != g["keep"])
        _show_tab(rt, project, redundant[:TAB_LIMIT])  # first: a current report has its tab
        state.duplicates.set(report)
        log.info("project %s: %d near-duplicate groups at %.3f (%d vectors, %.1f s)", project,
                 len(groups), threshold, grouping.vectors, grouping.seconds)
        return {"groups": len(groups), "redundant": len(redundant), "seconds": grouping.seconds}
    finally:
        state.duplicates.release_run(threshold)


def _show_tab(rt: Runtime, project: int, task_ids: list[int]) -> None:
    state = rt.state(project)
    visible = ("tasks:id", f"tasks:data.{image_key(rt, state)}", "tasks:annotations_results")
    view_id = rt.ls.upsert_view(project, TAB, task_ids, BY_ID, state.views.get(TAB), visible)
    state.views.set(TAB, view_id)


def refresh(rt: Runtime, project: int) -> None:
    """After new tasks were indexed: group again at the threshold last asked for, if any (one
    run at a time), so the report and the tab follow the project without being asked."""
    state = rt.state(project)
    threshold = state.duplicates.threshold()
    if threshold is not None and state.duplicates.claim_run(threshold, RUN_SECONDS):
        rt.jobs.duplicates(project, threshold)


def report(rt: Runtime, project: int, threshold: float, page: int = 1,
           page_size: int = 100) -> tuple[dict[str, Any], bool]:
    """(The latest report at `threshold`, one page of its groups; whether it is complete).

    Starts a grouping job when there is none at this threshold, or the project changed since;
    until the first one finishes the reply says "computing"."""
    if page < 1 or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise BadRequestError(f"page >= 1 and 1 <= page_size <= {MAX_PAGE_SIZE}")
    state = rt.state(project)
    stored = state.duplicates.get()
    usable = stored is not None and stored["threshold"] == threshold
    fresh = usable and stored["change"] == state.vectors.last_change_id()
    if not fresh and state.duplicates.claim_run(threshold, RUN_SECONDS):
        rt.jobs.duplicates(project, threshold)
    if not usable:
        return {"threshold": threshold, "status": "computing"}, False
    groups = stored["groups"]
    start = (page - 1) * page_size
    return {
        "threshold": threshold,
        "status": "current" if fresh else "updating",
        "computed_at": stored["computed_at"],
        "seconds": stored["seconds"],
        "total_groups": len(groups),
        "redundant": sum(len(g["task_ids"]) - 1 for g in groups),
        "page": page,
        "page_size": page_size,
        "groups": groups[start : start + page_size],
        "conflicting": stored["conflicting"],
        "tab": TAB,
    }, True
