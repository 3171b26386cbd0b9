"""Who is asking, and what they may do: people act with their own Label Studio rights.

A person (or a script) proves who they are with their own Label Studio token (legacy token or
personal access token), checked against Label Studio's `whoami`. A project is theirs to search,
queue, sync or see thumbnails of exactly when Label Studio lets that token open it. Answers are
cached briefly so a page full of thumbnails costs Label Studio one call, not fifty.
Browser sessions keep the token server-side (Redis); the browser holds a random session id.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass

import redis

from lookalike.errors import LookalikeError
from lookalike.service.ls_client import LabelStudioClient, LabelStudioError
from lookalike.service.runtime import Runtime

IDENTITY_TTL = 60.0  # seconds a verified token or a project answer is trusted without asking
CACHE_ITEMS = 4096
SESSION_KEY = "lookalike:session:"
RATE_KEY = "lookalike:rate:"


class NotSignedInError(LookalikeError):
    http_status = 401


class ForbiddenError(LookalikeError):
    http_status = 403


class RateLimitedError(LookalikeError):
    http_status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Identity:
    """A Label Studio user, as their own token shows them."""

    user_id: int
    email: str
    token: str

    @property
    def key(self) -> str:
        return f"user:{self.user_id}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    """Label Studio decides: whoami for the token, and whether it opens a project."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._lock = threading.Lock()
        self._clients: dict[str, LabelStudioClient] = {}
        self._answers: dict[tuple[str, str], tuple[float, object]] = {}

    def identify(self, token: str) -> Identity:
        token = token.strip()
        if not token:
            raise NotSignedInError("sign in with your Label Studio token")
        me = self._cached((_digest(token), "whoami"), lambda: self._whoami(token))
        return Identity(int(me["id"]), str(me.get("email") or ""), token)

    def can_open(self, identity: Identity, project: int) -> bool:
        return bool(
            self._cached(
                (_digest(identity.token), f"project:{project}"),
                lambda: self._opens(identity.token, project),
            )
        )

    def projects(self, identity: Identity) -> set[int]:
        """The projects Label Studio lists for this user."""
        ids = self._cached(
            (_digest(identity.token), "projects"),
            lambda: [int(p["id"]) for p in self._client(identity.token).list_projects()],
        )
        return set(ids)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ plumbing
    def _whoami(self, token: str) -> dict:
        try:
            return self._client(token).whoami()
        except LabelStudioError as exc:
            if exc.status in (401, 403):
                raise NotSignedInError("Label Studio does not accept this token") from None
            raise

    def _opens(self, token: str, project: int) -> bool:
        try:
            self._client(token).project(project)
            return True
        except LabelStudioError as exc:
            if exc.status in (401, 403, 404):
                return False
            raise

    def _client(self, token: str) -> LabelStudioClient:
        key = _digest(token)
        with self._lock:
            if key not in self._clients:
                if len(self._clients) > CACHE_ITEMS:
                    self._clients.clear()
                self._clients[key] = LabelStudioClient(self.rt.settings.label_studio_url, token)
            return self._clients[key]

    def _cached(self, key: tuple[str, str], compute):
        now = time.monotonic()
        with self._lock:
            hit = self._answers.get(key)
            if hit and hit[0] > now:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._answers) > CACHE_ITEMS:
                self._answers.clear()
            self._answers[key] = (now + IDENTITY_TTL, value)
        return value


class Sessions:
    """Browser sessions: a random id in an HttpOnly cookie, the identity in Redis, expiring."""

    def __init__(self, connection: redis.Redis, hours: float) -> None:
        self._redis = connection
        self.seconds = max(60, int(hours * 3600))

    def start(self, identity: Identity) -> str:
        session = secrets.token_urlsafe(32)
        value = json.dumps({"user_id": identity.user_id, "email": identity.email,
                            "token": identity.token})  # fmt: skip
        self._redis.set(SESSION_KEY + _digest(session), value, ex=self.seconds)
        return session

    def get(self, session: str) -> Identity | None:
        raw = self._redis.get(SESSION_KEY + _digest(session)) if session else None
        if raw is None:
            return None
        data = json.loads(raw)
        return Identity(int(data["user_id"]), data["email"], data["token"])

    def end(self, session: str) -> None:
        if session:
            self._redis.delete(SESSION_KEY + _digest(session))


class RateLimiter:
    """At most `limit` calls per minute per caller and kind (a fixed one-minute window)."""

    def __init__(self, connection: redis.Redis) -> None:
        self._redis = connection

    def check(self, caller: str, kind: str, limit: int) -> None:
        if limit <= 0:
            return
        window = int(time.time() // 60)
        key = f"{RATE_KEY}{kind}:{caller}:{window}"
        with self._redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count = pipe.execute()[0]
        if count > limit:
            retry = 60 - int(time.time() % 60)
            raise RateLimitedError(
                f"too many {kind} requests: at most {limit} a minute; try again in {retry} s",
                retry,
            )
