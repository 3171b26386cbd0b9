"""Label suggestions, bulk suggestions and likely mislabels through the backend, in process:
Flask's test client, real Redis, in-process RQ jobs, real EfficientNet-Lite0 weights and real
photos, Label Studio faked at its HTTP boundary from recorded responses (the real one runs in
tests/test_e2e_suggestions.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.fake_label_studio import FakeLabelStudio, fake_label_studio
from tests.services import redis_server
from tests.test_web_label_studio import World, interactive, near_copy, png

from lookalike.config import Settings
from lookalike.service import jobs
from lookalike.service.runtime import Runtime
from lookalike.web.app import create_app

__all__ = ["fake_label_studio"]

CHOICES_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="kind" toName="image" choice="single">
    <Choice value="Cat"/><Choice value="Coffee"/><Choice value="Rocket"/><Choice value="Other"/>
  </Choices>
</View>"""
LABELED = {"chelsea": "Cat", "coffee": "Coffee", "rocket": "Rocket", "camera": "Other"}


def choice(label: str) -> list[dict]:
    return [
        {
            "id": "c1",
            "from_name": "kind",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [label]},
        }
    ]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def world(
    redis_url: str, tmp_path: Path, fake_label_studio: FakeLabelStudio, lite0_embedder, photos
) -> Iterator[World]:
    """Photos in a Choices project; four originals labeled, their near copies not."""
    ls = fake_label_studio
    project = ls.add_project("Kinds", CHOICES_CONFIG)["id"]
    ls.projects[project]["model_version"] = ""
    images = {name: photos[name] for name in (*LABELED, "astronaut")}
    images |= {f"{name} copy": near_copy(photos[name]) for name in LABELED}
    images["rocket again"] = photos["rocket"].rotate(3)  # a second labeled rocket
    task = {}
    for name, image in images.items():
        url = ls.add_file(f"{name.replace(' ', '-')}.png", png(image), project)
        label = LABELED.get(name) or ("Rocket" if name == "rocket again" else None)
        task[name] = ls.add_task(project, {"image": url}, annotations=int(bool(label)))["id"]
        if label:  # labeled before Lookalike was connected: the sync must see it
            ls.tasks[task[name]]["annotations"][0]["result"] = choice(label)
    settings = Settings(
        redis_url=redis_url,
        data_dir=tmp_path,
        label_studio_url=ls.url,
        label_studio_api_key=ls.api_key,
        similar_k=4,
        suggest_k=3,
        model="timm:efficientnet_lite0",
    )
    rt = Runtime(settings, embedder=lite0_embedder)
    rt.redis.flushdb()
    jobs.install(rt)
    world = World(ls, rt, create_app(rt).test_client(), project, task)
    world.client.post("/setup", json={"project": f"{project}.1", "schema": CHOICES_CONFIG})
    world.run_jobs()
    yield world
    rt.redis.flushdb()


def suggested(world: World) -> dict[int, tuple[list[str], float]]:
    out = {}
    for p in world.ls.predictions(world.project):
        if p["model_version"] == "lookalike" and p["result"]:
            [item] = p["result"]
            assert (item["from_name"], item["to_name"], item["type"]) == (
                "kind",
                "image",
                "choices",
            )
            out[p["task"]] = (item["value"]["choices"], item["score"])
    return out


def test_queued_copies_open_with_their_originals_label(world: World) -> None:
    reply = world.client.post(
        f"/api/projects/{world.project}/similar",
        json={"task_id": world.task["astronaut"], "k": 8, "queue": True},
    ).json
    assert "labels suggested from labeled look-alikes" in reply["message"]
    got = suggested(world)
    queued = [r["task_id"] for r in reply["results"]]
    assert set(got) == set(queued)  # every queued task carries a suggestion
    for name, label in LABELED.items():
        labels, confidence = got[world.task[f"{name} copy"]]
        assert labels == [label] and 0 < confidence <= 1, (name, labels)


def test_a_person_can_suggest_one_label_for_the_matches(world: World) -> None:
    picked = [world.task["chelsea copy"], world.task["astronaut"]]
    body = {
        "title": "Cats?",
        "results": [{"task_id": t, "score": 0.5} for t in picked],
        "suggest": "Cat",
    }
    reply = world.client.post(f"/api/projects/{world.project}/queue", json=body)
    assert reply.status_code == 200 and "label 'Cat' suggested" in reply.json["message"]
    assert {t: v[0] for t, v in suggested(world).items()} == {t: ["Cat"] for t in picked}
    bad = world.client.post(f"/api/projects/{world.project}/queue", json={**body, "suggest": "x"})
    assert bad.status_code == 400 and "'x' is not one of" in bad.json["error"]


def label(world: World, task: int, name: str) -> None:
    """Annotate `task` with the choice `name`, as Label Studio would (and tell the backend)."""
    [annotation] = world.ls.add_task(world.project, {"image": "x"}, annotations=1)["annotations"]
    borrowed = world.ls.tasks.pop(annotation["task"])["annotations"]  # only its annotation
    borrowed[0].update(task=task, result=choice(name))
    world.ls.tasks[task]["annotations"] = borrowed
    event = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": world.project},
        "task": {"id": task},
        "annotation": {"id": annotation["id"], "task": task, "result": choice(name)},
    }
    assert world.client.post("/webhook", json=event).status_code == 200
    world.run_jobs()


def test_a_flipped_label_lands_in_possibly_mislabeled(world: World) -> None:
    """Every kind labeled twice, then the rocket's copy labeled "Cat": its look-alikes (two
    labeled rockets) say Rocket; nothing else is flagged."""
    for name in ("chelsea", "coffee", "camera"):
        label(world, world.task[f"{name} copy"], LABELED[name])
    views = {v["data"]["title"]: v["data"] for v in world.ls.views(world.project)}
    if "Possibly mislabeled" in views:  # flagged while a kind had one label only, then cleared
        assert views["Possibly mislabeled"]["filters"]["items"][0]["value"] == -1
    copy = world.task["rocket copy"]
    label(world, copy, "Cat")
    tab = world.tab("Possibly mislabeled")
    assert [i["value"] for i in tab["filters"]["items"]] == [copy]
    [prediction] = [p for p in world.ls.predictions(world.project) if p["task"] == copy]
    assert prediction["result"][0]["value"]["choices"] == ["Rocket"]
    assert prediction["mislabeling"] > 0.5
    # Corrected: the flag goes, and the tab empties.
    label(world, copy, "Rocket")
    assert world.tab("Possibly mislabeled")["filters"]["items"][0]["value"] == -1
    [prediction] = [p for p in world.ls.predictions(world.project) if p["task"] == copy]
    assert prediction["result"] == [] and prediction["mislabeling"] == 0


def interactive_choices(world: World, task: int, region: dict) -> dict:
    return interactive(world, task, [region], CHOICES_CONFIG)


def prompt(text: str) -> dict:
    return {"id": "t", "from_name": "lookalike_text", "to_name": "image", "type": "textarea",
            "value": {"text": [text]}}  # fmt: skip


def test_a_label_prompt_in_the_editor_suggests_it_for_the_latest_matches(world: World) -> None:
    task = world.task["astronaut"]
    said = interactive_choices(world, task, prompt("label: Cat"))["message"]
    assert said.startswith("Find similar first") and "'label: Cat'" in said
    whole = {"id": "w", "from_name": "lookalike_point", "to_name": "image",
             "type": "keypointlabels", "value": {"x": 50, "y": 50}}  # fmt: skip
    said = interactive_choices(world, task, whole)["message"]
    assert "similar unlabeled tasks queued in tab" in said
    title, matches = world.rt.state(world.project).latest_matches.get(task)
    assert matches and title in said
    before = suggested(world)
    assert any(before[h.id][0] != ["Cat"] for h in matches)  # the look-alikes' own votes

    said = interactive_choices(world, task, prompt("  Label:  Cat "))["message"]
    assert f"queued in tab '{title}'" in said and "label 'Cat' suggested for them" in said
    after = suggested(world)
    assert {h.id: after[h.id][0] for h in matches} == {h.id: ["Cat"] for h in matches}
    said = interactive_choices(world, task, prompt("label: Dog"))["message"]
    assert "'Dog' is not one of" in said
    # an ordinary prompt that merely mentions a label is still a text query
    assert "label" not in (interactive_choices(world, task, prompt("a cat label"))["message"])
