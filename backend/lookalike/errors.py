"""One error hierarchy, a few families, each with the HTTP status it maps to.

Every layer raises these (or subclasses); the web layer maps them to JSON once
(`lookalike.web.app`), and the CLI prints them as one line. Anything else that escapes is a bug
and answers 500 without details.
"""

from __future__ import annotations


class LookalikeError(Exception):
    """Base of every error Lookalike raises on purpose. `http_status` says whose fault it is;
    `retry_after` (seconds), when set, says when trying again makes sense."""

    http_status = 500
    retry_after: int | None = None


class BadRequestError(LookalikeError, ValueError):
    """The caller's request is unusable (a missing field, a bad value, an empty query)."""

    http_status = 400


class NotFoundError(LookalikeError, LookupError):
    """The thing asked for does not exist (a task, a project Lookalike does not know)."""

    http_status = 404


class ConflictError(LookalikeError):
    """The request clashes with the current state (no index yet, another model's vectors)."""

    http_status = 409


class InputError(BadRequestError):
    """An image or other input the caller sent could not be used."""


class UpstreamError(LookalikeError):
    """A service Lookalike depends on (Label Studio, a task's image host) failed or refused.

    `status` is the upstream HTTP status when there was one."""

    http_status = 502

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UnavailableError(LookalikeError):
    """Lookalike's own backing store (Redis, the vector database) cannot be reached now."""

    http_status = 503


class BusyError(UnavailableError):
    """Every search slot of this process is taken: the caller should retry shortly."""

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ModelError(LookalikeError):
    """The embedding model cannot be loaded or cannot do what was asked."""

    http_status = 500
