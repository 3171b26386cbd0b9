"""Automatic prioritization: when an annotation carries a rare label, the unlabeled tasks that
look most like its task are queued (tab "Rare: <label>", plus priority)."""

from __future__ import annotations

import logging
from typing import Any

from lookalike.service.protocol import annotation_labels
from lookalike.service.queueing import queue_matches, rare_labels
from lookalike.service.similarity import SimilarityService, SimilarQuery

log = logging.getLogger(__name__)


def auto_prioritize(
    service: SimilarityService, project: int, task_id: int, annotation: dict[str, Any]
) -> dict[str, Any]:
    settings = service.rt.settings
    state = service.rt.state(project)
    labels = annotation_labels(annotation)
    if annotation.get("id") is not None:
        state.labels.set(int(annotation["id"]), task_id, labels)
    state.mark_labeled([task_id])
    if not settings.auto_prioritize or not labels:
        return {"queued": 0, "reason": "off" if not settings.auto_prioritize else "no labels"}
    counts = state.labels.counts()
    hit_labels = sorted(set(labels) & rare_labels(counts, settings.rare_share))
    if not hit_labels:
        return {"queued": 0, "reason": "no rare label", "counts": counts}
    if not state.vectors.get([task_id]):
        return {"queued": 0, "reason": f"task {task_id} is not indexed yet"}
    hits = service.find(project, SimilarQuery(task_id=task_id), k=settings.auto_k)
    result = queue_matches(service.rt, project, hits, f"Rare: {', '.join(hit_labels)}")
    log.info("project %s: %s", project, result.message)
    return {"queued": len(result.task_ids), "labels": hit_labels, "counts": counts}
