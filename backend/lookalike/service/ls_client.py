"""The Label Studio side: tasks, labeling configs, task files, tabs and predictions.

Built on label-studio-sdk. The API key can be a legacy token or a personal access token (a JWT
refresh token); the SDK client handles both, and file downloads get a short-lived access token.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import requests
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.label_interface import LabelInterface

from lookalike.core.images import ImageLimits, ImageLoadError, fetch_url
from lookalike.errors import BadRequestError, UpstreamError
from lookalike.service.task_files import TaskFileCache
from lookalike.timeouts import LABEL_STUDIO_TIMEOUT

log = logging.getLogger(__name__)

TASK_FIELDS = ("id", "data", "total_annotations", "is_labeled")


class LabelStudioError(UpstreamError):
    """Label Studio refused or failed a call; the message says which and why, and `status`
    holds Label Studio's HTTP status (None when it could not be reached)."""


class TaskImageError(UpstreamError):
    """A task's image could not be fetched or decoded: the project's data, not the caller, is
    at fault. `reason` is the image loader's code (download_failed, corrupt, ...)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class LabelConfigError(BadRequestError):
    """The project's labeling config is not one Lookalike can index."""


def image_field(label_config: str) -> tuple[str, str]:
    """(object tag name, task data key) of the config's first <Image>: where images live."""
    interface = LabelInterface(label_config)
    for obj in interface.objects:
        if obj.tag.lower() == "image":
            value = obj.value or ""
            return obj.name, value.lstrip("$")
    raise LabelConfigError(
        "the labeling config has no <Image> tag: Lookalike indexes image projects"
    )


def _is_jwt(token: str) -> bool:
    try:
        jwt.decode(token, options={"verify_signature": False})
        return True
    except jwt.PyJWTError:
        return False


@dataclass
class LabelStudioClient:
    url: str
    api_key: str
    timeout: float = LABEL_STUDIO_TIMEOUT

    def __post_init__(self) -> None:
        if not self.api_key:
            raise LabelStudioError(
                "LABEL_STUDIO_API_KEY is not set: copy a token from Label Studio "
                "(Account & Settings > Access Token / Personal Access Token)"
            )
        self.url = self.url.rstrip("/")
        self.sdk = LabelStudio(base_url=self.url, api_key=self.api_key, timeout=self.timeout)
        self._access: tuple[str, float] | None = None
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- auth
    def download_token(self) -> str:
        """A token file downloads accept: the legacy key, or an access token from a PAT."""
        if not _is_jwt(self.api_key):
            return self.api_key
        with self._lock:
            if self._access and self._access[1] > time.time() + 30:
                return self._access[0]
            response = requests.post(
                f"{self.url}/api/token/refresh/",
                json={"refresh": self.api_key},
                timeout=self.timeout,
            )
            if response.status_code != 200:
                raise LabelStudioError(
                    f"exchanging the personal access token failed: HTTP {response.status_code}",
                    response.status_code,
                )
            access = response.json()["access"]
            expires = jwt.decode(access, options={"verify_signature": False}).get("exp", 0)
            self._access = (access, float(expires) or time.time() + 240)
            return access

    def secrets(self) -> list[str]:
        """Every credential this client holds, for scrubbing messages shown to users."""
        return [self.api_key] + ([self._access[0]] if self._access else [])

    def scrub(self, text: str) -> str:
        """`text` with every credential this client holds replaced by '***'."""
        for secret in self.secrets():
            if secret:
                text = text.replace(secret, "***")
        return text

    def auth_headers(self) -> dict[str, str]:
        token = self.download_token()
        return {"Authorization": ("Bearer " if _is_jwt(token) else "Token ") + token}

    # ----------------------------------------------------------------- projects & tasks
    @contextmanager
    def _sdk(self, what: str) -> Iterator[None]:
        """SDK and HTTP errors become one LabelStudioError, with credentials scrubbed."""
        try:
            yield
        except LabelStudioError:
            raise
        except (ApiError, httpx.HTTPError, requests.RequestException) as exc:
            status = getattr(exc, "status_code", None)
            message = self.scrub(str(getattr(exc, "body", None) or exc))
            prefix = f"{what}: HTTP {status}" if status else what
            raise LabelStudioError(f"{prefix}: {message[:300]}", status) from exc

    def project(self, project_id: int) -> dict[str, Any]:
        with self._sdk(f"reading project {project_id}"):
            return self._dump(self.sdk.projects.get(id=project_id))

    def list_projects(self) -> Iterator[dict[str, Any]]:
        with self._sdk("listing projects"):
            pager = self.sdk.projects.list(
                page_size=100, include="id,title,task_number,num_tasks_with_annotations"
            )
            for item in pager:
                yield self._dump(item)

    def update_project(self, project_id: int, **fields: Any) -> None:
        # A raw PATCH: the SDK's typed update would send every optional field it models.
        self._request("PATCH", f"/api/projects/{project_id}", json=fields)

    def iter_tasks(self, project_id: int, page_size: int = 500) -> Iterator[dict[str, Any]]:
        with self._sdk(f"listing tasks of project {project_id}"):
            pager = self.sdk.tasks.list(project=project_id, page_size=page_size, fields="all")
            for task in pager:
                yield self._dump(task)

    def task(self, task_id: int) -> dict[str, Any]:
        with self._sdk(f"reading task {task_id}"):
            return self._dump(self.sdk.tasks.get(id=str(task_id)))

    # ----------------------------------------------------------------- files
    def task_image_bytes(
        self,
        task: dict[str, Any],
        data_key: str,
        limits: ImageLimits,
        cache_dir: Path,
        cache_bytes: int = 512 * 1024 * 1024,
    ) -> bytes:
        """The bytes of a task's image, wherever Label Studio keeps it. Downloads go through
        `cache_dir`, kept under `cache_bytes` (least recently used files go first)."""
        data = task.get("data") or {}
        url = data.get(data_key)
        if not isinstance(url, str) or not url.strip():
            raise ImageLoadError("no_image", f"task {task.get('id')} has no data.{data_key}")
        url = url.strip()
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=False)
            except (IndexError, ValueError) as exc:
                raise ImageLoadError(
                    "bad_data_uri", f"data.{data_key} is a broken data URI"
                ) from exc
        if url.startswith(("http://", "https://")) and not url.startswith(self.url):
            return fetch_url(url, limits)  # a plain web URL: no Label Studio credentials
        from label_studio_sdk._extensions.label_studio_tools.core.utils.io import get_local_path

        def download(directory: Path) -> str:
            return get_local_path(
                url,
                cache_dir=str(directory),
                hostname=self.url,
                access_token=self.download_token(),
                task_id=task.get("id"),
            )

        return TaskFileCache(cache_dir, cache_bytes).read(url, download, limits)

    # ----------------------------------------------------------------- tabs
    def upsert_view(
        self,
        project_id: int,
        title: str,
        task_ids: list[int],
        ordering: list[str],
        view_id: int | None,
        visible: tuple[str, ...] = (),
    ) -> int:
        """Create or update the Data Manager tab `title` showing exactly `task_ids`; with
        `visible` (column ids such as "tasks:id"), every other column is hidden."""
        data: dict[str, Any] = {
            "title": title,
            "filters": {
                "conjunction": "or",
                "items": [
                    {"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": i}
                    for i in task_ids
                ]
                # An empty "or" would show every task: match nothing instead.
                or [
                    {
                        "filter": "filter:tasks:id",
                        "operator": "equal",
                        "type": "Number",
                        "value": -1,
                    }
                ],
            },
            "ordering": ordering,
        }
        if visible:
            hidden = [c for c in self.dm_columns(project_id) if c not in visible]
            data["hiddenColumns"] = {"explore": hidden, "labeling": hidden}
        if view_id is not None:
            response = self._request(
                "PATCH",
                f"/api/dm/views/{view_id}/",
                json={"project": project_id, "data": data},
                ok=(200, 404),
            )
            if response.status_code == 200:
                return view_id
        response = self._request(
            "POST", "/api/dm/views/", json={"project": project_id, "data": data}
        )
        return int(response.json()["id"])

    def dm_columns(self, project_id: int) -> list[str]:
        """The Data Manager's column ids for the project ("tasks:id", "tasks:data.image", ...)."""
        body = self._request("GET", "/api/dm/columns/", params={"project": project_id}).json()
        out = []
        for column in body.get("columns", []):
            parent = f"{column['parent']}." if column.get("parent") else ""
            out.append(f"{column.get('target', 'tasks')}:{parent}{column['id']}")
        return out

    # ----------------------------------------------------------------- predictions
    def put_prediction(
        self,
        task_id: int,
        score: float,
        model_version: str,
        prediction_id: int | None,
        result: list[dict[str, Any]] | None = None,
        mislabeling: float = 0.0,
        cluster: int | None = None,
    ) -> int:
        """Create or update the one Lookalike prediction of a task: its score carries the
        priority; its result a suggested label, if any; `mislabeling` a likely mislabel;
        `cluster` (when given) the group Uncertainty sampling spreads an annotator over."""
        body: dict[str, Any] = {
            "task": task_id,
            "result": result or [],
            "score": score,
            "model_version": model_version,
            "mislabeling": mislabeling,
        }
        if cluster is not None:
            body["cluster"] = cluster
        if prediction_id is not None:
            response = self._request(
                "PATCH", f"/api/predictions/{prediction_id}/", json=body, ok=(200, 404)
            )
            if response.status_code == 200:
                return prediction_id
        return int(self._request("POST", "/api/predictions/", json=body).json()["id"])

    def delete_prediction(self, prediction_id: int) -> None:
        self._request("DELETE", f"/api/predictions/{prediction_id}/", ok=(204, 404))

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        body = self._request("GET", "/api/ml/", params={"project": project_id}).json()
        return body if isinstance(body, list) else body.get("results", [])

    def prediction_versions(self, project_id: int) -> list[str]:
        """Model versions that have at least one prediction in the project."""
        body = self._request("GET", f"/api/projects/{project_id}/model-versions/").json()
        # {"version": count}; the project's current version is listed even with count 0.
        return [str(version) for version, count in body.items() if count]

    def authenticate_webhooks(self, project_id: int, user: str, header: str) -> int:
        """Make the webhook Label Studio created for our ML backend (connected with basic auth
        user `user`) send `header` too: Label Studio creates it without credentials, and it is
        what keeps the index current. Returns how many webhooks were changed."""
        ours = {
            str(b.get("url", "")).rstrip("/") + "/webhook"
            for b in self.ml_backends(project_id)
            if b.get("basic_auth_user") == user
        }
        hooks = self._request("GET", "/api/webhooks/", params={"project": project_id}).json()
        changed = 0
        for hook in hooks if isinstance(hooks, list) else []:
            headers = dict(hook.get("headers") or {})
            if (
                str(hook.get("url", "")).rstrip("/") in ours
                and headers.get("Authorization") != header
            ):
                headers["Authorization"] = header
                self._request("PATCH", f"/api/webhooks/{hook['id']}/", json={"headers": headers})
                changed += 1
        return changed

    def whoami(self) -> dict[str, Any]:
        """The user this client's token belongs to."""
        return self._request("GET", "/api/current-user/whoami").json()

    # ----------------------------------------------------------------- annotations
    def annotation(self, annotation_id: int) -> dict[str, Any]:
        return self._request("GET", f"/api/annotations/{annotation_id}/").json()

    def update_annotation_result(self, annotation_id: int, result: list[dict[str, Any]]) -> None:
        self._request("PATCH", f"/api/annotations/{annotation_id}/", json={"result": result})

    # ----------------------------------------------------------------- plumbing
    def _request(
        self, method: str, path: str, ok: tuple[int, ...] = (200, 201, 204), **kwargs: Any
    ) -> requests.Response:
        try:
            response = requests.request(
                method,
                f"{self.url}{path}",
                headers=self.auth_headers(),
                timeout=self.timeout,
                **kwargs,
            )
        except requests.RequestException as exc:
            raise LabelStudioError(f"{method} {path}: Label Studio unreachable: {exc}") from exc
        if response.status_code not in ok:
            raise LabelStudioError(
                f"{method} {path}: HTTP {response.status_code}: {response.text[:300]}",
                response.status_code,
            )
        return response

    @staticmethod
    def _dump(model: Any) -> dict[str, Any]:
        if isinstance(model, dict):
            return model
        return model.model_dump() if hasattr(model, "model_dump") else model.dict()
