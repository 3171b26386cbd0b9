"""Who may call what, decided once per request before any route runs (README: "Security").

- `/health` is open (Label Studio and load balancers probe it).
- The ML-backend protocol (`/setup`, `/predict`, `/webhook`, `/versions`) is Label Studio's:
  HTTP basic auth with BASIC_AUTH_USER / BASIC_AUTH_PASS.
- `/metrics` is open, or needs `Bearer LOOKALIKE_METRICS_TOKEN` when that is set.
- `/` answers 401 with a sign-in form until one signs in (`/api/session`, with one's Label
  Studio token); the page's assets need a session too.
- Every other route acts for a Label Studio user: their token (`Authorization: Token ...` or
  `Bearer ...`, or a session cookie from signing in), and a project only if Label Studio lets
  that user open it. Searches, queueing, syncs and thumbnails are rate-limited per user.
- With no BASIC_AUTH_* configured, only loopback clients are served at all.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress

from flask import Flask, g, jsonify, request

from lookalike.service.auth import (
    ForbiddenError,
    Identity,
    NotSignedInError,
)
from lookalike.web.context import services

SESSION_COOKIE = "lookalike_session"
OPEN = {"protocol.health", "page.session"}  # signing in is how credentials arrive
SIGN_IN_PAGE = {"page.index"}  # 401 with the sign-in form until signed in
LABEL_STUDIO = {"protocol.setup", "protocol.predict", "protocol.webhook", "protocol.versions"}
METRICS = {"api.metrics"}
# Rate-limit kind per route (per user and minute; thumbnails have their own, larger budget).
EXPENSIVE = {
    "api.similar": "search",
    "api.queue": "search",
    "api.sync": "search",
    "api.reindex": "search",
    "api.duplicates": "search",
    "api.coverage_configure": "search",
    "page.thumbnail": "thumbnail",
}
NO_AUTH_HELP = (
    "Lookalike has no authentication configured, so it answers only on this machine "
    "(loopback). Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and give them to Label Studio's "
    "Connect Model dialog); see the README's Security section."
)


def install(app: Flask) -> None:
    app.before_request(_check)


def _check():
    endpoint = request.endpoint or ""
    settings = services().rt.settings
    if endpoint == "protocol.health":
        return None
    if not settings.auth_enabled:
        if not _loopback(request.remote_addr):
            raise ForbiddenError(NO_AUTH_HELP)
        return None
    if endpoint in OPEN:
        return None
    if endpoint in LABEL_STUDIO:
        return _label_studio_only()
    if endpoint in METRICS:
        if settings.metrics_token and not _bearer_matches(settings.metrics_token):
            raise NotSignedInError("/metrics needs Authorization: Bearer <LOOKALIKE_METRICS_TOKEN>")
        return None
    identity = current_identity()
    if identity is None and endpoint in SIGN_IN_PAGE:
        return None  # the route answers 401 with the sign-in form
    if identity is None:
        raise NotSignedInError(
            "sign in on the search page, or send your Label Studio token "
            "(Authorization: Token <token>)"
        )
    g.identity = identity
    project = (request.view_args or {}).get("project")
    if project is not None and not services().auth.can_open(identity, int(project)):
        raise ForbiddenError(f"you cannot open project {project} in Label Studio")
    kind = EXPENSIVE.get(endpoint)
    if kind:
        limit = settings.thumbnail_rate_limit if kind == "thumbnail" else settings.rate_limit
        services().rate_limiter.check(identity.key, kind, limit)
    return None


def current_identity() -> Identity | None:
    """The Label Studio user of this request: an Authorization header, or a session cookie."""
    scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
    if scheme in ("Token", "Bearer") and token:
        return services().auth.identify(token)
    session = request.cookies.get(SESSION_COOKIE, "")
    return services().sessions.get(session) if session else None


def _label_studio_only():
    settings = services().rt.settings
    header = request.headers.get("Authorization", "")
    expected = base64.b64encode(
        f"{settings.basic_auth_user}:{settings.basic_auth_pass}".encode()
    ).decode()
    if header.startswith("Basic ") and hmac.compare_digest(header[6:].strip(), expected):
        return None
    response = jsonify(error="Label Studio's credentials (BASIC_AUTH_USER/PASS) are required")
    response.headers["WWW-Authenticate"] = 'Basic realm="lookalike"'
    return response, 401


def _bearer_matches(token: str) -> bool:
    scheme, _, given = (request.headers.get("Authorization") or "").partition(" ")
    return scheme == "Bearer" and hmac.compare_digest(given.strip(), token)


def _loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False

