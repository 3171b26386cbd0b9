"""Putting matches in front of annotators: a Data Manager tab per request, and priority for
"Label All Tasks", latest request first.

Label Studio 1.23 gives one prediction score per task (the project's model version's), used
both by the Data Manager's "prediction score" ordering and by "Uncertainty sampling", which
serves the LOWEST score first. So each matched task gets one Lookalike prediction (empty result)
whose score encodes *which request matched it last* and *how well*:

    score = -(request + similarity)     (request = 1, 2, 3, ... per project; similarity in [0, 1))

so the Data Manager's "Prediction score" column reads -R.SS: request R, similarity 0.SS. Every
request has its own band (-(R + 1), -R], below all earlier ones: "Label All Tasks" serves the latest
request's matches first, best first; then the request before it, and so on; tasks nobody matched
come last. A task matched again is served with its most recent request. Each request's tab holds
exactly its matches, sorted by that score: the newest tab is in its own similarity order, and in
an older tab the matches a later request also found come first (they are served with it).

The tab sorts by our scores only while the project's model version is Lookalike's, so it is
pointed there (and switched to Uncertainty sampling) only when that hides nobody's
pre-annotations: if the project shows another model version, or holds predictions of other
versions, Lookalike writes no prediction, keeps to a tab in task id order, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lookalike.config import Settings
from lookalike.core.store import Hit
from lookalike.errors import BadRequestError
from lookalike.service.indexing import image_key
from lookalike.service.ls_client import LabelStudioClient, LabelStudioError
from lookalike.service.runtime import Runtime
from lookalike.service.state import ProjectState
from lookalike.service.suggestions import suggest_for

log = logging.getLogger(__name__)

UNCERTAINTY = "Uncertainty sampling"
# A request's band is [0, 1) wide: similarities up to MAX_SIMILARITY show as themselves;
# negative ones (rare for real models, common for random weights) keep their order squeezed
# into [0, NEGATIVE_SPAN), so that no two matches tie.
MAX_SIMILARITY = 0.9999
NEGATIVE_SPAN = 1e-4
BY_SCORE = ["tasks:predictions_score"]
BY_ID = ["tasks:id"]


@dataclass
class QueueResult:
    title: str
    task_ids: list[int]
    view_id: int | None
    priority: bool
    message: str


def request_cluster(task_id: int) -> int:
    """The prediction cluster of a task queued by a request: its own (negative: never one of
    coverage mode's 0..k-1), so nobody has labeled in it and it is served with the first."""
    return -int(task_id)


def priority_score(request: int, similarity: float) -> float:
    """The prediction score that puts a match of `request` (1, 2, ...) in its place."""
    similarity = min(MAX_SIMILARITY, max(-1.0, float(similarity)))
    if similarity < NEGATIVE_SPAN:
        similarity = NEGATIVE_SPAN * (similarity + 1.0) / (1.0 + NEGATIVE_SPAN)
    return round(-(float(request) + similarity), 9)


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


def ownership(settings: Settings, ls: LabelStudioClient, project: int) -> tuple[bool, str]:
    """Whether the project's model version may point at Lookalike's predictions: only when that
    hides nobody's pre-annotations. Returns (allowed, why not)."""
    ours = settings.model_version
    current = ls.project(project).get("model_version") or ""
    # Connecting a backend sets the project's model version to the backend's title: that is us.
    our_titles = {b.get("title") for b in ls.ml_backends(project) if b.get("model_version") == ours}
    if current and current != ours and current not in our_titles:
        return False, (
            f"project shows predictions of model version '{current}'; left it alone so its "
            f"pre-annotations stay visible (tab only, in task id order)"
        )
    others = [v for v in ls.prediction_versions(project) if v != ours and v not in our_titles]
    if others:
        return False, (
            f"project has predictions of other model versions ({', '.join(others[:3])}); "
            f"switching would hide them (tab only, in task id order)"
        )
    return True, ""


def point_project_at_lookalike(settings: Settings, ls: LabelStudioClient, project: int) -> bool:
    """Make the project's model version Lookalike's (the tab sorts by our scores), and switch on
    Uncertainty sampling unless turned off. Done after the predictions exist: Label Studio
    refuses a model version that has none. Returns whether sampling is on."""
    info = ls.project(project)
    changes: dict[str, str] = {}
    if info.get("model_version") != settings.model_version:
        changes["model_version"] = settings.model_version
    if settings.set_sampling and info.get("sampling") != UNCERTAINTY:
        changes["sampling"] = UNCERTAINTY
    if changes:
        ls.update_project(project, **changes)
        log.info("project %s: %s", project, changes)
    return settings.set_sampling or info.get("sampling") == UNCERTAINTY


def queue_matches(
    rt: Runtime, project: int, hits: list[Hit], title: str, suggest: str | None = None
) -> QueueResult:
    """Show `hits` (best first) in the tab `title` (created or updated), as the latest request;
    their predictions pre-select a suggested label where the config has Choices (`suggest`: the
    label a person chose for all of them)."""
    settings, ls, state = rt.settings, rt.ls, rt.state(project)
    task_ids = [h.id for h in hits]
    ranked, priority, note, suggested = False, False, "", ""
    if hits:
        try:
            ranked, note = ownership(settings, ls, project)
            if suggest is not None and not ranked:
                raise BadRequestError(f"cannot suggest labels here: {note}")
            if ranked:
                config = ls.project(project).get("label_config") or ""
                results, suggested = suggest_for(rt, project, config, task_ids, suggest)
                _write_priorities(settings, state, ls, hits, results)
                priority = point_project_at_lookalike(settings, ls, project)
                if not priority:
                    note = (
                        "priority for 'Label All Tasks' is off (LOOKALIKE_SET_SAMPLING=false; "
                        "set the project's sampling to Uncertainty sampling to use it)"
                    )
        except LabelStudioError as exc:
            note = f"could not set priority: {exc}"
    ordering = BY_SCORE if ranked else BY_ID
    # The pictures first: an annotator needs the image, the task id and (ranked) the score.
    visible = ("tasks:id", f"tasks:data.{image_key(rt, state)}")
    visible += ("tasks:predictions_score",) if ranked else ()
    view_id = ls.upsert_view(project, title, task_ids, ordering, state.views.get(title), visible)
    state.views.set(title, view_id)
    message = f"{len(task_ids)} similar unlabeled tasks queued in tab '{title}'"
    message += f"; {note}" if note else ("; 'Label All Tasks' serves them next" if hits else "")
    message += f"; {suggested}" if suggested else ""
    return QueueResult(title, task_ids, view_id, priority, message)


def _write_priorities(
    settings: Settings,
    state: ProjectState,
    ls: LabelStudioClient,
    hits: list[Hit],
    results: dict[int, list[dict]],
) -> None:
    """One Lookalike prediction per task, scored as this request's match (see the module)."""
    # One writer per project: a request's number and its scores land together, in order.
    with state.locks.priority():
        request = state.priorities.next_request()
        prediction_ids = state.priorities.prediction_ids(h.id for h in hits)
        for hit in hits:
            score = priority_score(request, hit.score)
            prediction_id = ls.put_prediction(
                hit.id,
                score,
                settings.model_version,
                prediction_ids.get(hit.id),
                results.get(hit.id),
                # A cluster of its own: Uncertainty sampling counts the annotator's labels per
                # cluster first, so a match never waits behind coverage mode's clusters.
                cluster=request_cluster(hit.id),
            )
            # Recorded per task as we go, so a failure halfway never leaves a duplicate behind.
            state.priorities.set(hit.id, prediction_id, score)
