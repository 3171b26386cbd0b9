"""The search page (`/`) and the JSON endpoints only it uses (projects, thumbnails, jobs).

The browser never sees Label Studio's API key: projects, task images and tabs are reached by
this process with its own credentials, and images come back as re-encoded JPEG thumbnails.
"""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, render_template, request

from lookalike import __version__
from lookalike.service import status
from lookalike.web import access
from lookalike.web.context import json_body, services

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


@blueprint.route("/api/session", methods=["GET", "POST", "DELETE"])
def session():
    """Sign in (POST {"token": "<your Label Studio token>"}), who am I (GET), sign out."""
    svc = services()
    if request.method == "POST":
        identity = svc.auth.identify(str(json_body().get("token") or ""))
        response = jsonify(user={"id": identity.user_id, "email": identity.email})
        response.set_cookie(
            access.SESSION_COOKIE,
            svc.sessions.start(identity),
            max_age=svc.sessions.seconds,
            httponly=True,
            samesite="Strict",
            secure=request.is_secure,
        )
        return response
    if request.method == "DELETE":
        svc.sessions.end(request.cookies.get(access.SESSION_COOKIE, ""))
        response = jsonify(signed_out=True)
        response.delete_cookie(access.SESSION_COOKIE)
        return response
    identity = access.current_identity() if svc.rt.settings.auth_enabled else None
    if svc.rt.settings.auth_enabled and identity is None:
        return jsonify(error="not signed in", auth=True), 401
    user = {"id": identity.user_id, "email": identity.email} if identity else None
    return jsonify(user=user, auth=svc.rt.settings.auth_enabled)


@blueprint.get("/api/projects")
def projects():
    """Label Studio's projects (id, title, task count) with this backend's index status: the
    ones the signed-in user can open."""
    identity = g.get("identity")
    visible = services().auth.projects(identity) if identity is not None else None
    return jsonify(services().projects.overview(visible))


@blueprint.get("/api/projects/<int:project>/tasks/<int:task_id>/thumbnail")
def thumbnail(project: int, task_id: int):
    body = services().thumbnails.get(project, task_id, request.args.get("size", "256"))
    response = Response(body, mimetype="image/jpeg")
    response.headers["Cache-Control"] = "private, max-age=600"
    return response


@blueprint.get("/api/jobs")
def jobs():
    identity = g.get("identity")
    visible = services().auth.projects(identity) if identity is not None else None
    return jsonify(status.jobs_overview(services().rt, visible))
