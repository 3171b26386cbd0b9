"""Coverage mode for "Label All Tasks": every annotator sees one task of every kind of image
before a second of any.

Label Studio's Uncertainty sampling already orders tasks first by how many tasks the annotator
labeled in each task's prediction `cluster`, then by prediction score (lowest first). Coverage
mode fills both: the project's vectors are clustered (k-means, k from the project's size or
set), and each task's Lookalike prediction carries its cluster and a score in [0, 1) that puts
the most typical task of a cluster first. A task queued by a find-similar request keeps its
negative score and gets a cluster of its own (`queueing.request_cluster`): nobody has labeled
in it, so the annotator's own request still comes first.

A job applies it (`apply`): it clusters again when the project grew by a quarter since, else
assigns new tasks to the stored centres, and writes predictions only where a task's cluster
changed. Index batches start it (deduplicated) while coverage is on. Off: Lookalike removes
the clusters and scores it wrote (tasks a request queued keep theirs).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lookalike.core.coverage import assign, cluster, coverage_score
from lookalike.errors import BadRequestError
from lookalike.service.queueing import ownership, point_project_at_lookalike
from lookalike.service.runtime import Runtime
from lookalike.service.state.vectors import gather

log = logging.getLogger(__name__)

RECLUSTER_GROWTH = 1.25
RUN_SECONDS = 1800


def settings_of(rt: Runtime, project: int) -> dict[str, Any]:
    meta = rt.state(project).meta.get()
    return {
        "enabled": meta.get("coverage") == "on",
        "k": int(meta.get("coverage_k") or 0) or None,
        "clusters": int(meta.get("coverage_clusters") or 0),
        "error": meta.get("coverage_error") or None,
    }


def configure(rt: Runtime, project: int, enabled: Any, k: Any = None) -> dict[str, Any]:
    """Turn coverage mode on or off (k: clusters, or None for automatic); starts the job."""
    if not isinstance(enabled, bool):
        raise BadRequestError("enabled is true or false")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 1000):
        raise BadRequestError("k is an integer from 2 to 1000, or null for automatic")
    state = rt.state(project)
    state.meta.update(coverage="on" if enabled else "off", coverage_k=k or 0)
    state.coverage.forget_centroids()  # a new k, or back on later: cluster afresh
    start(rt, project)
    return settings_of(rt, project)


def start(rt: Runtime, project: int) -> None:
    """Queue `apply` unless one is already queued or running."""
    if rt.state(project).coverage.claim_run(RUN_SECONDS):
        rt.jobs.coverage(project)


def apply(rt: Runtime, project: int) -> dict[str, int]:
    state = rt.state(project)
    state.coverage.release_run()  # changes from now on start another run
    mode = settings_of(rt, project)
    if not mode["enabled"]:
        return {"cleared": _clear(rt, project)}
    ranked, note = ownership(rt.settings, rt.ls, project)
    if not ranked:
        state.meta.update(coverage_error=f"coverage mode needs Lookalike's predictions: {note}")
        return {"written": 0}
    ids, vectors = gather(state.vectors.iter_batches())
    if not len(ids):
        return {"written": 0}
    centroids, clustered_at = state.coverage.centroids()
    if centroids is None or len(ids) >= RECLUSTER_GROWTH * clustered_at:
        grouping = cluster(vectors, mode["k"])
        state.coverage.set_centroids(grouping.centroids, len(ids))
    else:
        grouping = assign(vectors, centroids)
    written = _write(rt, project, ids, grouping.labels,
                     coverage_score(grouping.labels, grouping.typicality))
    state.meta.update(coverage_clusters=grouping.k, coverage_error="")
    if written:
        point_project_at_lookalike(rt.settings, rt.ls, project)
    log.info("project %s: coverage over %d clusters, %d predictions written", project,
             grouping.k, written)
    return {"written": written, "clusters": grouping.k}


def _write(rt: Runtime, project: int, ids: np.ndarray, labels: np.ndarray,
           scores: np.ndarray) -> int:
    state, ls = rt.state(project), rt.ls
    queued = state.priorities.scores(ids.tolist())  # a request's matches keep their place
    written_before = state.coverage.assigned()
    prediction_ids = state.priorities.prediction_ids(ids.tolist())
    written = 0
    with state.locks.priority():
        for task, label, score in zip(ids.tolist(), labels.tolist(), scores.tolist(),
                                      strict=True):
            if task in queued or written_before.get(task) == label:
                continue
            prediction = ls.put_prediction(task, score, rt.settings.model_version,
                                           prediction_ids.get(task), cluster=int(label))
            state.priorities.set_prediction(task, prediction)
            state.coverage.set_assigned(task, int(label))
            written += 1
    return written


def _clear(rt: Runtime, project: int) -> int:
    """Coverage off: its predictions go back to "no priority" (score 0, no cluster)."""
    state, ls = rt.state(project), rt.ls
    assigned = state.coverage.assigned()
    queued = state.priorities.scores(list(assigned))
    prediction_ids = state.priorities.prediction_ids(list(assigned))
    with state.locks.priority():
        for task in assigned:
            if task not in queued and task in prediction_ids:
                ls.delete_prediction(prediction_ids[task])
                state.priorities.remove([task])
    state.coverage.delete()
    state.meta.update(coverage_clusters=0)
    return len(assigned)
