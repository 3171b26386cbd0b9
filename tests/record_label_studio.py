"""Record what a real Label Studio 1.23.2 answers on every endpoint `LabelStudioClient` uses.

Run by hand (about a minute; needs the LS venv that scripts/test.sh installs)::

    .venv/bin/python tests/record_label_studio.py            # writes tests/data/label_studio/
    .venv/bin/python tests/record_label_studio.py --out DIR

It starts a throw-away Label Studio (`lookalike_dev.devstack.label_studio_server`), creates an
image project with plugin_config.xml, uploads one PNG (so a /data/upload/ URL appears), imports
two tasks by http URL, annotates one, connects a stub ML backend, writes one prediction and one
Data Manager tab, then saves each response as ``<name>.json``::

    {"request": {"method", "path", "params", "json"}, "status": int, "body": <raw JSON or null>}

Tokens are scrubbed; LS's and the stub backend's random ports become :8080 and :9090. These
files seed `tests/fake_label_studio.py` and keep it honest (tests/test_fake_label_studio.py
compares the fake's keys with them). Finally the real `LabelStudioClient` runs against the real
server once, so a mismatch between client and server shows up here first.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flask import Flask, jsonify
from PIL import Image
from werkzeug.serving import WSGIRequestHandler, make_server

from lookalike_dev.devstack import LabelStudioServer, label_studio_server

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "data" / "label_studio"
PROJECTS_INCLUDE = "id,title,task_number,num_tasks_with_annotations"
MODEL_VERSION = "lookalike-recorded"
JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")


@contextmanager
def stub_ml_backend() -> Iterator[str]:
    """Just enough of an ML backend for LS to accept the connection."""
    app = Flask("stub-ml-backend")
    app.add_url_rule("/health", "health", lambda: jsonify(status="UP", model_class="Stub"))
    app.add_url_rule(
        "/setup", "setup", lambda: jsonify(model_version=MODEL_VERSION), methods=["POST"]
    )
    app.add_url_rule("/versions", "versions", lambda: jsonify(versions=[MODEL_VERSION]))
    app.add_url_rule("/webhook", "webhook", lambda: jsonify(), methods=["POST"])
    app.add_url_rule("/predict", "predict", lambda: jsonify(results=[]), methods=["POST"])

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


class Recorder:
    def __init__(self, ls: LabelStudioServer, out: Path, ml_url: str) -> None:
        self.ls, self.out, self.ml_url = ls, out, ml_url
        self.secrets = [ls.api_key, ls.password]

    def call(
        self,
        name: str | None,
        method: str,
        path: str,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        headers: dict[str, str | None] | None = None,
        expect: int | None = None,
        **kwargs: Any,
    ) -> Any:
        response = self.ls.request(
            method, path, params=params, json=json_body, headers=headers or {}, **kwargs
        )
        if expect is not None and response.status_code != expect:
            raise SystemExit(f"{method} {path}: HTTP {response.status_code}: {response.text}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if name:
            request = {"method": method, "path": path, "params": params, "json": json_body}
            self.save(name, {"request": request, "status": response.status_code, "body": body})
        return body

    def save(self, name: str, record: dict[str, Any]) -> None:
        text = json.dumps(record, indent=2, sort_keys=True)
        for secret in self.secrets:
            text = text.replace(secret, "<scrubbed>")
        text = JWT.sub("<scrubbed-jwt>", text)
        text = text.replace(self.ls.url, "http://localhost:8080")
        text = text.replace(self.ml_url, "http://127.0.0.1:9090")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{name}.json").write_text(text + "\n")
        print(f"  {name}.json  HTTP {record['status']}")


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def record(ls: LabelStudioServer, out: Path, ml_url: str) -> None:
    rec = Recorder(ls, out, ml_url)
    config = (ROOT / "plugin_config.xml").read_text()
    project = rec.call(
        None, "POST", "/api/projects/", json_body={"title": "Recorded", "label_config": config},
        expect=201,
    )["id"]  # fmt: skip
    png = png_bytes()
    rec.call(
        None, "POST", f"/api/projects/{project}/import",
        files={"file0": ("tiny.png", png, "image/png")}, expect=201,
    )  # fmt: skip
    rec.call(
        None, "POST", f"/api/projects/{project}/import",
        json_body=[{"image": "http://images.example/a.jpg"}, {"image": "http://images.example/b.jpg"}],
        expect=201,
    )  # fmt: skip
    tasks = rec.call(None, "GET", "/api/tasks/", params={"project": project, "page_size": 10})
    ids = sorted(t["id"] for t in tasks["tasks"])
    upload_task = next(t for t in tasks["tasks"] if "/upload/" in t["data"]["image"])
    annotated = ids[-1]
    rec.call(
        None, "POST", f"/api/tasks/{annotated}/annotations/", expect=201,
        json_body={"result": [{
            "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": 8, "original_height": 6,
            "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0,
                      "rectanglelabels": ["Car"]},
        }]},
    )  # fmt: skip
    rec.call(
        "ml_create", "POST", "/api/ml/", expect=201,
        json_body={"url": ml_url, "project": project, "title": "Lookalike", "is_interactive": True},
    )  # fmt: skip

    # predictions (the client's put_prediction)
    body = {"task": ids[0], "result": [], "score": 0.25, "model_version": MODEL_VERSION}
    prediction = rec.call("prediction_create", "POST", "/api/predictions/", json_body=body)["id"]
    body["score"] = 0.75
    rec.call("prediction_patch", "PATCH", f"/api/predictions/{prediction}/", json_body=body)
    rec.call("prediction_patch_404", "PATCH", "/api/predictions/999999/", json_body=body)

    # the project (SDK projects.get / projects.list, raw PATCH without a trailing slash)
    rec.call(
        "project_patch",
        "PATCH",
        f"/api/projects/{project}",
        json_body={"sampling": "Uncertainty sampling", "model_version": MODEL_VERSION},
    )
    rec.call("project_get", "GET", f"/api/projects/{project}/")
    rec.call("project_get_404", "GET", "/api/projects/999999/")
    list_params = {"page": 1, "page_size": 100, "include": PROJECTS_INCLUDE}
    rec.call("projects_list", "GET", "/api/projects/", params=list_params)
    rec.call("projects_list_past_end", "GET", "/api/projects/", params={**list_params, "page": 2})

    # tasks (SDK tasks.list pages until an empty page or a 404; tasks.get)
    for page, name in ((1, "tasks_list"), (2, "tasks_list_page2"), (3, "tasks_list_past_end")):
        params = {"page": page, "page_size": 2, "project": project, "fields": "all"}
        rec.call(name, "GET", "/api/tasks/", params=params)
    rec.call(
        "tasks_list_unknown_project",
        "GET",
        "/api/tasks/",
        params={"page": 1, "page_size": 2, "project": 999999, "fields": "all"},
    )
    rec.call("task_get", "GET", f"/api/tasks/{annotated}/")
    rec.call("task_get_upload", "GET", f"/api/tasks/{upload_task['id']}/")
    rec.call("task_get_404", "GET", "/api/tasks/999999/")

    # Data Manager tabs (upsert_view)
    data = {
        "title": "Lookalike: recorded",
        "filters": {"conjunction": "or", "items": [
            {"filter": "filter:tasks:id", "operator": "equal", "type": "Number", "value": i}
            for i in ids[:2]
        ]},
        "ordering": ["-tasks:predictions_score"],
    }  # fmt: skip
    view = rec.call(
        "view_create", "POST", "/api/dm/views/", json_body={"project": project, "data": data}
    )["id"]
    data["filters"]["items"] = data["filters"]["items"][:1]
    rec.call(
        "view_patch",
        "PATCH",
        f"/api/dm/views/{view}/",
        json_body={"project": project, "data": data},
    )
    rec.call(
        "view_patch_404",
        "PATCH",
        "/api/dm/views/999999/",
        json_body={"project": project, "data": data},
    )
    rec.call("views_list", "GET", "/api/dm/views/", params={"project": project})
    rec.call("dm_columns", "GET", "/api/dm/columns/", params={"project": project})

    # ML backends and model versions
    rec.call("ml_backends", "GET", "/api/ml/", params={"project": project})
    rec.call("model_versions", "GET", f"/api/projects/{project}/model-versions/")

    # auth: a personal access token and its refresh; bad credentials
    rec.call(
        None,
        "POST",
        "/api/jwt/settings",
        json_body={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True},
    )
    pat = rec.call("token_create", "POST", "/api/token/", json_body={})["token"]
    rec.secrets.append(pat)
    access = rec.call(
        "token_refresh",
        "POST",
        "/api/token/refresh/",
        json_body={"refresh": pat},
        headers={"Authorization": None},
    )["access"]
    rec.secrets.append(access)
    rec.call(
        "token_refresh_invalid",
        "POST",
        "/api/token/refresh/",
        json_body={"refresh": "not-a-token"},
        headers={"Authorization": None},
    )
    rec.call("unauthorized", "GET", "/api/projects/", headers={"Authorization": None})
    rec.call("bad_token", "GET", "/api/projects/", headers={"Authorization": "Token " + "0" * 40})
    rec.call(
        "projects_list_bearer",
        "GET",
        "/api/projects/",
        params=list_params,
        headers={"Authorization": f"Bearer {access}"},
    )

    # files: the SDK's get_local_path tries the storage proxy, then /data/upload/
    url = upload_task["data"]["image"]
    proxy = "/storage-data/uploaded/?filepath=" + url.removeprefix("/data/")
    statuses: dict[str, Any] = {"url": url, "content_base64": base64.b64encode(png).decode()}
    for label, path in (("data_upload", url), ("storage_proxy", proxy)):
        for auth, header in (
            ("token", f"Token {ls.api_key}"),
            ("bearer", f"Bearer {access}"),
            ("none", None),
            ("bad_token", "Token " + "0" * 40),
        ):
            response = ls.request(
                "GET", path, headers={"Authorization": header}, allow_redirects=False
            )
            same = response.content == png
            statuses[f"{label}_{auth}"] = {
                "status": response.status_code,
                "same_bytes": same,
                "content_type": response.headers.get("Content-Type"),
                "location": response.headers.get("Location"),
                "body": None if same else response.text[:300],
            }
    rec.save(
        "file_download",
        {
            "request": {"method": "GET", "path": url, "params": None, "json": None},
            "status": 200,
            "body": statuses,
        },
    )
    smoke_test_client(ls, project, upload_task)


def smoke_test_client(ls: LabelStudioServer, project: int, upload_task: dict[str, Any]) -> None:
    """The real client against the real server: every method once."""
    from lookalike.core.images import ImageLimits
    from lookalike.service.ls_client import LabelStudioClient

    client = LabelStudioClient(ls.url, ls.api_key)
    print("client smoke test:")
    print("  project:", client.project(project)["title"])
    print("  list_projects:", [p["id"] for p in client.list_projects()])
    client.update_project(project, sampling="Sequential sampling")
    print("  update_project -> sampling:", client.project(project)["sampling"])
    print("  iter_tasks(page_size=2):", [t["id"] for t in client.iter_tasks(project, 2)])
    print("  task:", client.task(upload_task["id"])["id"])
    with tempfile.TemporaryDirectory() as cache:
        image = client.task_image_bytes(upload_task, "image", ImageLimits(), Path(cache))
        print("  task_image_bytes:", len(image), "bytes")
    view = client.upsert_view(project, "smoke", [upload_task["id"]], [], None)
    print("  upsert_view:", view, client.upsert_view(project, "smoke", [], [], view))
    prediction = client.put_prediction(upload_task["id"], 0.5, "smoke", None)
    print(
        "  put_prediction:",
        prediction,
        client.put_prediction(upload_task["id"], 0.4, "smoke", prediction),
    )
    print("  ml_backends:", [b["url"] for b in client.ml_backends(project)])
    print("  prediction_versions:", client.prediction_versions(project))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="record-ls-") as tmp,
        stub_ml_backend() as ml_url,
        label_studio_server(Path(tmp) / "ls") as ls,
    ):
        print(f"Label Studio at {ls.url} (started in {ls.startup_seconds:.0f} s)")
        record(ls, args.out, ml_url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
