"""The real `LabelStudioClient` against the fake Label Studio, and the fake against recordings
of a real Label Studio 1.23.2 (tests/data/label_studio/, from tests/record_label_studio.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from tests.fake_label_studio import RECORDED, FakeLabelStudio, fake_label_studio

from lookalike.core.images import ImageLimits
from lookalike.service.ls_client import LabelStudioClient, LabelStudioError

__all__ = ["fake_label_studio"]  # the fixture, used by name below

Fake = FakeLabelStudio
# Dicts keyed by data rather than by schema: their keys are not compared.
DATA_KEYED = {"control_weights", "parsed_label_config"}
# Recorded calls the client never makes, so the fake does not serve them.
NOT_SERVED = {"token_create", "ml_create", "file_download"}


def recorded(name: str) -> dict[str, Any]:
    """{"request": {"method", "path", "params", "json"}, "status", "body"}"""
    return json.loads((RECORDED / f"{name}.json").read_text())


def shape(value: Any, path: str = "") -> set[str]:
    """Every key path in a JSON value ("tasks[].annotations[].completed_by.email", ...)."""
    if isinstance(value, dict):
        out = set()
        for key, item in value.items():
            out.add(f"{path}.{key}")
            if key not in DATA_KEYED:
                out |= shape(item, f"{path}.{key}")
        return out
    if isinstance(value, list):
        return set().union(*(shape(item, f"{path}[]") for item in value)) if value else set()
    return set()


def png(color: tuple[int, int, int] = (0, 90, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def client(fake_label_studio: Fake) -> LabelStudioClient:
    return LabelStudioClient(fake_label_studio.url, fake_label_studio.api_key, timeout=5)


# --------------------------------------------------------------------------- the fake is real


def replay_headers(name: str, fake: Fake) -> dict[str, str]:
    if name == "unauthorized" or name.startswith("token_refresh"):
        return {}
    if name == "bad_token":
        return {"Authorization": "Token " + "0" * 40}
    if name == "projects_list_bearer":
        access = requests.post(f"{fake.url}/api/token/refresh/", json={"refresh": fake.pat})
        return {"Authorization": "Bearer " + access.json()["access"]}
    return {"Authorization": f"Token {fake.api_key}"}


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in RECORDED.glob("*.json") if p.stem not in NOT_SERVED)
)
def test_fake_answers_like_the_recorded_label_studio(name: str, fake_label_studio: Fake) -> None:
    record = recorded(name)
    req = record["request"]
    body = req["json"]
    if name == "token_refresh":
        body = {"refresh": fake_label_studio.pat}
    response = requests.request(
        req["method"],
        fake_label_studio.url + req["path"],
        params=req["params"],
        json=body,
        headers=replay_headers(name, fake_label_studio),
        timeout=5,
    )
    assert response.status_code == record["status"], response.text
    if name == "model_versions":  # {"<version>": count}
        assert response.json() == record["body"]
    else:
        assert shape(response.json()) == shape(record["body"])


def test_new_objects_have_the_recorded_shape(fake_label_studio: Fake) -> None:
    fake = fake_label_studio
    task = fake.add_task(1, {"image": "http://images.example/c.jpg"}, annotations=2)
    headers = {"Authorization": f"Token {fake.api_key}"}
    got = requests.get(f"{fake.url}/api/tasks/{task['id']}/", headers=headers, timeout=5).json()
    assert shape(got) == shape(recorded("task_get")["body"])
    assert got["total_annotations"] == 2 and got["is_labeled"]
    listed = requests.get(
        f"{fake.url}/api/tasks/", params={"project": 1, "page_size": 10}, headers=headers, timeout=5
    ).json()
    pages = [recorded(page)["body"] for page in ("tasks_list", "tasks_list_page2")]
    assert shape(listed) == shape(pages[0]) | shape(pages[1])
    assert listed["total"] == 4 and fake.project(1)["num_tasks_with_annotations"] == 2
    new = fake.add_project("Second")
    assert shape(new) == shape(recorded("project_get")["body"]) and new["task_number"] == 0


def test_files_need_the_same_credentials_as_in_label_studio(fake_label_studio: Fake) -> None:
    fake = fake_label_studio
    real = recorded("file_download")["body"]
    access = requests.post(f"{fake.url}/api/token/refresh/", json={"refresh": fake.pat}).json()
    auths = {
        "token": f"Token {fake.api_key}",
        "bearer": f"Bearer {access['access']}",
        "none": None,
        "bad_token": "Token " + "0" * 40,
    }
    proxy = "/storage-data/uploaded/?filepath=" + real["url"].removeprefix("/data/")
    for label, path in (("data_upload", real["url"]), ("storage_proxy", proxy)):
        for auth, header in auths.items():
            headers = {"Authorization": header} if header else {}
            response = requests.get(fake.url + path, headers=headers, timeout=5)
            expected = real[f"{label}_{auth}"]
            assert response.status_code == expected["status"], (label, auth)
            assert response.headers["Content-Type"] == expected["content_type"], (label, auth)
    # the PAT itself is no access token
    pat = {"Authorization": f"Bearer {fake.pat}"}
    assert requests.get(fake.url + real["url"], headers=pat, timeout=5).status_code == 401


# --------------------------------------------------------------------------- the client


def test_project_list_and_update(client: LabelStudioClient, fake_label_studio: Fake) -> None:
    fake_label_studio.add_project("Second")
    assert client.project(1)["title"] == "Recorded"
    listed = list(client.list_projects())
    assert [(p["id"], p["title"], p["task_number"]) for p in listed] == [
        (1, "Recorded", 3),
        (2, "Second", 0),
    ]
    client.update_project(1, sampling="Uncertainty sampling", model_version="v7")
    assert fake_label_studio.project(1)["model_version"] == "v7"
    assert client.project(1)["sampling"] == "Uncertainty sampling"
    patch = [c for c in fake_label_studio.log if c.method == "PATCH"]
    assert patch[-1].json == {"sampling": "Uncertainty sampling", "model_version": "v7"}


def test_iter_tasks_pages_like_the_sdk(client: LabelStudioClient, fake_label_studio: Fake) -> None:
    fake = fake_label_studio
    for i in range(4):
        fake.add_task(1, {"image": f"http://images.example/{i}.jpg"}, annotations=i % 2)
    tasks = list(client.iter_tasks(1, page_size=3))
    assert [t["id"] for t in tasks] == [1, 2, 3, 4, 5, 6, 7]
    assert [t["total_annotations"] for t in tasks] == [0, 0, 1, 0, 1, 0, 1]
    assert tasks[0]["predictions"][0]["score"] == 0.75
    pages = [(c.args["page"], c.status) for c in fake.log if c.path == "/api/tasks/"]
    assert pages == [("1", 200), ("2", 200), ("3", 200), ("4", 404)]  # the SDK stops on 404
    assert list(client.iter_tasks(fake.add_project()["id"])) == []


def test_task_and_its_uploaded_image(
    client: LabelStudioClient, fake_label_studio: Fake, tmp_path: Path
) -> None:
    fake = fake_label_studio
    task = fake.add_task(1, {"image": fake.add_file("blue.png", png())})
    got = client.task(task["id"])
    assert got["data"] == task["data"]
    assert client.task_image_bytes(got, "image", ImageLimits(), tmp_path / "a") == png()
    # with a personal access token: exchanged for an access token, sent as Bearer
    pat_client = LabelStudioClient(fake.url, fake.pat, timeout=5)
    assert pat_client.task_image_bytes(got, "image", ImageLimits(), tmp_path / "b") == png()
    downloads = [c for c in fake.log if c.path.startswith("/data/upload/")]
    assert [c.auth.split()[0] for c in downloads if c.auth] == ["Token", "Bearer"]
    assert any(c.path == "/api/token/refresh/" for c in fake.log)


def test_upsert_view_creates_then_updates(
    client: LabelStudioClient, fake_label_studio: Fake
) -> None:
    view = client.upsert_view(1, "Lookalike: cars", [3, 1], ["-tasks:predictions_score"], None)
    (stored,) = [v for v in fake_label_studio.views(1) if v["id"] == view]
    assert stored["data"]["title"] == "Lookalike: cars"
    assert [i["value"] for i in stored["data"]["filters"]["items"]] == [3, 1]
    assert stored["data"]["ordering"] == ["-tasks:predictions_score"]
    assert client.upsert_view(1, "Lookalike: cars", [], [], view) == view
    assert [i["value"] for i in stored["data"]["filters"]["items"]] == [-1]  # matches nothing
    # a tab deleted in Label Studio is created anew
    assert client.upsert_view(1, "Lookalike: cars", [2], [], 999) not in (view, 999)
    assert len(fake_label_studio.views(1)) == 3  # the recorded tab, ours, the new one


def test_put_prediction_creates_then_updates(
    client: LabelStudioClient, fake_label_studio: Fake
) -> None:
    prediction = client.put_prediction(2, 0.3, "lookalike-v1", None)
    assert client.put_prediction(2, 0.9, "lookalike-v1", prediction) == prediction
    (stored,) = [p for p in fake_label_studio.predictions(1) if p["id"] == prediction]
    assert (stored["task"], stored["score"], stored["result"]) == (2, 0.9, [])
    assert client.put_prediction(2, 0.1, "lookalike-v1", 999) != 999  # deleted: recreated
    assert client.task(2)["total_predictions"] == 2
    assert client.prediction_versions(1) == ["lookalike-v1", "lookalike-recorded"]
    client.update_project(1, model_version="unused")  # listed by LS with count 0: skipped
    assert "unused" not in client.prediction_versions(1)


def test_ml_backends(client: LabelStudioClient, fake_label_studio: Fake) -> None:
    (backend,) = client.ml_backends(1)
    assert backend["url"] == "http://127.0.0.1:9090" and backend["is_interactive"]
    assert client.ml_backends(2) == []


# --------------------------------------------------------------------------- upstream errors


@pytest.fixture
def no_sdk_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK retries 5xx and refused connections twice with 0.5-1 s back-off: skip the wait."""
    for name in ("_retry_timeout", "_retry_timeout_from_retries"):
        monkeypatch.setattr(f"label_studio_sdk.core.http_client.{name}", lambda **_: 0.0)


def test_not_found_is_a_label_studio_error(client: LabelStudioClient) -> None:
    with pytest.raises(LabelStudioError, match="HTTP 404") as sdk_call:
        client.task(999999)
    assert sdk_call.value.status == 404 and "No Task matches" in str(sdk_call.value)
    with pytest.raises(LabelStudioError, match="HTTP 404"):
        client.update_project(999999, sampling="Sequential sampling")
    with pytest.raises(LabelStudioError, match="HTTP 404"):  # only a 404 past page 1 ends paging
        list(client.iter_tasks(999999))


@pytest.mark.usefixtures("no_sdk_backoff")
def test_server_errors_and_bad_keys(client: LabelStudioClient, fake_label_studio: Fake) -> None:
    fake_label_studio.fail_next(500, times=3)  # the SDK retries a 5xx twice
    with pytest.raises(LabelStudioError, match="HTTP 500"):
        client.project(1)
    fake_label_studio.fail_next(503, path="/api/ml/")
    with pytest.raises(LabelStudioError, match="HTTP 503"):
        client.ml_backends(1)
    assert client.project(1)["id"] == 1
    with pytest.raises(LabelStudioError, match="HTTP 401"):
        LabelStudioClient(fake_label_studio.url, "0" * 40).project(1)


@pytest.mark.usefixtures("no_sdk_backoff")
def test_server_down_is_a_label_studio_error(
    client: LabelStudioClient, fake_label_studio: Fake
) -> None:
    with fake_label_studio.down():
        with pytest.raises(LabelStudioError) as sdk_call:
            client.project(1)
        assert sdk_call.value.status is None
        with pytest.raises(LabelStudioError, match="unreachable"):
            client.ml_backends(1)
    assert client.project(1)["id"] == 1  # back up on the same port
