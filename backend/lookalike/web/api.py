"""The REST API for scripts (and the search page): search, queue, index status, sync, reindex,
metrics. Each route parses, calls one service function and returns its JSON."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lookalike.service import api, status
from lookalike.web.context import json_body, services

blueprint = Blueprint("api", __name__)


@blueprint.get("/api/projects/<int:project>/index-status")
def index_status(project: int):
    return jsonify(status.index_status(services().rt, project))


@blueprint.post("/api/projects/<int:project>/similar")
def similar(project: int):
    return jsonify(api.similar(services().similarity, project, json_body()))


@blueprint.post("/api/projects/<int:project>/queue")
def queue(project: int):
    return jsonify(api.queue_results(services().similarity, project, json_body()))


@blueprint.post("/api/projects/<int:project>/sync")
def sync(project: int):
    return jsonify(job_id=services().rt.jobs.sync(project, retry_failed=True).id), 202


@blueprint.post("/api/projects/<int:project>/reindex")
def reindex(project: int):
    return jsonify(job_id=api.reindex(services().similarity, project)), 202


@blueprint.get("/api/projects/<int:project>/duplicates")
def duplicates(project: int):
    body, complete = api.duplicates(services().similarity, project, request.args)
    return jsonify(body), 200 if complete else 202  # 202: the first grouping is running


@blueprint.get("/api/projects/<int:project>/coverage")
def coverage_settings(project: int):
    return jsonify(api.coverage(services().similarity, project))


@blueprint.put("/api/projects/<int:project>/coverage")
def coverage_configure(project: int):
    return jsonify(api.coverage(services().similarity, project, json_body())), 202


@blueprint.get("/metrics")
def metrics():
    return Response(generate_latest(services().metrics.registry), mimetype=CONTENT_TYPE_LATEST)
