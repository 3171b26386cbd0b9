"""What routes reach: the process's services, and the parsing every route shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app, request

from lookalike.errors import BadRequestError
from lookalike.service.api import Thumbnails
from lookalike.service.auth import Authenticator, RateLimiter, Sessions
from lookalike.service.metrics import WebMetrics
from lookalike.service.runtime import Runtime
from lookalike.service.similarity import SimilarityService
from lookalike.service.status import ProjectList


@dataclass
class Services:
    """Built once per app by `create_app`."""

    rt: Runtime
    similarity: SimilarityService
    metrics: WebMetrics
    projects: ProjectList
    thumbnails: Thumbnails
    auth: Authenticator
    sessions: Sessions
    rate_limiter: RateLimiter

    @classmethod
    def build(cls, rt: Runtime) -> Services:
        metrics = WebMetrics(rt.redis, rt.settings.queue_name, rt.state)
        rt.observe_query_embed = metrics.query_embed_seconds.observe
        rt.observe_search = metrics.observe_search
        similarity = SimilarityService(rt)
        return cls(
            rt,
            similarity,
            metrics,
            ProjectList(rt),
            Thumbnails(similarity),
            Authenticator(rt),
            Sessions(rt.redis, rt.settings.session_hours),
            RateLimiter(rt.redis),
        )


def services() -> Services:
    return current_app.extensions["lookalike"]


def json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequestError("expected a JSON object body")
    return body
