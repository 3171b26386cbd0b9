"""End to end with a real Label Studio 1.23 and a `Choices` labeling config: label suggestions
from look-alikes, accepted with Label Studio's own "Create Annotations From Predictions", and a
deliberately flipped label landing in "Possibly mislabeled". Real Redis, `lookalike serve` and
`lookalike worker` (EfficientNet-Lite0, real ImageNet weights), real photos."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from tests.services import (
    LabelStudioServer,
    backend_env,
    label_studio_server,
    lookalike_process,
    redis_server,
    serving,
)
from tests.test_e2e_backend import (
    augmented,
    connect,
    interactive,
    jpeg_bytes,
    photo,
    tab,
    task_ids_by_name,
    upload,
    wait_for,
)
from tests.test_web_suggestions import CHOICES_CONFIG, LABELED, choice

from lookalike.core.weights import convert_efficientnet_lite0

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    ls: LabelStudioServer
    url: str
    project: int
    ids: dict[str, int]  # file name -> task id
    ml_id: int = 0  # the backend's record in Label Studio

    def status(self) -> dict:
        url = f"{self.url}/api/projects/{self.project}/index-status"
        return requests.get(url, timeout=10).json()

    def annotate(self, task: int, label: str) -> int:
        response = self.ls.request(
            "POST", f"/api/tasks/{task}/annotations/", json={"result": choice(label)}
        )
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def predictions(self, task: int) -> list[dict]:
        return self.ls.request("GET", f"/api/tasks/{task}").json()["predictions"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("suggestions")
    weights = convert_efficientnet_lite0(root / "efficientnet_lite0.pth")
    files = {f"{n}.jpg": jpeg_bytes(photo(n)) for n in (*LABELED, "astronaut")}
    files |= {f"{n}_copy.jpg": jpeg_bytes(augmented(photo(n))) for n in LABELED}
    files["rocket_again.jpg"] = jpeg_bytes(photo("rocket").rotate(3))
    with redis_server(root / "redis") as redis_url, label_studio_server(root / "ls") as ls:
        env = backend_env(root, ls, redis_url, weights, LOOKALIKE_SUGGEST_K="3")
        with (
            lookalike_process(["worker"], env, root / "worker.log"),
            serving(env, root / "serve.log") as url,
        ):
            response = ls.request(
                "POST", "/api/projects/", json={"title": "Kinds", "label_config": CHOICES_CONFIG}
            )
            assert response.status_code == 201, response.text
            project = int(response.json()["id"])
            upload(ls, project, files)
            stack = Stack(ls, url, project, task_ids_by_name(ls, project))
            # Labeled before Lookalike is connected: the first sync must pick the labels up.
            for name, label in LABELED.items():
                stack.annotate(stack.ids[f"{name}.jpg"], label)
            stack.annotate(stack.ids["rocket_again.jpg"], "Rocket")
            stack.ml_id = connect(ls, project, url, "lookalike")
            wait_for(lambda: stack.status()["indexed"] == len(files) or None, 240, "indexing")
            yield stack


def test_matches_open_with_the_look_alikes_label_and_can_be_accepted(stack: Stack) -> None:
    reply = requests.post(
        f"{stack.url}/api/projects/{stack.project}/similar",
        json={"task_id": stack.ids["astronaut.jpg"], "k": 8, "queue": True},
        timeout=60,
    ).json()
    assert "labels suggested from labeled look-alikes" in reply["message"], reply
    copies = {stack.ids[f"{name}_copy.jpg"]: label for name, label in LABELED.items()}
    assert set(copies) <= {r["task_id"] for r in reply["results"]}
    project = stack.ls.request("GET", f"/api/projects/{stack.project}").json()
    assert project["model_version"] == "lookalike"  # so the editor loads these predictions
    for task, label in copies.items():
        [mine] = [p for p in stack.predictions(task) if p["model_version"] == "lookalike"]
        assert mine["result"][0]["value"]["choices"] == [label], (task, mine["result"])

    # Label Studio's own action, on the tasks of the tab: the suggestions become annotations.
    _, listed = tab(stack.ls, stack.project, reply["tab"])
    response = stack.ls.request(
        "POST",
        "/api/dm/actions/",
        params={"id": "predictions_to_annotations", "project": stack.project},
        json={
            "selectedItems": {"all": False, "included": list(copies)},
            "model_version": "lookalike",
        },
    )
    assert response.status_code == 200, response.text
    assert set(copies) <= set(listed)
    for task, label in copies.items():
        annotations = stack.ls.request("GET", f"/api/tasks/{task}").json()["annotations"]
        assert [a["result"][0]["value"]["choices"] for a in annotations] == [[label]]


def test_a_flipped_label_lands_in_possibly_mislabeled(stack: Stack) -> None:
    flipped = stack.ids["rocket_copy.jpg"]
    annotations = stack.ls.request("GET", f"/api/tasks/{flipped}").json()["annotations"]
    if annotations:  # accepted above: an annotator now changes it to the wrong kind
        response = stack.ls.request(
            "PATCH", f"/api/annotations/{annotations[-1]['id']}/", json={"result": choice("Cat")}
        )
        assert response.status_code == 200, response.text
    else:
        stack.annotate(flipped, "Cat")

    def flagged() -> list[int] | None:
        views = stack.ls.request("GET", "/api/dm/views/", params={"project": stack.project})
        if "Possibly mislabeled" not in {v["data"]["title"] for v in views.json()}:
            return None
        _, tasks = tab(stack.ls, stack.project, "Possibly mislabeled")
        return tasks if flipped in tasks else None

    tasks = wait_for(flagged, 60, "the flipped task in 'Possibly mislabeled'")
    assert tasks == [flipped]
    [mine] = [p for p in stack.predictions(flipped) if p["model_version"] == "lookalike"]
    assert mine["result"][0]["value"]["choices"] == ["Rocket"] and mine["mislabeling"] > 0.5


def test_a_label_prompt_in_the_editor_suggests_it_for_the_latest_matches(stack: Stack) -> None:
    """Through Label Studio's interactive-annotating: a whole-image query on a labeled cat,
    then `label: Cat` typed in the prompt: its matches' predictions pre-select Cat."""
    task = stack.ids["chelsea.jpg"]
    whole = {"id": "w1", "from_name": "lookalike_point", "to_name": "image",
             "type": "keypointlabels", "value": {"x": 50, "y": 50}}  # fmt: skip
    said = interactive(stack.ls, stack.ml_id, task, whole)["data"]["message"]
    title = re.search(r"queued in tab '([^']+)'", said)
    assert title, said
    _, matches = tab(stack.ls, stack.project, title[1])
    assert matches, said
    prompt = {"id": "t1", "from_name": "lookalike_text", "to_name": "image", "type": "textarea",
              "value": {"text": ["label: Cat"]}}  # fmt: skip
    said = interactive(stack.ls, stack.ml_id, task, prompt)["data"]["message"]
    assert "label 'Cat' suggested for them" in said, said
    for match in matches:
        [mine] = [p for p in stack.predictions(match) if p["model_version"] == "lookalike"]
        assert mine["result"][0]["value"]["choices"] == ["Cat"], (match, mine["result"])
