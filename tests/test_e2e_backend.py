"""End to end: a real Label Studio 1.23.2, a real Redis, real `lookalike serve` and `worker`.

Two backends share one Label Studio and one Redis (separate queues and databases):
- "photos": EfficientNet-Lite0 with real ImageNet weights, so augmented copies of real photos are
  ground truth for box and whole-image queries, auto-prioritization and the webhooks;
- "clip": open_clip ViT-B-32 with random weights (asked for explicitly), for the text path:
  random weights give no meaningful text ranking offline, so the test checks that the tab holds
  exactly the REST API's top matches for the same prompt, and that exact duplicates score 1.0.
"""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from PIL import Image, ImageEnhance, ImageOps
from rq.job import Job, JobStatus
from skimage import data as skdata
from tests.services import (
    LabelStudioServer,
    free_port,
    label_studio_server,
    local_http_server,
    lookalike_process,
    milvus_server,
    redis_server,
    wait_http,
)

from lookalike.core.weights import convert_efficientnet_lite0

pytestmark = pytest.mark.e2e

PLUGIN_CONFIG = (Path(__file__).resolve().parents[1] / "plugin_config.xml").read_text()
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "camera", "horse", "immunohistochemistry"]
# (skimage's "cat" is the same photo as "chelsea": never use both as different images.)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def photo(name: str) -> Image.Image:
    array = getattr(skdata, name)()
    return Image.fromarray(array).convert("RGB")


def augmented(image: Image.Image) -> Image.Image:
    """A near duplicate: crop, flip, colour change and JPEG recompression."""
    w, h = image.size
    out = image.crop((int(w * 0.06), int(h * 0.05), int(w * 0.94), int(h * 0.95)))
    out = ImageOps.mirror(out)
    out = ImageEnhance.Color(out).enhance(1.3)
    buffer = io.BytesIO()
    out.save(buffer, "JPEG", quality=60)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


@dataclass
class Backend:
    url: str
    ml_id: int
    project: int

    def status(self) -> dict[str, Any]:
        return requests.get(
            f"{self.url}/api/projects/{self.project}/index-status", timeout=10
        ).json()

    def similar(self, **body: Any) -> requests.Response:
        return requests.post(
            f"{self.url}/api/projects/{self.project}/similar", json=body, timeout=60
        )


@dataclass
class Stack:
    ls: LabelStudioServer
    photos: Backend
    clip: Backend
    names: dict[str, int]  # file name -> task id in the photos project
    image_url: str
    image_dir: Path
    photos_redis_url: str
    root: Path  # logs: photos-serve.log, photos-worker-1.log, ...
    vector_db: str  # LOOKALIKE_VECTOR_DB: "" (embedded) or the test's Milvus server


def create_project(ls: LabelStudioServer, title: str) -> int:
    response = ls.request(
        "POST", "/api/projects/", json={"title": title, "label_config": PLUGIN_CONFIG}
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def upload(ls: LabelStudioServer, project: int, files: dict[str, bytes]) -> None:
    payload = {
        f"file{i}": (name, body, "image/jpeg") for i, (name, body) in enumerate(files.items())
    }
    response = ls.request("POST", f"/api/projects/{project}/import", files=payload)
    assert response.status_code == 201, response.text


def import_urls(ls: LabelStudioServer, project: int, urls: list[str]) -> None:
    response = ls.request(
        "POST", f"/api/projects/{project}/import", json=[{"image": u} for u in urls]
    )
    assert response.status_code == 201, response.text


def task_ids_by_name(ls: LabelStudioServer, project: int) -> dict[str, int]:
    response = ls.request("GET", "/api/tasks/", params={"project": project, "page_size": 1000})
    out = {}
    for task in response.json()["tasks"]:
        name = task["data"]["image"].rsplit("/", 1)[-1]
        out[name.split("-", 1)[-1] if "/upload/" in task["data"]["image"] else name] = task["id"]
    return out


def connect(
    ls: LabelStudioServer, project: int, url: str, title: str, auth: tuple[str, str] | None = None
) -> int:
    """Label Studio's Connect Model (with basic auth when the backend has credentials)."""
    body: dict[str, Any] = {"url": url, "project": project, "title": title, "is_interactive": True}
    if auth:
        body |= {
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": auth[0],
            "basic_auth_pass": auth[1],
        }
    response = ls.request("POST", "/api/ml/", json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def interactive(ls: LabelStudioServer, ml_id: int, task: int, region: dict[str, Any]) -> dict:
    response = ls.request(
        "POST",
        f"/api/ml/{ml_id}/interactive-annotating",
        json={"task": task, "context": {"result": [region]}},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def tab(ls: LabelStudioServer, project: int, title: str) -> tuple[int, list[int]]:
    views = ls.request("GET", "/api/dm/views/", params={"project": project}).json()
    matching = [v for v in views if v["data"].get("title") == title]
    assert len(matching) == 1, [v["data"].get("title") for v in views]
    view_id = matching[0]["id"]
    tasks = ls.request(
        "GET", "/api/tasks/", params={"project": project, "view": view_id, "page_size": 100}
    ).json()["tasks"]
    return view_id, [t["id"] for t in tasks]


def next_task(ls: LabelStudioServer, project: int) -> int:
    response = ls.request(
        "POST", "/api/dm/actions/", params={"id": "next_task", "project": project}, json={}
    )
    assert response.status_code == 200, response.text
    return int(response.json()["id"])


def status_message(reply: dict) -> str:
    return reply["data"]["result"][0]["value"]["text"][0]


@pytest.fixture(scope="module", params=["embedded", "milvus"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The whole suite runs twice: vectors in Redis with FAISS in the web process, then in a
    Milvus-protocol server (`milvus-lite server` on 127.0.0.1) that the web queries."""
    root = tmp_path_factory.mktemp(f"e2e-{request.param}")
    weights = convert_efficientnet_lite0(root / "efficientnet_lite0.pth")
    image_dir = root / "images"
    image_dir.mkdir()
    uploads: dict[str, bytes] = {}
    for name in PHOTOS[:5]:
        uploads[f"{name}.jpg"] = jpeg_bytes(photo(name))
        uploads[f"{name}_copy.jpg"] = jpeg_bytes(augmented(photo(name)))
    uploads["broken.jpg"] = b"\xff\xd8\xff\xe0 this is not really a jpeg"
    for name in PHOTOS[5:]:  # served over plain http: imported by URL
        (image_dir / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name)))
        (image_dir / f"{name}_copy.jpg").write_bytes(jpeg_bytes(augmented(photo(name))))

    with (
        redis_server(root / "redis") as redis_url,
        label_studio_server(root / "ls", document_root=root) as ls,
        local_http_server(image_dir) as image_url,
        (milvus_server(root / "milvus") if request.param == "milvus"
         else contextlib.nullcontext()) as milvus,
    ):
        vector_db = milvus.uri if milvus is not None else ""
        common = {
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.api_key,
            "LOOKALIKE_SIMILAR_K": "5",
            "LOOKALIKE_AUTO_K": "3",
            "LOOKALIKE_VECTOR_DB": vector_db,
        }
        photos_env = {
            **common,
            "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/1",
            "LOOKALIKE_DATA_DIR": str(root / "photos-data"),
            "LOOKALIKE_MODEL": "timm:efficientnet_lite0",
            "LOOKALIKE_WEIGHTS": str(weights),
        }
        clip_env = {
            **common,
            "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/2",
            "LOOKALIKE_DATA_DIR": str(root / "clip-data"),
            "LOOKALIKE_MODEL": "open_clip:ViT-B-32/random",
            "LOOKALIKE_SET_SAMPLING": "false",
            # The text tests compare the tab with the REST API's plain top matches; with
            # random weights many photos are "near-duplicates" of each other (and the project
            # holds an exact copy), so queueing here keeps every match.
            "LOOKALIKE_DIVERSE": "false",
        }
        photos_port, clip_port = free_port(), free_port()
        with (
            lookalike_process(["worker"], photos_env, root / "photos-worker-1.log"),
            lookalike_process(["worker"], photos_env, root / "photos-worker-2.log"),
            lookalike_process(["worker"], clip_env, root / "clip-worker.log"),
            lookalike_process(
                ["serve", "--host", "127.0.0.1", "--port", str(photos_port)],
                photos_env,
                root / "photos-serve.log",
            ) as photos_proc,
            lookalike_process(
                ["serve", "--host", "127.0.0.1", "--port", str(clip_port)],
                clip_env,
                root / "clip-serve.log",
            ) as clip_proc,
        ):
            photos_url = f"http://127.0.0.1:{photos_port}"
            clip_url = f"http://127.0.0.1:{clip_port}"
            wait_http(
                f"{photos_url}/health", 60, proc=photos_proc, log_path=root / "photos-serve.log"
            )
            wait_http(f"{clip_url}/health", 60, proc=clip_proc, log_path=root / "clip-serve.log")

            photos_project = create_project(ls, "photos")
            upload(ls, photos_project, uploads)
            import_urls(
                ls,
                photos_project,
                [f"{image_url}/{n}.jpg" for n in PHOTOS[5:]]
                + [f"{image_url}/{n}_copy.jpg" for n in PHOTOS[5:]],
            )
            photos_ml = connect(ls, photos_project, photos_url, "lookalike-photos")

            clip_project = create_project(ls, "clip")
            clip_files = {f"{n}.jpg": jpeg_bytes(photo(n)) for n in PHOTOS}
            clip_files["chelsea_again.jpg"] = clip_files["chelsea.jpg"]
            upload(ls, clip_project, clip_files)
            clip_ml = connect(ls, clip_project, clip_url, "lookalike-clip")

            yield Stack(
                ls=ls,
                photos=Backend(photos_url, photos_ml, photos_project),
                clip=Backend(clip_url, clip_ml, clip_project),
                names=task_ids_by_name(ls, photos_project),
                image_url=image_url,
                image_dir=image_dir,
                photos_redis_url=photos_env["REDIS_URL"],
                root=root,
                vector_db=vector_db,
            )


@pytest.fixture(scope="module")
def indexed(stack: Stack) -> Stack:
    total = len(stack.names)
    wait_for(
        lambda: (s := stack.photos.status())["indexed"] + s["failed"] == total or None,
        240,
        "the photos project to be indexed",
    )
    wait_for(
        lambda: stack.clip.status()["indexed"] == len(PHOTOS) + 1 or None,
        240,
        "the clip project to be indexed",
    )
    return stack


def test_index_status_counts_and_broken_image(indexed: Stack) -> None:
    status = indexed.photos.status()
    assert status["total"] == len(indexed.names) == 15
    assert status["indexed"] == 14
    assert status["failed"] == 1 and status["pending"] == 0
    [failure] = status["failures"]
    assert failure["task_id"] == indexed.names["broken.jpg"]
    assert "not_an_image" in failure["reason"] or "corrupt" in failure["reason"]


def test_interactive_box_query_fills_tab_and_priority(indexed: Stack) -> None:
    ls, names = indexed.ls, indexed.names
    query = names["chelsea.jpg"]
    image = photo("chelsea")
    region = {
        "type": "rectanglelabels",
        "from_name": "lookalike_box",
        "to_name": "image",
        "original_width": image.width,
        "original_height": image.height,
        "value": {
            "x": 25,
            "y": 5,
            "width": 50,
            "height": 70,
            "rotation": 0,
            "rectanglelabels": ["Find similar"],
        },
    }
    reply = interactive(ls, indexed.photos.ml_id, query, region)
    title = f"Similar to #{query} (box)"
    message = status_message(reply)
    assert f"tab '{title}'" in message and "Label All Tasks" in message, message
    _, tasks = tab(ls, indexed.photos.project, title)
    assert tasks[0] == names["chelsea_copy.jpg"]
    assert query not in tasks and len(tasks) == 5
    # The project now serves Lookalike's matches first through Uncertainty sampling.
    project = ls.request("GET", f"/api/projects/{indexed.photos.project}").json()
    assert project["sampling"] == "Uncertainty sampling"
    assert next_task(ls, indexed.photos.project) == names["chelsea_copy.jpg"]

    # The same query again updates its tab instead of adding one.
    interactive(ls, indexed.photos.ml_id, query, region)
    tab(ls, indexed.photos.project, title)


def test_whole_image_query_and_full_box(indexed: Stack) -> None:
    ls, names = indexed.ls, indexed.names
    for name, region in [
        (
            "coffee",
            {
                "type": "keypointlabels",
                "from_name": "lookalike_image",
                "to_name": "image",
                "value": {"x": 50, "y": 50, "keypointlabels": ["Find similar: whole image"]},
            },
        ),
        (
            "astronaut",
            {
                "type": "rectanglelabels",
                "from_name": "lookalike_box",
                "to_name": "image",
                "value": {
                    "x": 0,
                    "y": 0,
                    "width": 100,
                    "height": 100,
                    "rotation": 0,
                    "rectanglelabels": ["Find similar"],
                },
            },
        ),
        (
            "horse",
            {
                "type": "keypointlabels",
                "from_name": "lookalike_image",
                "to_name": "image",
                "value": {"x": 5, "y": 5, "keypointlabels": ["Find similar: whole image"]},
            },
        ),
    ]:
        query = names[f"{name}.jpg"]
        reply = interactive(ls, indexed.photos.ml_id, query, region)
        assert "queued" in status_message(reply)
        title = f"Similar to #{query}" + (" (box)" if region["type"] == "rectanglelabels" else "")
        _, tasks = tab(ls, indexed.photos.project, title)
        assert tasks[0] == names[f"{name}_copy.jpg"], (name, tasks)


def whole_image_point() -> dict[str, Any]:
    return {
        "type": "keypointlabels",
        "from_name": "lookalike_image",
        "to_name": "image",
        "value": {"x": 50, "y": 50, "keypointlabels": ["Find similar: whole image"]},
    }


def box(x: float, y: float, width: float, height: float) -> dict[str, Any]:
    return {
        "type": "rectanglelabels",
        "from_name": "lookalike_box",
        "to_name": "image",
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": 0,
            "rectanglelabels": ["Find similar"],
        },
    }


@pytest.fixture(scope="module")
def order_project(indexed: Stack) -> tuple[Backend, dict[str, int]]:
    """A fresh project of seven photos and their augmented copies, for the queue-order tests."""
    ls = indexed.ls
    project = create_project(ls, "queue order")
    files = {f"{n}.jpg": jpeg_bytes(photo(n)) for n in PHOTOS}
    files |= {f"{n}_copy.jpg": jpeg_bytes(augmented(photo(n))) for n in PHOTOS}
    upload(ls, project, files)
    ml_id = connect(ls, project, indexed.photos.url, "lookalike-order")
    backend = Backend(indexed.photos.url, ml_id, project)
    wait_for(lambda: backend.status()["indexed"] == len(files) or None, 180, "indexing")
    return backend, task_ids_by_name(ls, project)


def test_each_tab_starts_with_its_own_best_match_and_the_latest_request_is_served_first(
    indexed: Stack, order_project: tuple[Backend, dict[str, int]]
) -> None:
    """Ten requests in a row: after each, its tab starts with the query's own best match (the
    augmented copy's original, or the original's copy), and "Label All Tasks" serves it (the
    annotator then labels it, as they would)."""
    ls = indexed.ls
    backend, ids = order_project
    queries = [  # (query task, region, expected best match)
        ("chelsea_copy.jpg", box(0, 0, 100, 100), "chelsea.jpg"),
        ("coffee.jpg", whole_image_point(), "coffee_copy.jpg"),
        ("astronaut_copy.jpg", box(3, 3, 94, 94), "astronaut.jpg"),
        ("rocket.jpg", box(0, 0, 100, 100), "rocket_copy.jpg"),
        ("camera_copy.jpg", whole_image_point(), "camera.jpg"),
        ("horse.jpg", box(2, 2, 96, 96), "horse_copy.jpg"),
        ("immunohistochemistry_copy.jpg", whole_image_point(), "immunohistochemistry.jpg"),
        ("chelsea.jpg", whole_image_point(), "chelsea_copy.jpg"),
        ("coffee_copy.jpg", box(4, 4, 92, 92), "coffee.jpg"),
        ("rocket_copy.jpg", whole_image_point(), "rocket.jpg"),
    ]
    for number, (name, region, expected) in enumerate(queries, 1):
        query = ids[name]
        reply = interactive(ls, backend.ml_id, query, region)
        message = status_message(reply)
        assert "Label All Tasks' serves them next" in message, (number, message)
        title = f"Similar to #{query}" + (" (box)" if region["type"] == "rectanglelabels" else "")
        _, tasks = tab(ls, backend.project, title)
        assert tasks[0] == ids[expected], (number, name, tasks)
        assert len(tasks) == 5 and query not in tasks
        served = next_task(ls, backend.project)
        assert served == tasks[0], (number, name, served, tasks)
        # Label it: Label Studio keeps serving a task its annotator holds locked.
        label = ls.request("POST", f"/api/tasks/{served}/annotations/", json={"result": []})
        assert label.status_code == 201, label.text


def test_two_requests_that_share_matches(
    indexed: Stack, order_project: tuple[Backend, dict[str, int]]
) -> None:
    """The later request's tab is in its own order; the earlier tab keeps exactly its matches
    (those the later request also found first); Label All Tasks serves the later request's
    matches in its order, then the earlier request's other matches in theirs."""
    ls = indexed.ls
    backend, ids = order_project
    first_query, second_query = ids["astronaut.jpg"], ids["camera.jpg"]
    first = [r["task_id"] for r in backend.similar(task_id=first_query).json()["results"]]
    interactive(ls, backend.ml_id, first_query, whole_image_point())
    second = [r["task_id"] for r in backend.similar(task_id=second_query).json()["results"]]
    interactive(ls, backend.ml_id, second_query, whole_image_point())
    shared = [t for t in second if t in first]
    assert shared, (first, second)  # five of thirteen candidates each: they overlap
    _, second_tab = tab(ls, backend.project, f"Similar to #{second_query}")
    assert second_tab == second
    _, first_tab = tab(ls, backend.project, f"Similar to #{first_query}")
    assert first_tab == shared + [t for t in first if t not in second]
    # Label All Tasks: label each served task (an empty annotation) and ask for the next.
    expected = second + [t for t in first if t not in second]
    served = []
    for _ in expected:
        task = next_task(ls, backend.project)
        served.append(task)
        response = ls.request("POST", f"/api/tasks/{task}/annotations/", json={"result": []})
        assert response.status_code == 201, response.text
    assert served == expected


def test_context_free_predict_is_cheap_and_creates_nothing(indexed: Stack) -> None:
    task = indexed.ls.request("GET", f"/api/tasks/{indexed.names['rocket.jpg']}").json()
    response = requests.post(
        f"{indexed.photos.url}/predict",
        json={"tasks": [task], "project": f"{indexed.photos.project}.0", "params": {}},
        timeout=10,
    )
    assert response.status_code == 200
    assert response.json() == {"results": [[]]}


def test_text_query_through_smart_textarea(indexed: Stack) -> None:
    ls, clip = indexed.ls, indexed.clip
    ids = task_ids_by_name(ls, clip.project)
    prompt = "a police car at night"
    region = {
        "type": "textarea",
        "from_name": "lookalike_text",
        "to_name": "image",
        "value": {"text": [prompt]},
    }
    reply = interactive(ls, clip.ml_id, ids["rocket.jpg"], region)
    message = status_message(reply)
    assert f"tab 'Text: {prompt}'" in message
    assert "LOOKALIKE_SET_SAMPLING=false" in message  # priority off for this backend: tab only
    _, tasks = tab(ls, clip.project, f"Text: {prompt}")
    # The tab holds what the REST API finds for the same prompt, minus the open task.
    expected = clip.similar(text=prompt, k=6).json()["results"]
    scores = [r["score"] for r in expected]
    assert scores == sorted(scores, reverse=True)
    top = [r["task_id"] for r in expected if r["task_id"] != ids["rocket.jpg"]][:5]
    assert tasks == top  # the tab is in the prompt's own order (sampling is left alone)
    assert ids["rocket.jpg"] not in tasks
    info = ls.request("GET", f"/api/projects/{clip.project}").json()
    assert info["sampling"] != "Uncertainty sampling"  # LOOKALIKE_SET_SAMPLING=false

    # A second prompt: its tab is in its own order too.
    second = "a cat on a sofa"
    interactive(ls, clip.ml_id, ids["rocket.jpg"], {**region, "value": {"text": [second]}})
    _, tasks = tab(ls, clip.project, f"Text: {second}")
    expected = clip.similar(text=second, k=6).json()["results"]
    assert tasks == [r["task_id"] for r in expected if r["task_id"] != ids["rocket.jpg"]][:5]


def test_exact_duplicate_scores_one_with_random_clip(indexed: Stack) -> None:
    ids = task_ids_by_name(indexed.ls, indexed.clip.project)
    results = indexed.clip.similar(task_id=ids["chelsea.jpg"], k=3).json()["results"]
    assert results[0]["task_id"] == ids["chelsea_again.jpg"]
    assert results[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert ids["chelsea.jpg"] not in [r["task_id"] for r in results]


def test_rest_api_errors_are_json_4xx(indexed: Stack) -> None:
    photos = indexed.photos
    for body, fragment in [
        ({}, "exactly one"),
        ({"task_id": 1, "text": "x"}, "exactly one"),
        ({"image": "%%%not base64"}, "base64"),
        ({"task_id": indexed.names["rocket.jpg"], "k": 0}, "k must be"),
        ({"text": "a cat"}, "image-only"),
        ({"url": "/etc/passwd"}, "http(s)"),
        ({"text": 123}, "must be a string"),
        ({"task_id": 987654}, "does not exist"),
    ]:
        response = photos.similar(**body)
        assert 400 <= response.status_code < 500, (body, response.text)
        assert fragment in response.json()["error"], (body, response.json())
    response = requests.post(
        f"{photos.url}/api/projects/999/similar", json={"task_id": 1}, timeout=10
    )
    assert response.status_code == 404 and "does not know project" in response.json()["error"]


def test_rest_search_by_image_upload_and_queue(indexed: Stack) -> None:
    photos, names = indexed.photos, indexed.names
    body = base64.b64encode(jpeg_bytes(augmented(photo("rocket")))).decode()
    response = photos.similar(image=body, k=2, queue=True)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["results"][0]["task_id"] in {names["rocket.jpg"], names["rocket_copy.jpg"]}
    assert reply["view_id"] and reply["tab"] == "Similar to uploaded image"
    _, tasks = tab(indexed.ls, photos.project, "Similar to uploaded image")
    assert tasks == [r["task_id"] for r in reply["results"]]


def test_webhooks_index_new_tasks_and_forget_deleted(indexed: Stack) -> None:
    ls, photos = indexed.ls, indexed.photos
    before = photos.status()["indexed"]
    # A new task imported after indexing arrives through the TASKS_CREATED webhook.
    shutil.copy(indexed.image_dir / "immunohistochemistry.jpg", indexed.image_dir / "ihc_again.jpg")
    import_urls(ls, photos.project, [f"{indexed.image_url}/ihc_again.jpg"])
    wait_for(lambda: photos.status()["indexed"] == before + 1 or None, 60, "the new task")
    new_id = task_ids_by_name(ls, photos.project)["ihc_again.jpg"]
    hits = photos.similar(task_id=indexed.names["immunohistochemistry.jpg"], k=3).json()["results"]
    assert hits[0]["task_id"] == new_id and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

    # Deleting it (TASKS_DELETED) removes it from results.
    assert ls.request("DELETE", f"/api/tasks/{new_id}/").status_code == 204
    wait_for(lambda: photos.status()["indexed"] == before or None, 60, "the deleted task to go")
    hits = photos.similar(task_id=indexed.names["immunohistochemistry.jpg"], k=5).json()["results"]
    assert new_id not in [h["task_id"] for h in hits]


def test_resync_repairs_drift(indexed: Stack) -> None:
    import redis as redis_lib

    photos = indexed.photos
    status = photos.status()
    # Simulate a lost webhook: drop one task's vector behind the backend's back.
    victim = indexed.names["camera.jpg"]
    if indexed.vector_db:
        from pymilvus import MilvusClient

        milvus = MilvusClient(uri=indexed.vector_db.replace("milvus://", "http://"))
        milvus.delete(f"lookalike_project_{photos.project}", ids=[victim])
        milvus.close()
    else:
        client = redis_lib.Redis.from_url(indexed.photos_redis_url)
        assert client.setbit(f"lookalike:project:{photos.project}:vectors:present", victim, 0)
    assert photos.status()["indexed"] == status["indexed"] - 1
    response = requests.post(f"{photos.url}/api/projects/{photos.project}/sync", timeout=10)
    assert response.status_code == 202
    wait_for(lambda: photos.status()["indexed"] == status["indexed"] or None, 60, "the resync")
    hits = photos.similar(task_id=indexed.names["camera_copy.jpg"], k=1).json()["results"]
    assert hits[0]["task_id"] == victim


def test_rare_label_annotation_raises_priority_of_lookalikes(indexed: Stack) -> None:
    ls, photos, names = indexed.ls, indexed.photos, indexed.names

    def annotate(task: int, label: str) -> None:
        result = [
            {
                "from_name": "label",
                "to_name": "image",
                "type": "rectanglelabels",
                "original_width": 100,
                "original_height": 100,
                "value": {
                    "x": 10,
                    "y": 10,
                    "width": 50,
                    "height": 50,
                    "rotation": 0,
                    "rectanglelabels": [label],
                },
            }
        ]
        response = ls.request("POST", f"/api/tasks/{task}/annotations/", json={"result": result})
        assert response.status_code == 201, response.text

    for name in ["coffee.jpg", "astronaut.jpg", "camera.jpg"]:
        annotate(names[name], "Car")
    rocket_copy = names["rocket_copy.jpg"]
    before = ls.request("GET", "/api/predictions/", params={"task": rocket_copy}).json()
    before_scores = [p["score"] for p in before if p["model_version"] == "lookalike"]
    annotate(names["rocket.jpg"], "Police car")
    _, tasks = wait_for(
        lambda: _tab_or_none(ls, photos.project, "Rare: Police car"), 60, "the rare-label tab"
    )
    assert tasks[0] == rocket_copy
    assert names["rocket.jpg"] not in tasks
    after = ls.request("GET", "/api/predictions/", params={"task": rocket_copy}).json()
    [prediction] = [p for p in after if p["model_version"] == "lookalike"]
    assert prediction["score"] < 0.5
    assert not before_scores or prediction["score"] <= min(before_scores)
    # Labeled tasks are excluded from every later search.
    hits = photos.similar(task_id=rocket_copy, k=10).json()["results"]
    assert names["rocket.jpg"] not in [h["task_id"] for h in hits]
    assert next_task(ls, photos.project) not in {
        names[n] for n in ["coffee.jpg", "astronaut.jpg", "camera.jpg", "rocket.jpg"]
    }


def _tab_or_none(ls: LabelStudioServer, project: int, title: str):
    views = ls.request("GET", "/api/dm/views/", params={"project": project}).json()
    if not any(v["data"].get("title") == title for v in views):
        return None
    return tab(ls, project, title)


def test_near_duplicates_api_tab_and_diverse_queries(indexed: Stack) -> None:
    """The augmented copies the suite imported are found as pairs (and nothing else above the
    threshold); the tab holds the redundant copy of each pair; a diverse query returns no two
    members of one group. Runs after the rare-label test: some originals are labeled."""
    ls, photos, names = indexed.ls, indexed.photos, indexed.names
    url = f"{photos.url}/api/projects/{photos.project}/duplicates"
    first = requests.get(url, timeout=30)
    assert first.status_code in (200, 202), first.text
    report = wait_for(
        lambda: (r := requests.get(url, timeout=30)).status_code == 200
        and r.json()["status"] == "current" and r.json(),
        120,
        "the near-duplicate grouping",
    )
    assert report["threshold"] == 0.75  # timm models' default
    by_id = {v: k for k, v in names.items()}
    groups = {tuple(by_id[t] for t in g["task_ids"]) for g in report["groups"]}
    assert groups == {(f"{n}.jpg", f"{n}_copy.jpg") for n in PHOTOS}
    labeled = {names[n] for n in ("coffee.jpg", "astronaut.jpg", "camera.jpg", "rocket.jpg")}
    for group in report["groups"]:
        original, _ = group["task_ids"]
        assert group["keep"] == original  # the labeled one, or else the lower id
        assert group["max_score"] >= 0.75
        assert bool(group["labels"]) == (original in labeled)
    assert report["conflicting"] == []  # no copy carries a label yet
    _, tab_tasks = tab(ls, photos.project, "Near-duplicates")
    assert sorted(tab_tasks) == sorted(names[f"{n}_copy.jpg"] for n in PHOTOS)
    assert requests.get(url, params={"threshold": "2"}, timeout=30).status_code == 400
    page = requests.get(url, params={"page_size": 3, "page": 3}, timeout=30).json()
    assert len(page["groups"]) == 1 and page["total_groups"] == len(PHOTOS)

    # Varied results: a fresh photo of chelsea (neither task) finds the pair once.
    query = base64.b64encode(jpeg_bytes(photo("chelsea").rotate(3))).decode()
    plain = photos.similar(image=query, k=10).json()["results"]
    varied = photos.similar(image=query, k=10, diverse=True).json()["results"]
    plain_ids = [h["task_id"] for h in plain]
    varied_ids = [h["task_id"] for h in varied]
    pair = {names["chelsea.jpg"], names["chelsea_copy.jpg"]}
    assert pair <= set(plain_ids)
    assert len(pair & set(varied_ids)) == 1 and varied_ids[0] == plain_ids[0]
    for group in report["groups"]:
        assert len(set(group["task_ids"]) & set(varied_ids)) <= 1, group

    # A copy labeled differently from its original: that group is listed as conflicting.
    result = [{"from_name": "label", "to_name": "image", "type": "rectanglelabels",
               "original_width": 100, "original_height": 100,
               "value": {"x": 5, "y": 5, "width": 20, "height": 20, "rotation": 0,
                         "rectanglelabels": ["Car"]}}]
    response = ls.request("POST", f"/api/tasks/{names['rocket_copy.jpg']}/annotations/",
                          json={"result": result})
    assert response.status_code == 201, response.text
    report = wait_for(
        lambda: (r := requests.get(url, timeout=30).json()).get("status") == "current"
        and r["conflicting"] and r,
        120,
        "the conflicting group",
    )
    [conflict] = report["conflicting"]
    assert conflict["task_ids"] == [names["rocket.jpg"], names["rocket_copy.jpg"]]
    assert conflict["labels"] == {str(names["rocket.jpg"]): ["Police car"],
                                  str(names["rocket_copy.jpg"]): ["Car"]}

    # New tasks join their groups as they are indexed, with nobody asking: the tab follows.
    upload(ls, photos.project, {"horse_again.jpg": jpeg_bytes(augmented(photo("horse")))})
    again = wait_for(lambda: task_ids_by_name(ls, photos.project).get("horse_again.jpg"), 60,
                     "the new task")
    wait_for(lambda: again in tab(ls, photos.project, "Near-duplicates")[1] or None, 120,
             "the new copy in the tab")


def test_other_backends_predictions_are_never_hidden(indexed: Stack) -> None:
    """A project showing another model's predictions keeps them: tab only, sampling untouched."""
    ls = indexed.ls
    project = create_project(ls, "has other predictions")
    upload(
        ls,
        project,
        {f"{n}.jpg": jpeg_bytes(photo(n)) for n in PHOTOS[:3]}
        | {"coffee_copy.jpg": jpeg_bytes(augmented(photo("coffee")))},
    )
    ids = task_ids_by_name(ls, project)
    for task_id in ids.values():
        response = ls.request(
            "POST",
            "/api/predictions/",
            json={
                "task": task_id,
                "model_version": "yolo-v8",
                "score": 0.5,
                "result": [],
            },
        )
        assert response.status_code == 201, response.text
    ml_id = connect(ls, project, indexed.photos.url, "lookalike-photos-2")
    # The project shows the other model's predictions (connecting may have switched it to us).
    response = ls.request("PATCH", f"/api/projects/{project}", json={"model_version": "yolo-v8"})
    assert response.status_code == 200, response.text
    backend = Backend(indexed.photos.url, ml_id, project)
    wait_for(lambda: backend.status()["indexed"] == len(ids) or None, 120, "indexing")
    region = {
        "type": "keypointlabels",
        "from_name": "lookalike_image",
        "to_name": "image",
        "value": {"x": 50, "y": 50, "keypointlabels": ["Find similar: whole image"]},
    }
    message = status_message(interactive(ls, ml_id, ids["coffee.jpg"], region))
    assert "tab only" in message and "yolo-v8" in message, message
    _, tasks = tab(ls, project, f"Similar to #{ids['coffee.jpg']}")
    assert tasks and ids["coffee_copy.jpg"] in tasks
    info = ls.request("GET", f"/api/projects/{project}").json()
    assert info["model_version"] == "yolo-v8" and info["sampling"] != "Uncertainty sampling"
    predictions = ls.request("GET", "/api/predictions/", params={"project": project}).json()
    assert {p["model_version"] for p in predictions} == {"yolo-v8"}


def test_metrics_logs_and_status(indexed: Stack) -> None:
    import json
    import subprocess
    import sys

    photos = indexed.photos
    photos.similar(task_id=indexed.names["coffee.jpg"], k=3)
    text = requests.get(f"{photos.url}/metrics", timeout=10).text
    metrics = {
        line.split(" ")[0]: float(line.split(" ")[-1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert metrics["lookalike_tasks_indexed_total"] >= 14
    assert metrics["lookalike_task_failures_total"] >= 1  # the broken image
    assert metrics['lookalike_search_seconds_count{source="api"}'] >= 1
    assert metrics["lookalike_worker_embed_seconds_count"] >= 1
    assert metrics[f'lookalike_project_tasks{{project="{photos.project}",state="indexed"}}'] >= 14
    assert "lookalike_queue_depth" in metrics

    # Structured logs: JSON lines, and the API key nowhere in them.
    for name in ("photos-serve.log", "photos-worker-1.log", "photos-worker-2.log"):
        log = (indexed.root / name).read_text()
        assert indexed.ls.api_key not in log, name
        entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert entries and all({"time", "level", "logger", "message"} <= e.keys() for e in entries)

    status = subprocess.run(
        [sys.executable, "-m", "lookalike.cli", "status", "--json"],
        env={
            "REDIS_URL": indexed.photos_redis_url,
            "LOOKALIKE_VECTOR_DB": indexed.vector_db,
            "PATH": "/usr/bin:/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(status.stdout)
    mine = [p for p in report["projects"] if p["project"] == photos.project]
    assert mine and mine[0]["indexed"] == photos.status()["indexed"]


def test_local_storage_tasks_are_indexed_through_the_webhook(indexed: Stack) -> None:
    """Tasks synced from a Local Storage arrive by webhook and are fetched from Label Studio."""
    ls = indexed.ls
    folder = indexed.root / "local-storage"
    folder.mkdir()
    for name in ("chelsea", "rocket", "coffee"):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photo(name)))
    (folder / "chelsea_copy.jpg").write_bytes(jpeg_bytes(augmented(photo("chelsea"))))
    project = create_project(ls, "local storage")
    ml_id = connect(ls, project, indexed.photos.url, "lookalike-local")
    backend = Backend(indexed.photos.url, ml_id, project)
    response = ls.request(
        "POST",
        "/api/storages/localfiles/",
        json={
            "project": project,
            "title": "photos",
            "path": str(folder),
            "regex_filter": r".*\.jpg",
            "use_blob_urls": True,
        },
    )
    assert response.status_code == 201, response.text
    storage = response.json()["id"]
    response = ls.request("POST", f"/api/storages/localfiles/{storage}/sync")
    assert response.status_code == 200, response.text
    wait_for(lambda: backend.status()["indexed"] == 4 or None, 120, "local-storage tasks")
    tasks = ls.request("GET", "/api/tasks/", params={"project": project}).json()["tasks"]
    by_name = {t["data"]["image"].rsplit("/", 1)[-1]: t["id"] for t in tasks}
    assert all("/data/local-files/" in t["data"]["image"] for t in tasks)
    hits = backend.similar(task_id=by_name["chelsea_copy.jpg"], k=1).json()["results"]
    assert hits[0]["task_id"] == by_name["chelsea.jpg"]


def test_reindex_starts_clean_and_labeled_tasks_stay_out(indexed: Stack) -> None:
    """Last in the module: it empties the photos project's vectors and indexes them again."""
    photos, names = indexed.photos, indexed.names
    before = photos.status()
    labeled = before["labeled"]
    assert labeled >= 1  # the rare-label test annotated some
    response = requests.post(f"{photos.url}/api/projects/{photos.project}/reindex", timeout=10)
    assert response.status_code == 202, response.text
    # The reindex job's own summary proves the reset: after it, no task counted as indexed, so
    # every task was queued again. (Watching the count drop raced a fast reindex under load.)
    connection = redis.Redis.from_url(indexed.photos_redis_url)
    job = Job.fetch(response.json()["job_id"], connection=connection)

    def finished() -> dict | None:
        job.refresh()
        assert job.get_status() != JobStatus.FAILED, job.latest_result()
        return job.return_value() if job.get_status() == JobStatus.FINISHED else None

    summary = wait_for(finished, 120, "the reindex job")
    assert summary["enqueued"] == summary["tasks"] >= before["indexed"], summary
    wait_for(
        lambda: photos.status()["indexed"] == before["indexed"] or None, 240, "the reindex"
    )
    after = photos.status()
    assert after["labeled"] == labeled and after["pending"] == 0
    hits = photos.similar(task_id=names["coffee_copy.jpg"], k=10).json()["results"]
    ids = [h["task_id"] for h in hits]
    assert names["coffee.jpg"] not in ids  # labeled (rare-label test): excluded
    assert names["coffee_copy.jpg"] not in ids and len(ids) == len(set(ids))


def test_coverage_mode_serves_every_cluster_once_before_any_twice(indexed: Stack) -> None:
    """Coverage on: 'Label All Tasks' (Label Studio's own next-task) serves one task of each
    cluster before a second of any; a find-similar request made meanwhile still comes first."""
    ls = indexed.ls
    project = create_project(ls, "coverage")
    files = {}
    for name in PHOTOS:
        files[f"{name}.jpg"] = jpeg_bytes(photo(name))
        files[f"{name}_copy.jpg"] = jpeg_bytes(augmented(photo(name)))
    upload(ls, project, files)
    ml_id = connect(ls, project, indexed.photos.url, "lookalike-coverage")
    backend = Backend(indexed.photos.url, ml_id, project)
    wait_for(lambda: backend.status()["indexed"] == len(files) or None, 120, "indexing")
    url = f"{backend.url}/api/projects/{project}/coverage"
    response = requests.put(url, json={"enabled": True, "k": len(PHOTOS)}, timeout=30)
    assert response.status_code == 202, response.text
    ids = task_ids_by_name(ls, project)

    def clusters() -> dict[int, int] | None:
        found = {}
        for task in ids.values():
            predictions = ls.request("GET", "/api/predictions/", params={"task": task}).json()
            mine = [p for p in predictions if p["model_version"] == "lookalike"]
            if not mine or mine[0]["cluster"] is None:
                return None
            found[task] = mine[0]["cluster"]
        return found

    cluster_of = wait_for(clusters, 120, "coverage predictions")
    assert len(set(cluster_of.values())) == len(PHOTOS)
    assert requests.get(url, timeout=30).json()["clusters"] == len(PHOTOS)

    def label(task: int) -> None:
        response = ls.request("POST", f"/api/tasks/{task}/annotations/", json={"result": []})
        assert response.status_code == 201, response.text

    served = []
    for _ in range(3):
        served.append(next_task(ls, project))
        label(served[-1])
    # A request now (the page's "Queue selected") for a task whose cluster the annotator has
    # already labeled in: coverage alone would serve the unseen clusters first; it comes next.
    seen = {cluster_of[t] for t in served}
    best = min(t for t in ids.values() if t not in served and cluster_of[t] in seen)
    reply = requests.post(f"{backend.url}/api/projects/{project}/queue", timeout=30,
                          json={"title": "Picked", "results": [{"task_id": best, "score": 0.9}]})
    assert reply.status_code == 200 and reply.json()["priority"], reply.text
    assert next_task(ls, project) == best
    label(best)
    for _ in range(len(PHOTOS) - 3):
        served.append(next_task(ls, project))
        label(served[-1])
    first_round = [cluster_of[t] for t in served]
    assert len(set(first_round)) == len(PHOTOS), first_round  # no cluster twice
    # A task imported now gets its cluster as it is indexed (the nearest stored centre).
    upload(ls, project, {"chelsea_again.jpg": jpeg_bytes(augmented(photo("chelsea")))})
    new = task_ids_by_name(ls, project)["chelsea_again.jpg"]
    ids["chelsea_again.jpg"] = new
    cluster_of = wait_for(clusters, 120, "the new task's cluster")
    # (one of the pair may carry the request's own cluster instead: compare with the other)
    pair = {cluster_of[ids[n]] for n in ("chelsea.jpg", "chelsea_copy.jpg")}
    assert cluster_of[new] in {c for c in pair if c >= 0}
    # Off: Lookalike's coverage predictions go; Label Studio's order is its own again.
    assert requests.put(url, json={"enabled": False}, timeout=30).status_code == 202
    wait_for(lambda: requests.get(url, timeout=30).json()["clusters"] == 0 or None, 60, "off")
