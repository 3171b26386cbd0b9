"""Putting matches in front of annotators: a Data Manager tab, and priority for "Label All Tasks".

Priority works through Label Studio's own "Uncertainty sampling", which serves the task whose
prediction (of the project's model version) has the LOWEST score first. Each matched task gets
one Lookalike prediction with an empty result and `score = 1 - similarity`, so the best match is
served first and tasks without a Lookalike prediction come after every match. A task matched by
several queries keeps its best (lowest) score.

Switching the project to that sampling and model version is done only when it hides nobody's
pre-annotations: if the project already shows another model version, or holds predictions of
other versions, Lookalike keeps to tabs and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lookalike.config import Settings
from lookalike.ls_client import LabelStudioClient, LabelStudioError
from lookalike.state import ProjectState
from lookalike.store import Hit

log = logging.getLogger(__name__)

UNCERTAINTY = "Uncertainty sampling"


@dataclass
class QueueResult:
    title: str
    task_ids: list[int]
    view_id: int | None
    priority: bool
    message: str


def rare_labels(counts: dict[str, int], share: float) -> set[str]:
    """Labels whose share of all labelled examples is below `share`, or the rarest ones.

    With one label seen there is nothing rare yet. With several, a label counts as rare when it
    is the least represented (ties included) or below `share` of the label mentions.
    """
    if len(counts) < 2:
        return set()
    total = sum(counts.values())
    least = min(counts.values())
    return {
        label
        for label, count in counts.items()
        if (count == least and count < max(counts.values())) or count / total < share
    }


def priority_allowed(settings: Settings, ls: LabelStudioClient, project: int) -> tuple[bool, str]:
    """Whether serving matches first through Uncertainty sampling hides nobody's predictions."""
    if not settings.set_sampling:
        return False, "priority for 'Label All Tasks' is off (LOOKALIKE_SET_SAMPLING=false)"
    ours = settings.model_version
    current = ls.project(project).get("model_version") or ""
    # Connecting a backend sets the project's model version to the backend's title: that is us.
    our_titles = {b.get("title") for b in ls.ml_backends(project) if b.get("model_version") == ours}
    if current and current != ours and current not in our_titles:
        return False, (
            f"project shows predictions of model version '{current}'; left it alone so its "
            f"pre-annotations stay visible (tab only)"
        )
    others = [v for v in ls.prediction_versions(project) if v != ours and v not in our_titles]
    if others:
        return False, (
            f"project has predictions of other model versions ({', '.join(others[:3])}); "
            f"switching would hide them (tab only)"
        )
    return True, "'Label All Tasks' serves them next"


def switch_sampling(settings: Settings, ls: LabelStudioClient, project: int) -> None:
    """Point the project at our predictions with Uncertainty sampling (once they exist: LS
    refuses a model version that has no predictions)."""
    info = ls.project(project)
    if info.get("model_version") != settings.model_version or info.get("sampling") != UNCERTAINTY:
        ls.update_project(project, sampling=UNCERTAINTY, model_version=settings.model_version)
        log.info("project %s: Uncertainty sampling on %s", project, settings.model_version)


def queue_matches(
    settings: Settings,
    state: ProjectState,
    ls: LabelStudioClient,
    hits: list[Hit],
    title: str,
) -> QueueResult:
    """Show `hits` in the tab `title` (created or updated) and give them priority."""
    task_ids = [h.id for h in hits]
    priority, note = False, ""
    if hits:
        try:
            priority, note = priority_allowed(settings, ls, state.project)
            if priority:
                _write_priorities(settings, state, ls, hits)
                switch_sampling(settings, ls, state.project)
        except LabelStudioError as exc:
            priority, note = False, f"could not set priority: {exc}"
    ordering = ["tasks:predictions_score"] if priority else ["tasks:id"]
    view_id = ls.upsert_view(state.project, title, task_ids, ordering, state.view_id(title))
    state.set_view_id(title, view_id)
    message = f"{len(task_ids)} similar unlabeled tasks queued in tab '{title}'"
    if note:
        message += f"; {note}"
    return QueueResult(title, task_ids, view_id, priority, message)


def _write_priorities(
    settings: Settings, state: ProjectState, ls: LabelStudioClient, hits: list[Hit]
) -> None:
    """One Lookalike prediction per task, score = 1 - similarity; a task keeps its best score."""
    # Two queries matching the same task at once must not both create its prediction.
    with state.r.lock(state.k_priority_lock, timeout=120, blocking_timeout=60):
        _write_priorities_locked(settings, state, ls, hits)


def _write_priorities_locked(
    settings: Settings, state: ProjectState, ls: LabelStudioClient, hits: list[Hit]
) -> None:
    task_ids = [h.id for h in hits]
    current = state.priorities(task_ids)
    prediction_ids = state.prediction_ids(task_ids)
    for hit in hits:
        score = round(max(0.0, 1.0 - hit.score), 6)
        if hit.id in prediction_ids and current.get(hit.id, 2.0) <= score:
            continue
        prediction_id = ls.put_prediction(
            hit.id, score, settings.model_version, prediction_ids.get(hit.id)
        )
        # Recorded per task as we go, so a failure halfway never leaves a duplicate behind.
        state.set_prediction_ids({hit.id: prediction_id})
        state.set_priorities({hit.id: score})
