"""Label Studio's ML-backend protocol, minus HTTP: what /setup and /predict do, and the wire
formats (project ids, interactive regions, the reply shown to the annotator).

Label Studio waits 1 s for /health and /webhook and 3 s for /setup: those only touch Redis
(enqueue or read) and never load the model or call Label Studio.
"""

from __future__ import annotations

import logging
from typing import Any

from label_studio_sdk.label_interface import LabelInterface

from lookalike.core.query import QueryError
from lookalike.errors import BadRequestError, LookalikeError
from lookalike.service.similarity import SimilarityService, SimilarQuery

log = logging.getLogger(__name__)

STATUS_CONTROL = "lookalike_status"  # a TextArea in plugin_config.xml that shows our replies
OWN_CONTROL_PREFIX = "lookalike_"  # Lookalike's own tools in plugin_config.xml


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
    try:
        query = query_from_regions(int(task["id"]), regions)
        _, outcome = service.find_and_queue(project, query, task=task, source="interactive")
        message = outcome.message
    except LookalikeError as exc:  # the annotator reads why, in the editor
        message = f"Lookalike could not search: {exc}"
        log.warning("project %s task %s: %s", project, task.get("id"), exc)
    reply = status_prediction(body.get("label_config"), message, service.rt.settings.model_version)
    return {"results": [reply]}


def query_from_regions(task_id: int, regions: list[dict[str, Any]]) -> SimilarQuery:
    """The last smart region the annotator made decides the query."""
    for region in reversed(regions):
        if not isinstance(region, dict):
            continue
        kind = str(region.get("type", "")).lower()
        value = region.get("value") or {}
        if kind == "textarea":
            texts = value.get("text") or []
            text = " ".join(t for t in texts if isinstance(t, str)).strip()
            if text:
                return SimilarQuery(task_id=task_id, text=text)
        elif kind in {"rectanglelabels", "rectangle"}:
            try:
                box = tuple(float(value.get(k, 0)) for k in ("x", "y", "width", "height"))
            except (TypeError, ValueError) as exc:
                raise QueryError("the box's x, y, width and height must be numbers") from exc
            return SimilarQuery(task_id=task_id, box=box)  # type: ignore[arg-type]
        elif kind in {"keypointlabels", "keypoint", "choices"}:
            return SimilarQuery(task_id=task_id)
    raise QueryError("draw a box, click a point or type a prompt to search")


def status_prediction(label_config: str | None, message: str, model_version: str) -> dict:
    """One prediction whose only region writes `message` into the status TextArea, if the
    labeling config has one (else the message rides along for API callers)."""
    result = []
    to_name = _status_target(label_config) if label_config else None
    if to_name:
        result.append(
            {
                "from_name": STATUS_CONTROL,
                "to_name": to_name,
                "type": "textarea",
                "value": {"text": [message]},
            }
        )
    return {"result": result, "score": 0.0, "model_version": model_version, "message": message}


def _status_target(label_config: str) -> str | None:
    try:
        control = LabelInterface(label_config).get_control(STATUS_CONTROL)
        return control.to_name[0]
    except Exception:  # no such control, or a config the SDK cannot parse: no status region
        return None


def annotation_labels(annotation: dict[str, Any]) -> list[str]:
    """Every label an annotation's result carries (*labels / choices), but Lookalike's own."""
    labels: list[str] = []
    for region in annotation.get("result") or []:
        if str(region.get("from_name", "")).startswith(OWN_CONTROL_PREFIX):
            continue  # our own "find similar" tools are queries, not labels
        value = region.get("value") or {}
        for name, content in value.items():
            if (name.endswith("labels") or name == "choices") and isinstance(content, list):
                labels.extend(str(v) for v in content)
    return labels
