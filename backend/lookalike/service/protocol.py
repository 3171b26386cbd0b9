"""Label Studio's ML-backend protocol, minus HTTP: what /setup and /predict do, and the wire
formats (project ids, interactive regions, the reply shown to the annotator).

Label Studio waits 1 s for /health and /webhook and 3 s for /setup: those only touch Redis
(enqueue or read) and never load the model or call Label Studio.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from lookalike.core.embedding import TextNotSupportedError
from lookalike.core.milvus_collection import VectorDBUnavailableError
from lookalike.core.query import QueryError
from lookalike.errors import (
    BadRequestError,
    BusyError,
    ConflictError,
    LookalikeError,
    UpstreamError,
)
from lookalike.service.annotations import (
    OWN_CONTROL_PREFIX,
    annotation_labels,
    own_region_ids,
    without_own_regions,
)
from lookalike.service.queueing import queue_matches
from lookalike.service.runtime import Runtime
from lookalike.service.similarity import SimilarityService, SimilarQuery

log = logging.getLogger(__name__)

STATUS_CONTROL = "lookalike_status"  # a TextArea in plugin_config.xml that shows our replies


def parse_project_id(value: Any) -> int:
    """Label Studio sends projects as "<id>.<created_at ts>" in /setup and /predict."""
    head = str(value).split(".", 1)[0]
    if not head.isdigit():
        raise BadRequestError(f"not a Label Studio project id: {value!r}")
    return int(head)


def setup(service: SimilarityService, body: dict[str, Any]) -> dict[str, Any]:
    """Connecting a project: the first contact starts indexing it (later /setup calls, sent
    before every predict batch, must not pile up syncs)."""
    rt = service.rt
    project = parse_project_id(body.get("project"))
    if rt.state(project).locks.claim_first_sync():
        rt.jobs.sync(project)
    return {"model_version": rt.settings.model_version}


def predict(service: SimilarityService, body: dict[str, Any]) -> dict[str, Any]:
    """Interactive find-similar. Context-less calls (a task opened, "Retrieve Predictions")
    search nothing and return an empty list per task, so no prediction is stored."""
    tasks = body.get("tasks") or []
    params = body.get("params") or {}
    context = params.get("context") if isinstance(params, dict) else None
    regions = context.get("result") if isinstance(context, dict) else None
    if not regions:
        return {"results": [[] for _ in tasks]}
    project = parse_project_id(body.get("project"))
    if not tasks or not isinstance(tasks[0], dict) or "id" not in tasks[0]:
        raise BadRequestError("an interactive /predict needs the task it was made on")
    task = tasks[0]
    state = service.rt.state(project)
    try:
        query = query_from_regions(int(task["id"]), regions)
        label = label_prompt(query.text)
        if label is not None:
            message = suggest_for_latest_matches(service, project, int(task["id"]), label)
        else:
            hits, outcome = service.find_and_queue(
                project, query, task=task, source="interactive"
            )
            state.latest_matches.set(int(task["id"]), outcome.title, hits)
            message = outcome.message
    except LookalikeError as exc:  # the details go to the log; the annotator reads what to do
        message = annotator_message(exc)
        log.warning("project %s task %s: could not search: %s", project, task.get("id"), exc)
    own = own_region_ids([r for r in regions if isinstance(r, dict)])
    riding = annotation_labels({"result": [r for r in regions if str(r.get("id")) in own]})
    if riding:  # one of the user's labels was selected while the query box was drawn
        labels = ", ".join(dict.fromkeys(riding))
        message += f" (the box is a query, not a '{labels}' label: it is left out when you submit)"
    replies = state.replies.add(int(task["id"]), message)
    model_version = service.rt.settings.model_version
    return {"results": [status_prediction(body.get("label_config"), replies, model_version)]}


# "label: Police car" typed in the prompt: suggest that label for the latest query's matches.
_LABEL_PROMPT = re.compile(r"^\s*label\s*:\s*(?P<label>\S.*?)\s*$", re.IGNORECASE | re.DOTALL)


def label_prompt(text: str | None) -> str | None:
    """The label a `label: NAME` prompt names, or None for an ordinary text query."""
    found = _LABEL_PROMPT.match(text or "")
    return found["label"] if found else None


def suggest_for_latest_matches(
    service: SimilarityService, project: int, task_id: int, label: str
) -> str:
    """Bulk labels from the editor: the matches the task's latest query queued get a
    Lookalike prediction pre-selecting `label`, in the same tab, served first again."""
    latest = service.rt.state(project).latest_matches.get(task_id)
    if latest is None:
        raise QueryError(
            f"Find similar first (a box, a double-click or a prompt), then type "
            f"'label: {label}' to pre-select it on the matches."
        )
    title, hits = latest
    try:
        return queue_matches(service.rt, project, hits, title, suggest=label).message
    except BadRequestError as exc:  # e.g. no such label: the annotator can fix the prompt
        raise QueryError(str(exc)) from exc


def annotator_message(exc: LookalikeError) -> str:
    """What an annotator can act on; the admin-facing details stay in the log and status."""
    if isinstance(exc, TextNotSupportedError):
        return "Text search is not available for this project's model; ask your admin."
    if isinstance(exc, QueryError):
        return str(exc)  # how to draw or type a query
    if isinstance(exc, ConflictError):
        return (
            "This project is not searchable yet (still indexing, or being reindexed); "
            "try again in a minute or ask your admin."
        )
    if isinstance(exc, UpstreamError):
        return "Lookalike could not read this task's image; ask your admin."
    if isinstance(exc, BusyError):
        return "Lookalike is busy with other searches; try again in a few seconds."
    if isinstance(exc, VectorDBUnavailableError):
        return "Lookalike's vector database is not answering; try again in a minute or ask " \
            "your admin."
    return "Lookalike could not search right now; ask your admin."


def query_from_regions(task_id: int, regions: list[dict[str, Any]]) -> SimilarQuery:
    """The query the annotator just made: the last region of Lookalike's own tools.

    Label Studio sends the new region together with earlier ones of the same tool (and, when
    one of the user's labels was selected while drawing, that label's result under the same
    region id); only Lookalike's controls count, when the sender names them."""
    for region in reversed(regions):
        if not isinstance(region, dict):
            continue
        name = str(region.get("from_name") or OWN_CONTROL_PREFIX)
        if not name.startswith(OWN_CONTROL_PREFIX) or name == STATUS_CONTROL:
            continue
        kind = str(region.get("type", "")).lower()
        value = region.get("value") or {}
        if kind == "textarea":
            texts = [t.strip() for t in value.get("text") or [] if isinstance(t, str)]
            texts = [t for t in texts if t]
            if texts:
                return SimilarQuery(task_id=task_id, text=texts[-1])  # the latest prompt
        elif kind in {"rectanglelabels", "rectangle"}:
            try:
                box = tuple(float(value.get(k, 0)) for k in ("x", "y", "width", "height"))
            except (TypeError, ValueError) as exc:
                raise QueryError("the box's x, y, width and height must be numbers") from exc
            if _is_double_click(region, box):  # type: ignore[arg-type]
                return SimilarQuery(task_id=task_id)
            return SimilarQuery(task_id=task_id, box=box)  # type: ignore[arg-type]
        elif kind in {"keypointlabels", "keypoint", "choices"}:
            return SimilarQuery(task_id=task_id)
    raise QueryError("Press M and drag a box, double-click the image, or type a prompt.")


# Label Studio's double-click makes a box of 30 x 30 screen pixels: square in image pixels
# and small. A box drawn by hand is never square to a pixel's fraction.
DOUBLE_CLICK_MAX_PERCENT = 12.0


def _is_double_click(region: dict[str, Any], box: tuple[float, float, float, float]) -> bool:
    width_px, height_px = region.get("original_width"), region.get("original_height")
    if not isinstance(width_px, int | float) or not isinstance(height_px, int | float):
        return False
    _, _, width, height = box
    if not (0 < width <= DOUBLE_CLICK_MAX_PERCENT and 0 < height <= DOUBLE_CLICK_MAX_PERCENT):
        return False
    side_w, side_h = width * width_px / 100, height * height_px / 100
    return abs(side_w - side_h) <= 0.01 * max(side_w, side_h)


def status_prediction(label_config: str | None, replies: list[str], model_version: str) -> dict:
    """One prediction whose only region lists the task's latest replies (newest first) in the
    status TextArea, if the labeling config has one (the newest rides along as `message`)."""
    result = []
    to_name = _status_target(label_config) if label_config else None
    if to_name:
        result.append(
            {
                "from_name": STATUS_CONTROL,
                "to_name": to_name,
                "type": "textarea",
                "value": {"text": replies},
            }
        )
    return {"result": result, "score": 0.0, "model_version": model_version, "message": replies[0]}


def _status_target(label_config: str) -> str | None:
    try:
        control = LabelInterface(label_config).get_control(STATUS_CONTROL)
        return control.to_name[0]
    except Exception:  # no such control, or a config the SDK cannot parse: no status region
        return None


# ---------------------------------------------------------------------------- clean-up
def clean_annotation(rt: Runtime, project: int, annotation_id: int) -> int:
    """Save the annotation without Lookalike's regions; returns how many results went."""
    annotation = rt.ls.annotation(annotation_id)  # fresh: it may have changed since the event
    result = annotation.get("result") or []
    kept = without_own_regions(result)
    if len(kept) != len(result):
        rt.ls.update_annotation_result(annotation_id, kept)
        log.info(
            "project %s annotation %s: removed %d query results",
            project,
            annotation_id,
            len(result) - len(kept),
        )
    return len(result) - len(kept)
