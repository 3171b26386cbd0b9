"""Security against real processes: Label Studio 1.23 (with a second organisation), Redis,
`lookalike serve` and `lookalike worker` with BASIC_AUTH_* set. Traffic goes only to servers
started here on 127.0.0.1.

- without credentials every route but /health is refused (401);
- Label Studio, connected with the basic auth, sets up, predicts and delivers webhooks (a task
  imported after connecting is indexed through the webhook);
- a Label Studio user of another organisation, signed in with their own token, gets 403 for the
  project's searches, thumbnails, queue, sync and reindex, and does not see it listed;
- URL queries to loopback, private and link-local addresses are refused.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from tests.services import (
    LabelStudioServer,
    backend_env,
    label_studio_server,
    lookalike_process,
    ls_venv,
    redis_server,
    serving,
)
from tests.test_e2e_backend import (
    augmented,
    connect,
    create_project,
    jpeg_bytes,
    photo,
    upload,
    wait_for,
)

from lookalike.core.weights import convert_efficientnet_lite0
from lookalike_dev.devstack import label_studio_env

pytestmark = pytest.mark.e2e
AUTH = ("label-studio", "e2e-security-secret-42")


@dataclass
class Secured:
    ls: LabelStudioServer
    url: str
    project: int
    outsider: str  # a legacy token of a user in another Label Studio organisation

    def status(self) -> dict:
        url = f"{self.url}/api/projects/{self.project}/index-status"
        admin = {"Authorization": f"Token {self.ls.api_key}"}
        return requests.get(url, headers=admin, timeout=10).json()


def outsider_token(ls: LabelStudioServer) -> str:
    """A user in a second organisation, made with Label Studio's own Django shell."""
    code = (
        "from users.models import User\n"
        "from organizations.models import Organization\n"
        "from rest_framework.authtoken.models import Token\n"
        "u = User.objects.create_user(email='outsider@example.com', password='x' * 16)\n"
        "org = Organization.create_organization(created_by=u, title='Elsewhere')\n"
        "u.active_organization = org\n"
        "u.save()\n"
        "print('TOKEN=' + Token.objects.get_or_create(user=u)[0].key)\n"
    )
    env = label_studio_env(ls.data_dir, username="", password="", token="")
    [package] = ls_venv().glob("lib/python3*/site-packages/label_studio")
    result = subprocess.run(
        [str(ls_venv() / "bin" / "python"), "manage.py", "shell", "-c", code],
        cwd=package,  # Label Studio's settings import its apps as top-level modules
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    tokens = [line[6:] for line in result.stdout.splitlines() if line.startswith("TOKEN=")]
    assert tokens, result.stdout[-2000:] + result.stderr[-2000:]
    return tokens[0]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("security")
    weights = convert_efficientnet_lite0(root / "efficientnet_lite0.pth")
    files = {f"{n}.jpg": jpeg_bytes(photo(n)) for n in ("chelsea", "coffee", "rocket")}
    files["chelsea_copy.jpg"] = jpeg_bytes(augmented(photo("chelsea")))
    with redis_server(root / "redis") as redis_url, label_studio_server(root / "ls") as ls:
        env = backend_env(
            root, ls, redis_url, weights, BASIC_AUTH_USER=AUTH[0], BASIC_AUTH_PASS=AUTH[1]
        )
        with (
            lookalike_process(["worker"], env, root / "worker.log"),
            serving(env, root / "serve.log") as url,
        ):
            project = create_project(ls, "Secured")
            upload(ls, project, files)
            connect(ls, project, url, "lookalike", AUTH)
            secured = Secured(ls, url, project, outsider_token(ls))
            wait_for(lambda: secured.status()["indexed"] == len(files) or None, 240, "indexing")
            yield secured


def test_without_credentials_only_health_answers(secured: Secured) -> None:
    p, url = secured.project, secured.url
    routes = [
        ("POST", "/setup", {"project": f"{p}.1"}),
        ("POST", "/predict", {"tasks": [], "project": f"{p}.1"}),
        ("POST", "/webhook", {"action": "PROJECT_DELETED", "project": {"id": p}}),
        ("GET", "/versions", None),
        ("GET", "/", None),  # the sign-in form, with 401
        ("GET", "/api/projects", None),
        ("GET", "/api/jobs", None),
        ("GET", f"/api/projects/{p}/index-status", None),
        ("POST", f"/api/projects/{p}/similar", {"task_id": 1}),
        ("POST", f"/api/projects/{p}/queue", {"title": "x", "results": []}),
        ("POST", f"/api/projects/{p}/sync", {}),
        ("POST", f"/api/projects/{p}/reindex", {}),
        ("GET", f"/api/projects/{p}/tasks/1/thumbnail", None),
    ]
    for method, path, body in routes:
        reply = requests.request(method, url + path, json=body, timeout=30)
        assert reply.status_code == 401, (method, path, reply.status_code, reply.text[:200])
        assert "Traceback" not in reply.text
        if path != "/":
            assert "error" in reply.json()
    assert requests.get(f"{url}/health", timeout=10).status_code == 200
    assert secured.status()["indexed"] == secured.status()["total"]  # nothing was wiped


def test_label_studio_with_basic_auth_predicts_and_delivers_webhooks(secured: Secured) -> None:
    ls, p = secured.ls, secured.project
    hooks = ls.request("GET", "/api/webhooks/", params={"project": p}).json()
    ours = [h for h in hooks if h["url"] == f"{secured.url}/webhook"]
    assert ours and ours[0]["headers"].get("Authorization", "").startswith("Basic ")
    before = secured.status()["total"]
    upload(ls, p, {"coffee_copy.jpg": jpeg_bytes(augmented(photo("coffee")))})
    wait_for(lambda: secured.status()["indexed"] == before + 1 or None, 120, "webhook indexing")
    task = ls.request("GET", "/api/tasks/", params={"project": p}).json()["tasks"][0]
    ml = ls.request("GET", "/api/ml/", params={"project": p}).json()[0]
    region = {
        "type": "rectanglelabels",
        "from_name": "lookalike_box",
        "to_name": "image",
        "value": {"x": 0, "y": 0, "width": 100, "height": 100, "rectanglelabels": ["Find similar"]},
    }
    reply = ls.request(
        "POST",
        f"/api/ml/{ml['id']}/interactive-annotating",
        json={"task": task["id"], "context": {"result": [region]}},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert "queued in tab" in reply.json()["data"]["result"][0]["value"]["text"][0]


def test_a_user_of_another_organisation_cannot_touch_the_project(secured: Secured) -> None:
    p, url = secured.project, secured.url
    outsider = {"Authorization": f"Token {secured.outsider}"}
    listed = requests.get(f"{url}/api/projects", headers=outsider, timeout=30)
    assert listed.status_code == 200 and p not in [x["id"] for x in listed.json()["projects"]]
    for method, path, body in [
        ("GET", f"/api/projects/{p}/tasks/1/thumbnail", None),
        ("POST", f"/api/projects/{p}/similar", {"task_id": 1}),
        ("POST", f"/api/projects/{p}/queue", {"title": "x", "results": []}),
        ("POST", f"/api/projects/{p}/sync", {}),
        ("POST", f"/api/projects/{p}/reindex", {}),
        ("GET", f"/api/projects/{p}/index-status", None),
    ]:
        reply = requests.request(method, url + path, json=body, headers=outsider, timeout=30)
        assert reply.status_code == 403, (path, reply.status_code, reply.text[:200])
    admin = {"Authorization": f"Token {secured.ls.api_key}"}
    tasks = secured.ls.request("GET", "/api/tasks/", params={"project": p}).json()["tasks"]
    thumb = requests.get(
        f"{url}/api/projects/{p}/tasks/{tasks[0]['id']}/thumbnail", headers=admin, timeout=30
    )
    assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/jpeg"


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{ls_port}/api/projects/",  # Label Studio itself, on this machine
        "http://localhost:{backend_port}/health",  # the backend itself
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{ls_port}/",
    ],
)
def test_url_queries_to_internal_addresses_are_refused(secured: Secured, target: str) -> None:
    admin = {"Authorization": f"Token {secured.ls.api_key}"}
    url = target.format(
        ls_port=secured.ls.url.rsplit(":", 1)[1], backend_port=secured.url.rsplit(":", 1)[1]
    )
    reply = requests.post(
        f"{secured.url}/api/projects/{secured.project}/similar",
        json={"url": url},
        headers=admin,
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    assert "non-public address" in reply.json()["error"]
