"""The search page (`/`) and the JSON endpoints only it uses (projects, thumbnails, jobs).

The browser never sees Label Studio's API key: projects, task images and tabs are reached by
this process with its own credentials, and images come back as re-encoded JPEG thumbnails.
"""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, redirect, render_template, request, url_for

from lookalike import __version__
from lookalike.service import status
from lookalike.service.auth import NotSignedInError
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
    if services().rt.settings.auth_enabled and g.get("identity") is None:
        return render_template("signin.html", error=None), 401
    response = Response(render_template("index.html", version=__version__))
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.route("/api/session", methods=["GET", "POST", "DELETE"])
def session():
    """Sign in (POST {"token": "<your Label Studio token>"}), who am I (GET), sign out."""
    svc = services()
    if request.method == "POST":
        # From the sign-in page's plain HTML form, or JSON from the page's script.
        from_form = request.mimetype == "application/x-www-form-urlencoded"
        token = request.form.get("token") if from_form else json_body().get("token")
        try:
            identity = svc.auth.identify(str(token or ""))
        except NotSignedInError as exc:
            if not from_form:
                raise
            return render_template("signin.html", error=str(exc)), 401
        if from_form:
            response = redirect(url_for("page.index"), 303)
        else:
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
        if svc.rt.settings.auth_enabled and access.current_identity() is None:
            raise NotSignedInError("not signed in")
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
