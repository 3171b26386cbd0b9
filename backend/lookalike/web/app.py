"""The Flask app: the ML-backend protocol, the REST API and the search page, as blueprints.

Errors are mapped to JSON once, here: every `LookalikeError` answers with its family's status
(bad request 400, not found 404, conflict 409, upstream 502, unavailable 503); anything else is
a bug and answers 500 with no details (they go to the log).
"""

from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from lookalike.errors import LookalikeError
from lookalike.service.runtime import Runtime
from lookalike.web import access, api, page, protocol
from lookalike.web.context import Services

log = logging.getLogger(__name__)


def create_app(rt: Runtime) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = rt.settings.max_request_bytes  # 413 above it
    app.extensions["lookalike"] = Services.build(rt)
    access.install(app)
    for blueprint in (protocol.blueprint, api.blueprint, page.blueprint):
        app.register_blueprint(blueprint)
    app.register_error_handler(LookalikeError, _lookalike_error)
    app.register_error_handler(redis.RedisError, _redis_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _lookalike_error(exc: LookalikeError):
    response = jsonify(error=str(exc))
    if exc.retry_after is not None:  # rate limits (429), busy search slots (503)
        response.headers["Retry-After"] = str(exc.retry_after)
    return response, exc.http_status


def _redis_error(exc: redis.RedisError):
    return jsonify(error=f"Redis unavailable: {exc}"), 503


def _http_error(exc: HTTPException):
    if exc.code == 404:
        message = f"no such endpoint: {request.method} {request.path}"
    elif exc.code == 405:
        message = f"{request.method} is not allowed on {request.path}"
    else:
        message = exc.description or exc.name
    return jsonify(error=message), exc.code or 500


def _unexpected_error(exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.path)
    return jsonify(error="internal error; see the backend's log"), 500
