"""The protocol and REST routes that call Label Studio, in process: Flask's test client, a real
Redis, real RQ jobs run by an in-process worker, real EfficientNet-Lite0 weights, real photos.

Label Studio itself is faked at its HTTP boundary (`tests/fake_label_studio.py`, built from
recorded Label Studio 1.23.2 responses) so these run in seconds; the real server is exercised by
the end-to-end tests.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from PIL import Image, ImageOps
from rq import SimpleWorker
from tests.fake_label_studio import FakeLabelStudio, fake_label_studio
from tests.services import redis_server

from lookalike.config import Settings
from lookalike.service import jobs
from lookalike.service.queueing import BY_ID, BY_SCORE, UNCERTAINTY
from lookalike.service.runtime import Runtime
from lookalike.web.app import create_app

__all__ = ["fake_label_studio"]  # the fixture, used by name below

PLUGIN_CONFIG = (Path(__file__).resolve().parents[1] / "plugin_config.xml").read_text()
NAMES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "motorcycle_left", "coins")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def near_copy(image: Image.Image) -> Image.Image:
    """A mirrored, slightly cropped, darker copy: a near duplicate for a human."""
    width, height = image.size
    cropped = ImageOps.mirror(image).crop((width // 20, height // 20, width, height))
    return cropped.point(lambda v: int(v * 0.85))


@dataclass
class World:
    ls: FakeLabelStudio
    rt: Runtime
    client: FlaskClient
    project: int
    task: dict[str, int]  # photo name (and "<name> copy") -> task id

    def run_jobs(self) -> None:
        SimpleWorker([self.rt.jobs.queue], connection=self.rt.redis).work(burst=True)

    def tab(self, title: str) -> dict:
        [view] = [v for v in self.ls.views(self.project) if v["data"]["title"] == title]
        return view["data"]

    def scores(self) -> dict[int, float]:
        """Lookalike's prediction score per task; fails on a duplicate prediction."""
        mine = [p for p in self.ls.predictions(self.project) if p["model_version"] == "lookalike"]
        assert len({p["task"] for p in mine}) == len(mine), "one prediction per task"
        return {p["task"]: p["score"] for p in mine}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def world(
    redis_url: str, tmp_path: Path, fake_label_studio: FakeLabelStudio, lite0_embedder, photos
) -> Iterator[World]:
    """A project of 7 photos plus near copies of chelsea and rocket, connected and indexed."""
    ls = fake_label_studio
    project = ls.add_project("Photos", PLUGIN_CONFIG)["id"]
    ls.projects[project]["model_version"] = ""  # a new project shows no model version
    images = {name: photos[name] for name in NAMES}
    images |= {f"{name} copy": near_copy(photos[name]) for name in ("chelsea", "rocket")}
    task = {}
    for name, image in images.items():
        url = ls.add_file(f"{name.replace(' ', '-')}.png", png(image), project)
        task[name] = ls.add_task(project, {"image": url})["id"]
    settings = Settings(
        redis_url=redis_url,
        data_dir=tmp_path,
        label_studio_url=ls.url,
        label_studio_api_key=ls.api_key,
        similar_k=3,
        model="timm:efficientnet_lite0",
    )
    rt = Runtime(settings, embedder=lite0_embedder)
    rt.redis.flushdb()
    jobs.install(rt)
    world = World(ls, rt, create_app(rt).test_client(), project, task)
    reply = world.client.post("/setup", json={"project": f"{project}.1", "schema": PLUGIN_CONFIG})
    assert reply.status_code == 200
    world.run_jobs()
    yield world
    rt.redis.flushdb()


def box_query(world: World, task: int, box: dict | None = None) -> dict:
    """What the editor sends when a 'Find similar' box is drawn on `task`."""
    value = {"x": 0, "y": 0, "width": 100, "height": 100, "rectanglelabels": ["Find similar"]}
    region = {
        "from_name": "lookalike_box",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {**value, **(box or {})},
    }
    return interactive(world, task, [region])


def interactive(
    world: World, task: int, regions: list[dict], label_config: str = PLUGIN_CONFIG
) -> dict:
    """The editor's interactive /predict on `task` with these regions; the one result."""
    body = {
        "tasks": [{"id": task, "data": world.ls.tasks[task]["data"]}],
        "project": f"{world.project}.1",
        "label_config": label_config,
        "params": {"context": {"result": regions}},
    }
    reply = world.client.post("/predict", json=body)
    assert reply.status_code == 200, reply.json
    [result] = reply.json["results"]
    return result


# ------------------------------------------------------------------ indexing through jobs
def test_setup_indexes_every_task_through_the_jobs(world: World) -> None:
    status = world.client.get(f"/api/projects/{world.project}/index-status").json
    assert (status["total"], status["indexed"], status["failed"]) == (9, 9, 0)
    assert status["model"] == "timm:efficientnet_lite0"


def test_a_broken_image_fails_that_task_only_with_its_reason(world: World) -> None:
    url = world.ls.add_file("broken.jpg", b"\xff\xd8 this is not a jpeg", world.project)
    broken = world.ls.add_task(world.project, {"image": url})
    good = world.ls.add_task(
        world.project, {"image": world.ls.tasks[world.task["coins"]]["data"]["image"]}
    )
    event = {"action": "TASKS_CREATED", "project": {"id": world.project}, "tasks": [broken, good]}
    assert world.client.post("/webhook", json=event).json["enqueued"] == 1
    world.run_jobs()
    status = world.client.get(f"/api/projects/{world.project}/index-status").json
    assert (status["total"], status["indexed"], status["failed"]) == (11, 10, 1)
    [failure] = status["failures"]
    assert failure["task_id"] == broken["id"] and failure["reason"].startswith("not_an_image")


def test_deleted_tasks_leave_the_index(world: World) -> None:
    gone = world.task["chelsea copy"]
    event = {"action": "TASKS_DELETED", "project": {"id": world.project}, "tasks": [{"id": gone}]}
    world.client.post("/webhook", json=event)
    world.run_jobs()
    hits = world.client.post(
        f"/api/projects/{world.project}/similar", json={"task_id": world.task["chelsea"], "k": 8}
    ).json["results"]
    assert gone not in [h["task_id"] for h in hits] and len(hits) == 7


# ------------------------------------------------------------------ the editor's box query
def test_a_box_in_the_editor_queues_its_matches_best_first(world: World) -> None:
    copy = world.task["chelsea copy"]
    reply = box_query(world, copy)
    assert (
        f"3 similar unlabeled tasks queued in tab 'Similar to #{copy} (box)'"
        in (reply["result"][0]["value"]["text"][0])
    )
    tab = world.tab(f"Similar to #{copy} (box)")
    listed = [item["value"] for item in tab["filters"]["items"]]
    assert listed[0] == world.task["chelsea"] and copy not in listed
    assert tab["ordering"] == BY_SCORE
    scores = world.scores()
    assert [t for t in sorted(scores, key=scores.get)] == listed  # served in the tab's order
    project = world.ls.project(world.project)
    assert (project["model_version"], project["sampling"]) == ("lookalike", UNCERTAINTY)


def test_a_box_on_a_task_without_an_image_says_why(world: World) -> None:
    body = {
        "tasks": [{"id": 999, "data": {}}],
        "project": f"{world.project}.1",
        "label_config": PLUGIN_CONFIG,
        "params": {"context": {"result": [{"type": "rectanglelabels", "value": {
            "x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["Find similar"]}}]}},
    }  # fmt: skip
    [result] = world.client.post("/predict", json=body).json["results"]
    said = result["result"][0]["value"]["text"][0]
    assert said == "Lookalike could not read this task's image; ask your admin."


# ------------------------------------------------------------------ queue order (REST)
def test_the_latest_request_is_served_first_and_each_tab_keeps_its_own_order(
    world: World,
) -> None:
    url = f"/api/projects/{world.project}/similar"
    first = world.client.post(url, json={"task_id": world.task["chelsea"], "queue": True}).json
    second = world.client.post(url, json={"task_id": world.task["rocket"], "queue": True}).json
    assert first["results"][0]["task_id"] == world.task["chelsea copy"]
    assert second["results"][0]["task_id"] == world.task["rocket copy"]
    scores = world.scores()
    newest = [r["task_id"] for r in second["results"]]
    older_only = [r["task_id"] for r in first["results"] if r["task_id"] not in newest]
    # "Label All Tasks" serves the lowest score first: the latest request's matches, in order.
    assert sorted(newest, key=scores.get) == newest
    assert max(scores[t] for t in newest) < min(scores[t] for t in older_only)
    assert world.tab(second["tab"])["filters"]["items"][0]["value"] == world.task["rocket copy"]
    assert world.tab(first["tab"])["ordering"] == BY_SCORE
    # Asked again, the first request becomes the latest: same predictions, rewritten.
    again = world.client.post(url, json={"task_id": world.task["chelsea"], "queue": True}).json
    rescored = world.scores()
    assert len(rescored) == len(scores)
    assert rescored[again["results"][0]["task_id"]] < min(rescored[t] for t in newest)


def test_another_backends_predictions_keep_the_queue_to_a_tab(world: World) -> None:
    other = {"task": world.task["coffee"], "result": [], "score": 0.9, "model_version": "yolo"}
    world.ls.predictions_by_id[1000] = {**world.ls.predictions_by_id[1], **other}
    world.ls.predictions_by_id[1000].update(id=1000, project=world.project)
    reply = world.client.post(
        f"/api/projects/{world.project}/similar",
        json={"task_id": world.task["chelsea"], "queue": True},
    ).json
    assert "tab only, in task id order" in reply["message"] and reply["priority"] is False
    assert world.tab(reply["tab"])["ordering"] == BY_ID
    assert world.scores() == {}
    assert world.ls.project(world.project)["model_version"] == ""


def test_queue_puts_exactly_the_given_results_in_a_tab(world: World) -> None:
    picked = [world.task["coins"], world.task["camera"]]
    body = {"title": "Picked", "results": [{"task_id": t, "score": 0.5} for t in picked]}
    reply = world.client.post(f"/api/projects/{world.project}/queue", json=body)
    assert reply.status_code == 200, reply.json
    assert [i["value"] for i in world.tab("Picked")["filters"]["items"]] == picked
    assert set(world.scores()) == set(picked)


# ------------------------------------------------------------------ the search page's routes
def test_projects_lists_label_studio_projects_with_index_status(world: World) -> None:
    overview = world.client.get("/api/projects").json
    assert overview["text_search"] is False  # EfficientNet cannot embed text: the page hides it
    projects = overview["projects"]
    mine = next(p for p in projects if p["id"] == world.project)
    assert mine["connected"] and mine["status"]["indexed"] == 9 and mine["task_count"] == 9
    assert mine["url"] == f"{world.ls.url}/projects/{world.project}/data"
    assert {p["id"] for p in projects} == set(world.ls.projects)


def test_thumbnail_is_a_jpeg_of_the_task_image(world: World, photos) -> None:
    task = world.task["chelsea"]
    reply = world.client.get(f"/api/projects/{world.project}/tasks/{task}/thumbnail?size=128")
    assert reply.status_code == 200 and reply.mimetype == "image/jpeg"
    image = Image.open(io.BytesIO(reply.data))
    width, height = photos["chelsea"].size
    assert image.format == "JPEG" and max(image.size) == 128
    assert abs(image.size[0] / image.size[1] - width / height) < 0.02
    assert "Token" not in reply.get_data(as_text=False).decode("latin-1")


def test_a_task_of_another_project_is_not_found(world: World) -> None:
    other = world.ls.add_task(1, {"image": "/data/upload/1/x.png"})["id"]
    reply = world.client.get(f"/api/projects/{world.project}/tasks/{other}/thumbnail")
    assert reply.status_code == 404 and f"not in project {world.project}" in reply.json["error"]


def test_label_studio_down_is_a_502_not_the_callers_fault(world: World) -> None:
    with world.ls.down():
        reply = world.client.post(
            f"/api/projects/{world.project}/similar",
            json={"task_id": world.task["chelsea"], "box": [0, 0, 50, 50]},
        )
    assert reply.status_code == 502 and "reading task" in reply.json["error"], reply.json
    with world.ls.down():
        thumb = world.client.get(
            f"/api/projects/{world.project}/tasks/{world.task['camera']}/thumbnail"
        )
    assert thumb.status_code == 502 and world.ls.api_key not in thumb.get_data(as_text=True)


# ------------------------------------------------------------------ query regions leave annotations
def test_a_submitted_annotation_loses_lookalikes_regions_and_keeps_the_users(world: World) -> None:
    task = world.task["coffee"]
    [annotation] = world.ls.add_task(world.project, {"image": "x"}, annotations=1)["annotations"]
    stored = next(a for a in world.ls.tasks[annotation["task"]]["annotations"])
    box = {"x": 1, "y": 1, "width": 40, "height": 40, "rotation": 0}
    stored["result"] = [
        {"id": "q1", "from_name": "lookalike_box", "to_name": "image", "type": "rectangle",
         "value": box},
        {"id": "q1", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
         "value": {**box, "rectanglelabels": ["Car"]}},  # selected while the query was drawn
        {"id": "s1", "from_name": "lookalike_status", "to_name": "image", "type": "textarea",
         "value": {"text": ["9 similar unlabeled tasks queued"]}},
        {"id": "u1", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
         "value": {**box, "x": 50, "rectanglelabels": ["Police car"]}},
    ]  # fmt: skip
    event = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": world.project},
        "task": {"id": task},
        "annotation": {"id": annotation["id"], "task": task, "result": stored["result"]},
    }
    assert world.client.post("/webhook", json=event).status_code == 200
    world.run_jobs()
    assert [r["id"] for r in stored["result"]] == ["u1"]
    patches = [c for c in world.ls.log if c.method == "PATCH" and "/annotations/" in c.path]
    assert len(patches) == 1
    # Label Studio then reports the update: clean now, so nothing more is patched.
    event["action"], event["annotation"]["result"] = "ANNOTATION_UPDATED", stored["result"]
    world.client.post("/webhook", json=event)
    world.run_jobs()
    assert len([c for c in world.ls.log if c.method == "PATCH" and "/annotations/" in c.path]) == 1


def test_the_reply_lists_the_tasks_latest_queries_newest_first(world: World) -> None:
    copy = world.task["rocket copy"]
    first = box_query(world, copy)["result"][0]["value"]["text"]
    text = {"from_name": "lookalike_text", "to_name": "image", "type": "textarea",
            "value": {"text": ["a rocket at night"]}}  # fmt: skip
    reply = interactive(world, copy, [text])
    texts = reply["result"][0]["value"]["text"]
    assert texts[0] == "Text search is not available for this project's model; ask your admin."
    assert texts[1:] == first and len(texts) == 2


def test_a_tab_shows_the_picture_the_id_and_the_score_only(world: World) -> None:
    reply = world.client.post(
        f"/api/projects/{world.project}/similar",
        json={"task_id": world.task["chelsea"], "queue": True},
    ).json
    tab = world.tab(reply["tab"])
    hidden = set(tab["hiddenColumns"]["explore"])
    assert {"tasks:id", "tasks:data.image", "tasks:predictions_score"}.isdisjoint(hidden)
    assert {"tasks:annotators", "tasks:created_at", "tasks:predictions_results"} <= hidden
    assert tab["hiddenColumns"]["labeling"] == tab["hiddenColumns"]["explore"]
    # The score column reads -R.SS: this project's first request, and the similarity.
    best = reply["results"][0]
    assert world.scores()[best["task_id"]] == pytest.approx(-(1 + best["score"]), abs=1e-5)


def test_a_label_selected_while_drawing_the_query_is_called_out(world: World) -> None:
    copy = world.task["chelsea copy"]
    value = {"x": 0, "y": 0, "width": 100, "height": 100, "rotation": 0}
    regions = [
        {"id": "q", "from_name": "lookalike_box", "to_name": "image", "type": "rectangle",
         "value": value},
        {"id": "q", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
         "value": {**value, "rectanglelabels": ["Car"]}},
    ]  # fmt: skip
    said = interactive(world, copy, regions)["result"][0]["value"]["text"][0]
    assert said.startswith("3 similar unlabeled tasks queued in tab")
    assert "not a 'Car' label: it is left out when you submit" in said


# ------------------------------------------------------------------ Label Studio outages
def test_a_label_studio_outage_is_retried_not_failed_for_good(world: World, photos) -> None:
    from rq.job import Job

    url = world.ls.add_file("late.png", png(photos["coins"]), world.project)
    task = world.ls.add_task(world.project, {"image": url})
    event = {"action": "TASKS_CREATED", "project": {"id": world.project}, "tasks": [task]}
    with world.ls.down():
        world.client.post("/webhook", json=event)
        world.run_jobs()
        status = world.client.get(f"/api/projects/{world.project}/index-status").json
        [failure] = status["failures"]
        assert failure["reason"].startswith("download_failed") and status["retrying"] == 1
        assert world.rt.state(world.project).failures.all()[0].final is False
        registry = world.rt.jobs.queue.scheduled_job_registry
        [job_id] = registry.get_job_ids()
        due = registry.get_scheduled_time(job_id).timestamp() - __import__("time").time()
        assert 5 < due <= 15  # the outage schedule's first step, then longer ones
    # Label Studio is back: the retry (run now instead of in 15 s) indexes the task.
    job = Job.fetch(job_id, connection=world.rt.redis)
    registry.remove(job)
    world.rt.jobs.queue.enqueue_job(job)
    world.run_jobs()
    status = world.client.get(f"/api/projects/{world.project}/index-status").json
    assert status["failures"] == [] and status["indexed"] == status["total"] == 10


def test_a_task_announced_while_a_sync_lists_the_project_is_kept(world: World, photos) -> None:
    """Label Studio sends TASKS_CREATED before a listing shows the task (local storage sync):
    the sync running meanwhile must not drop it."""
    from lookalike.service import indexing

    url = world.ls.add_file("during.png", png(photos["coins"]), world.project)
    late = {"id": 999, "data": {"image": url}}
    listing = world.rt.ls.iter_tasks

    def listing_with_a_webhook(project: int, page_size: int = 500):
        yield from listing(project, page_size)  # without the new task: not committed yet
        world.ls.tasks[999] = {**world.ls.tasks[world.task["coins"]], "id": 999, **late}
        event = {"action": "TASKS_CREATED", "project": {"id": project}, "tasks": [late]}
        assert world.client.post("/webhook", json=event).status_code == 200

    world.rt.ls.iter_tasks = listing_with_a_webhook  # type: ignore[method-assign]
    try:
        indexing.sync_project(world.rt, world.project, retry_failed=False)
    finally:
        world.rt.ls.iter_tasks = listing  # type: ignore[method-assign]
    assert 999 in world.rt.state(world.project).tasks
    world.run_jobs()
    assert 999 in world.rt.state(world.project).vectors.ids()


def test_the_task_file_cache_stays_under_its_limit(world: World, tmp_path: Path, photos) -> None:
    """Every download goes through the per-process cache; it never grows past its limit."""
    cache = tmp_path / "cache"
    limit = 600_000  # one or two of these photos
    sizes = []
    for name in ("astronaut", "coffee", "rocket", "chelsea"):
        task = world.ls.tasks[world.task[name]]
        raw = world.rt.ls.task_image_bytes(task, "image", world.rt.limits, cache, limit)
        assert raw == world.ls.files[task["data"]["image"]]  # the right bytes, cached or not
        sizes.append(sum(f.stat().st_size for f in cache.iterdir()))
    assert max(sizes) <= limit and len(list(cache.iterdir())) >= 1
