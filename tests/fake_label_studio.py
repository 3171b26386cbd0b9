"""A stateful fake Label Studio 1.23.2 on 127.0.0.1 for what `LabelStudioClient` uses.

LS's status codes, error bodies, DRF paging (404 past the end) and auth (`Token <api_key>`, or
`Bearer <access>` from `POST /api/token/refresh/ {"refresh": pat}`). Objects are copies of the
recordings in tests/data/label_studio/ (tests/record_label_studio.py), so their keys are real.
Seed: project 1, tasks 1-3 (1: an uploaded PNG with prediction 1; 3: annotated), view 1, one
ML backend::

    def test_it(fake_label_studio: FakeLabelStudio) -> None:
        ls = fake_label_studio                  # ls.url, ls.api_key (legacy), ls.pat (JWT)
        task = ls.add_task(1, {"image": ls.add_file("x.png", png)}, annotations=1)
        ...                                     # code under test talks to ls.url
        assert ls.predictions(1)[-1]["score"] == 0.5 and ls.log[-1].status == 201
        ls.fail_next(500, times=3)              # the SDK retries a 5xx twice
        with ls.down(): ...                     # connection refused inside
"""

from __future__ import annotations

import base64
import copy
import json
import mimetypes
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

RECORDED = Path(__file__).resolve().parent / "data" / "label_studio"
Json = Any
ROUTES = Map([Rule(path, endpoint=endpoint) for path, endpoint in [
    ("/api/projects/", "projects"), ("/api/projects/<int:pid>/", "project"),
    ("/api/projects/<int:pid>/model-versions/", "model_versions"),
    ("/api/tasks/", "tasks"), ("/api/tasks/<int:tid>/", "task"),
    ("/api/dm/views/", "views"), ("/api/dm/views/<int:vid>/", "view"),
    ("/api/predictions/", "predictions"), ("/api/predictions/<int:prid>/", "prediction"),
    ("/api/ml/", "ml"), ("/api/token/refresh/", "refresh"),
    ("/api/annotations/<int:aid>/", "annotation"), ("/api/dm/columns/", "columns"),
    ("/api/current-user/whoami/", "whoami"),
    ("/data/upload/<int:pid>/<name>", "file"), ("/storage-data/uploaded/", "storage_proxy"),
]])  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Call:
    method: str
    path: str
    args: dict[str, str]
    json: Json
    auth: str | None
    status: int = 0


class Fail(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = status, detail


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args: Any) -> None:
        pass


class FakeLabelStudio:
    def __init__(self, data_dir: Path = RECORDED) -> None:
        self.rec = {p.stem: json.loads(p.read_text()) for p in data_dir.glob("*.json")}
        self.api_key, self._secret = secrets.token_hex(20), secrets.token_hex(16)
        self.pat = self._jwt("refresh", 365 * 86400)
        self.log: list[Call] = []
        self.errors: list[Exception] = []  # bugs of the fake itself (answered with a 500)
        self.lock = threading.RLock()
        self.users: dict[str, dict[str, Any]] = {}  # token -> user (add_user)
        self._user: dict[str, Any] = {}
        self.port = 0
        self._failures: list[tuple[int, str | None]] = []
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        project, user = self._body("project_get"), self._body("task_get")["annotations"][0]
        self.projects: dict[int, dict[str, Any]] = {project["id"]: project}
        self.tasks: dict[int, dict[str, Any]] = {}
        self.predictions_by_id: dict[int, dict[str, Any]] = {}
        for page in ("tasks_list", "tasks_list_page2"):
            for task in self._body(page)["tasks"]:
                for annotation in task["annotations"]:  # stored as the detail view shows them
                    annotation["completed_by"] = copy.deepcopy(user["completed_by"])
                self.predictions_by_id.update((p["id"], p) for p in task.pop("predictions"))
                self.tasks[task["id"]] = task
        self.views_by_id = {view["id"]: view for view in self._body("views_list")}
        self.ml: list[dict[str, Any]] = self._body("ml_backends")
        download = self._body("file_download")
        self.files = {download["url"]: base64.b64decode(download["content_base64"])}

    # ------------------------------------------------------------------ helpers for tests
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_project(self, title: str = "Project", label_config: str | None = None) -> dict:
        with self.lock:
            project = self._body("project_get")
            project.update(id=max(self.projects) + 1, title=title, created_at=_now())
            project["label_config"] = label_config or project["label_config"]
            self.projects[project["id"]] = project
            return self.project(project["id"])

    def add_task(self, project: int, data: dict[str, Any], annotations: int = 0) -> dict:
        """A task in `project` with `annotations` copies of the recorded annotation."""
        with self.lock:
            task, tid = self._body("task_get"), max(self.tasks, default=0) + 1
            template = task["annotations"][0]
            last = max((a["id"] for t in self.tasks.values() for a in t["annotations"]), default=0)
            task.update(id=tid, inner_id=tid, project=project, data=data, meta={}, file_upload=None)
            task.update(created_at=_now(), updated_at=_now(), annotations=[])
            for i in range(annotations):
                annotation = {**copy.deepcopy(template), "id": last + 1 + i, "task": tid}
                task["annotations"].append({**annotation, "project": project})
            self.tasks[tid] = task
            return self._task(tid, detail=True)

    def add_file(self, name: str, content: bytes, project: int = 1) -> str:
        """Store an upload; returns its task data URL (relative, as a stock LS writes it)."""
        url = f"/data/upload/{project}/{uuid.uuid4().hex[:8]}-{name}"
        self.files[url] = content
        return url

    def project(self, project: int) -> dict[str, Any]:
        """The stored project (mutable), its counters brought up to date."""
        with self.lock:
            tasks = [self._task(t) for t, v in self.tasks.items() if v["project"] == project]
            labeled = sum(t["total_annotations"] > 0 for t in tasks)
            self.projects[project].update(
                task_number=len(tasks),
                num_tasks_with_annotations=labeled,
                finished_task_number=labeled,
                total_annotations_number=sum(t["total_annotations"] for t in tasks),
                total_predictions_number=len(self.predictions(project)),
            )
            return self.projects[project]

    def views(self, project: int) -> list[dict[str, Any]]:
        """The project's Data Manager tabs: {"id", "project", "data": {"title", "filters",
        "ordering"}, ...}, as stored (mutable)."""
        return [v for v in self.views_by_id.values() if v["project"] == project]

    def predictions(self, project: int) -> list[dict[str, Any]]:
        return [p for p in self.predictions_by_id.values() if p["project"] == project]

    def fail_next(self, status: int, times: int = 1, path: str | None = None) -> None:
        """The next `times` requests (whose path starts with `path`) get `status`."""
        self._failures += [(status, path)] * times

    @contextmanager
    def down(self) -> Iterator[None]:
        """Stopped inside the block (connection refused), then back on the same port."""
        self.stop()
        try:
            yield
        finally:
            self.start(self.port)

    def start(self, port: int = 0) -> FakeLabelStudio:
        self._server = make_server("127.0.0.1", port, self, threaded=True, request_handler=_Quiet)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,))
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> FakeLabelStudio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ WSGI
    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Any:
        request = Request(environ)
        path, body = request.path, request.get_json(silent=True)
        if not path.endswith("/") and not path.startswith("/data/"):
            path += "/"  # LS serves API paths without their trailing slash too (no redirect)
        auth = request.headers.get("Authorization")
        self.log.append(call := Call(request.method, path, dict(request.args), body, auth))
        try:
            with self.lock:
                for i, (status, prefix) in enumerate(self._failures):
                    if prefix is None or path.startswith(prefix):
                        del self._failures[i]
                        raise Fail(status, "injected failure")
                endpoint, params = ROUTES.bind("fake").match(path, method=request.method)
                if endpoint != "refresh":
                    self._authenticate(auth)
                result = getattr(self, f"_h_{endpoint}")(request, body or {}, **params)
            if not isinstance(result, Response):
                status, payload = result if isinstance(result, tuple) else (200, result)
                result = Response(json.dumps(payload), status, mimetype="application/json")
        except Fail as exc:
            result = self._error(exc.status, exc.detail)
        except HTTPException as exc:
            result = self._error(exc.code or 500, exc.description or exc.name)
        except Exception as exc:  # a bug in the fake: the fixture fails the test
            self.errors.append(exc)
            result = self._error(500, repr(exc))
        call.status = result.status_code
        return result(environ, start_response)

    def _error(self, status: int, detail: str) -> Response:
        body = {**self._body("task_get_404"), "id": str(uuid.uuid4()), "status_code": status}
        return Response(json.dumps({**body, "detail": detail}), status, mimetype="application/json")

    def add_user(self, email: str, projects: set[int]) -> str:
        """Another user (legacy token returned) who can open only `projects` (as a user of
        another organization would): other projects answer 404 and are not listed."""
        token = secrets.token_hex(20)
        self.users[token] = {"id": 100 + len(self.users), "email": email, "projects": projects}
        return token

    def _visible(self, project: int) -> bool:
        allowed = self._user.get("projects")
        return allowed is None or project in allowed

    def _authenticate(self, auth: str | None) -> None:
        scheme, _, token = (auth or "").partition(" ")
        if scheme not in ("Token", "Bearer") or not token:
            raise Fail(401, "Authentication credentials were not provided.")
        if scheme == "Token" and token in self.users:
            self._user = self.users[token]
            return
        self._user = {"id": 1, "email": "admin@example.com", "projects": None}
        if scheme == "Token" and token != self.api_key:
            raise Fail(401, "Invalid token.")
        if scheme == "Bearer" and self._claims(token).get("token_type") != "access":
            raise Fail(401, "Given token not valid for any token type")

    def _jwt(self, kind: str, seconds: int) -> str:
        claims = {"token_type": kind, "exp": int(time.time()) + seconds, "jti": uuid.uuid4().hex}
        return jwt.encode({**claims, "user_id": 1}, self._secret, algorithm="HS256")

    def _claims(self, token: str) -> dict[str, Any]:
        try:
            return jwt.decode(token, self._secret, algorithms=["HS256"])
        except jwt.PyJWTError:
            return {}

    # ------------------------------------------------------------------ endpoints
    def _h_whoami(self, request: Request, body: Json) -> Json:
        return {"id": self._user["id"], "email": self._user["email"], "username": "user"}

    def _h_projects(self, request: Request, body: Json) -> Json:
        projects = [self.project(pid) for pid in sorted(self.projects) if self._visible(pid)]
        page = self._page(request, projects, 30, 100)
        if include := request.args.get("include"):  # LS honours it: only these keys
            page = [{k: p[k] for k in include.split(",") if k in p} for p in page]
        return {"count": len(projects), "next": None, "previous": None, "results": page}

    def _h_project(self, request: Request, body: Json, pid: int) -> Json:
        if not self._visible(pid):
            raise Fail(404, "No Project matches the given query.")
        if request.method == "PATCH":
            self._get(self.projects, pid, "Project").update(body)
        return self.project(self._get(self.projects, pid, "Project")["id"])

    def _h_model_versions(self, request: Request, body: Json, pid: int) -> Json:
        """{version: count}, latest first, then the project's version (count 0 if unused)."""
        counts: dict[str, int] = {}
        project = self._h_project(request, body, pid)
        for p in sorted(self.predictions(pid), key=lambda p: p["created_at"], reverse=True):
            counts[p["model_version"]] = counts.get(p["model_version"], 0) + 1
        if project.get("model_version"):
            counts.setdefault(project["model_version"], 0)
        return counts

    def _h_tasks(self, request: Request, body: Json) -> Json:
        if (pid := request.args.get("project", type=int)) is not None:
            self._get(self.projects, pid, "Project")
        mine = [t for t, v in sorted(self.tasks.items()) if pid in (None, v["project"])]
        tasks = [self._task(t) for t in mine]
        return {
            "total_annotations": sum(t["total_annotations"] for t in tasks),
            "total_predictions": sum(t["total_predictions"] for t in tasks),
            "total": len(tasks),
            "tasks": self._page(request, tasks, 100, 10**6),
        }

    def _h_task(self, request: Request, body: Json, tid: int) -> Json:
        return self._task(tid, detail=True)

    def _task(self, tid: int, detail: bool = False) -> dict[str, Any]:
        task = copy.deepcopy(self._get(self.tasks, tid, "Task"))
        predictions = [p for p in self.predictions_by_id.values() if p["task"] == tid]
        scores = [p["score"] for p in predictions if p["score"] is not None]
        task.update(predictions=predictions, total_predictions=len(predictions))
        task.update(predictions_score=sum(scores) / len(scores) if scores else None)
        task.update(total_annotations=len(task["annotations"]))
        task.update(is_labeled=task["total_annotations"] >= task["overlap"])
        if not detail:  # the list shows annotators by id, the detail view in full
            for annotation in task["annotations"]:
                annotation["completed_by"] = annotation["completed_by"]["id"]
        return task

    def _h_views(self, request: Request, body: Json) -> Json:
        if request.method == "GET":
            return self.views(request.args.get("project", 0, type=int))
        view = {**self._body("view_create"), "id": max(self.views_by_id, default=0) + 1, **body}
        self.views_by_id[view["id"]] = view
        return 201, view

    def _h_view(self, request: Request, body: Json, vid: int) -> Json:
        view = self._get(self.views_by_id, vid, "View")
        view.update(body)
        return view

    def _h_predictions(self, request: Request, body: Json) -> Json:
        if body.get("task") not in self.tasks:
            raise Fail(400, f'Invalid pk "{body.get("task")}" - object does not exist.')
        prediction = {**self._body("prediction_create"), **body, "created_at": _now()}
        prediction.update(id=max(self.predictions_by_id, default=0) + 1, updated_at=_now())
        prediction["project"] = self.tasks[body["task"]]["project"]
        self.predictions_by_id[prediction["id"]] = prediction
        return 201, prediction

    def _h_prediction(self, request: Request, body: Json, prid: int) -> Json:
        prediction = self._get(self.predictions_by_id, prid, "Prediction")
        prediction.update(body, updated_at=_now())
        return prediction

    def _h_columns(self, request: Request, body: Json) -> Json:
        """The recorded columns, with the project's image field as its one data column."""
        self._get(self.projects, request.args.get("project", 0, type=int), "Project")
        return self._body("dm_columns")

    def _h_annotation(self, request: Request, body: Json, aid: int) -> Json:
        """GET or PATCH (e.g. {"result": [...]}) one annotation, stored in its task."""
        found = [a for t in self.tasks.values() for a in t["annotations"] if a["id"] == aid]
        if not found:
            raise Fail(404, "No Annotation matches the given query.")
        if request.method == "PATCH":
            found[0].update(body, updated_at=_now())
        return copy.deepcopy(found[0])

    def _h_ml(self, request: Request, body: Json) -> Json:
        return [m for m in self.ml if m["project"] == request.args.get("project", type=int)]

    def _h_refresh(self, request: Request, body: Json) -> Json:
        if self._claims(body.get("refresh") or "").get("token_type") != "refresh":
            raise Fail(401, "Token is invalid")
        return {"access": self._jwt("access", 300)}

    def _h_file(self, request: Request, body: Json, pid: int, name: str) -> Response:
        if (content := self.files.get(f"/data/upload/{pid}/{name}")) is None:
            raise Fail(404, "Not found")
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(content, mimetype=kind)

    def _h_storage_proxy(self, request: Request, body: Json) -> Response:
        """A stock LS (local FileSystemStorage) refuses; the SDK then tries /data/upload/."""
        detail = self.rec["file_download"]["body"]["storage_proxy_token"]["body"]
        return Response(detail, 400, mimetype="application/json")

    # ------------------------------------------------------------------ plumbing
    def _body(self, name: str) -> Json:
        return copy.deepcopy(self.rec[name]["body"])

    @staticmethod
    def _get(table: dict[int, dict[str, Any]], key: int, what: str) -> dict[str, Any]:
        if key not in table:
            raise Fail(404, f"No {what} matches the given query.")
        return table[key]

    @staticmethod
    def _page(request: Request, items: list[Any], default: int, maximum: int) -> list[Any]:
        """DRF PageNumberPagination: 404 "Invalid page." past the end (an empty page 1 is ok)."""
        size = min(request.args.get("page_size", default, type=int), maximum)
        page = request.args.get("page", 1, type=int)
        if page < 1 or (page > 1 and (page - 1) * size >= len(items)):
            raise Fail(404, "Invalid page.")
        return items[(page - 1) * size : page * size]


@pytest.fixture
def fake_label_studio() -> Iterator[FakeLabelStudio]:
    """A fresh fake Label Studio per test, seeded from the recordings."""
    with FakeLabelStudio() as fake:
        yield fake
    assert not fake.errors, f"the fake itself failed: {fake.errors}"
