"""The search page (`/`) and the JSON endpoints only it uses (projects, thumbnails, jobs).

The browser never sees Label Studio's API key: projects, task images and tabs are reached by
this process with its own credentials, and images come back as re-encoded JPEG thumbnails.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, render_template, request

from lookalike import __version__
from lookalike.service import status
from lookalike.web.context import services

blueprint = Blueprint(
    "page",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/assets",
)


@blueprint.get("/")
def index():
    response = Response(render_template("index.html", version=__version__))
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.get("/api/projects")
def projects():
    """Label Studio's projects (id, title, task count) with this backend's index status."""
    return jsonify(services().projects.overview())


@blueprint.get("/api/projects/<int:project>/tasks/<int:task_id>/thumbnail")
def thumbnail(project: int, task_id: int):
    body = services().thumbnails.get(project, task_id, request.args.get("size", "256"))
    response = Response(body, mimetype="image/jpeg")
    response.headers["Cache-Control"] = "private, max-age=600"
    return response


@blueprint.get("/api/jobs")
def jobs():
    return jsonify(status.jobs_overview(services().rt))
