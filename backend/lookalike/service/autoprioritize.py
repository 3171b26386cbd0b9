"""Automatic work on every saved annotation: when it carries a rare label, the unlabeled tasks
that look most like its task are queued (tab "Rare: <label>", plus priority); and labeled tasks
whose labeled look-alikes mostly say otherwise are listed as likely mislabels."""

from __future__ import annotations

import logging
from typing import Any

from lookalike.service.annotations import annotation_labels
from lookalike.service.indexing import image_key
from lookalike.service.ls_client import LabelStudioError
from lookalike.service.queueing import BY_ID, BY_SCORE, ownership, queue_matches, rare_labels
from lookalike.service.runtime import Runtime
from lookalike.service.similarity import SimilarityService, SimilarQuery
from lookalike.service.suggestions import ChoicesControl, labeled_examples, likely_mislabels

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
    try:
        flag_mislabels(service.rt, project)
    except LabelStudioError as exc:  # the boost below still runs; the next annotation retries
        log.warning("project %s: could not update likely mislabels: %s", project, exc)
    if not settings.auto_prioritize or not labels:
        return {"queued": 0, "reason": "off" if not settings.auto_prioritize else "no labels"}
    counts = state.labels.counts()
    hit_labels = sorted(set(labels) & rare_labels(counts, settings.rare_share))
    if not hit_labels:
        return {"queued": 0, "reason": "no rare label", "counts": counts}
    if not state.vectors.get([task_id]):
        return {"queued": 0, "reason": f"task {task_id} is not indexed yet"}
    hits = service.find(
        project, SimilarQuery(task_id=task_id), k=settings.auto_k, diverse=settings.diverse
    )
    result = queue_matches(service.rt, project, hits, f"Rare: {', '.join(hit_labels)}")
    log.info("project %s: %s", project, result.message)
    return {"queued": len(result.task_ids), "labels": hit_labels, "counts": counts}


MISLABELED_TAB = "Possibly mislabeled"
MAX_MISLABEL_SCAN = 20_000  # labeled tasks compared all-pairs; above this, skipped (logged)


def flag_mislabels(rt: Runtime, project: int) -> int:
    """Labeled tasks whose labeled look-alikes mostly carry another choice: a tab listing them
    (most likely first) and, where Lookalike may write predictions, a prediction pre-selecting
    the neighbours' label with Label Studio's `mislabeling` score. Returns how many."""
    settings, ls, state = rt.settings, rt.ls, rt.state(project)
    if not settings.suggestions:
        return 0
    control = ChoicesControl.find(ls.project(project).get("label_config") or "")
    if control is None:
        return 0
    ids, vectors, labels = labeled_examples(rt, project, control)
    if len(ids) > MAX_MISLABEL_SCAN:
        log.warning("project %s: %d labeled tasks, mislabel scan skipped", project, len(ids))
        return 0
    found = likely_mislabels(ids, vectors, labels, settings.suggest_k)
    previous = state.mislabeled.ids()
    if not found and not previous:
        return 0
    ranked, _ = ownership(settings, ls, project)
    if ranked:
        with state.locks.priority():
            prediction_ids = state.priorities.prediction_ids(previous | {m.task_id for m in found})
            for m in found:
                result = [control.result([m.neighbours_say], m.score)]
                prediction = ls.put_prediction(
                    m.task_id,
                    -m.score,  # the tab sorts the most likely first
                    settings.model_version,
                    prediction_ids.get(m.task_id),
                    result,
                    mislabeling=m.score,
                )
                state.priorities.set(m.task_id, prediction, -m.score)
            for task in previous - {m.task_id for m in found}:  # fixed since: clear the flag
                if task in prediction_ids:
                    ls.put_prediction(task, 0.0, settings.model_version, prediction_ids[task])
    with state.redis.pipeline() as pipe:
        state.mislabeled.replace({m.task_id for m in found}, pipe)
        pipe.execute()
    flagged = [m.task_id for m in found]
    # The picture, the label given, and (in the prediction) the label its look-alikes carry.
    visible = ("tasks:id", f"tasks:data.{image_key(rt, state)}", "tasks:annotations_results")
    visible += ("tasks:predictions_results", "tasks:predictions_score") if ranked else ()
    view_id = ls.upsert_view(
        project,
        MISLABELED_TAB,
        flagged,
        BY_SCORE if ranked else BY_ID,
        state.views.get(MISLABELED_TAB),
        visible,
    )
    state.views.set(MISLABELED_TAB, view_id)
    log.info("project %s: %d likely mislabels", project, len(flagged))
    return len(flagged)
