"""Who may call what, in process: Flask's test client (with a loopback or a remote client
address), real Redis, Label Studio faked at its HTTP boundary with two users: the admin and a
user of another organisation who can open only their own project. The real server is used in
tests/test_e2e_security.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient
from tests.fake_label_studio import FakeLabelStudio, fake_label_studio
from tests.services import redis_server

from lookalike.config import Settings
from lookalike.service.runtime import Runtime
from lookalike.web.app import create_app

__all__ = ["fake_label_studio"]

REMOTE = {"REMOTE_ADDR": "10.20.30.40"}  # a client on the network, not this machine
LS_AUTH = {"Authorization": "Basic " + base64.b64encode(b"ls:s3cret").decode()}


@dataclass
class Secured:
    client: FlaskClient
    rt: Runtime
    ls: FakeLabelStudio
    mine: int  # a project only the admin can open
    theirs: int  # the other user's project
    other_token: str


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def make(redis_url: str, tmp_path: Path, ls: FakeLabelStudio, **overrides) -> Secured:
    mine = ls.add_project("Admin's")["id"]
    theirs = ls.add_project("Theirs")["id"]
    other = ls.add_user("other@example.com", {theirs})
    settings = Settings(
        redis_url=redis_url,
        data_dir=tmp_path,
        label_studio_url=ls.url,
        label_studio_api_key=ls.api_key,
        **overrides,
    )
    rt = Runtime(settings)
    rt.redis.flushdb()
    rng = np.random.default_rng(0)
    for project in (mine, theirs):
        state = rt.state(project)
        state.replace_tasks([1, 2, 3], labeled=[])
        state.meta.claim_model("fake/model", 4)
        vectors = rng.standard_normal((3, 4)).astype(np.float32)
        state.put_vectors([1, 2, 3], vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    return Secured(create_app(rt).test_client(), rt, ls, mine, theirs, other)


@pytest.fixture
def secured(redis_url, tmp_path, fake_label_studio) -> Secured:
    return make(
        redis_url,
        tmp_path,
        fake_label_studio,
        basic_auth_user="ls",
        basic_auth_pass="s3cret",
        metrics_token="m3trics",
        rate_limit=5,
    )


def routes(s: Secured) -> list[tuple[str, str, dict | None]]:
    p = s.mine
    return [
        ("POST", "/setup", {"project": f"{p}.1"}),
        ("POST", "/predict", {"tasks": [], "project": f"{p}.1"}),
        ("POST", "/webhook", {"action": "TASKS_DELETED", "project": {"id": p}}),
        ("GET", "/versions", None),
        ("GET", "/metrics", None),
        ("GET", "/", None),  # the sign-in form, with 401: no data until signed in
        ("GET", "/assets/lookalike.js", None),
        ("GET", "/api/session", None),
        ("DELETE", "/api/session", None),
        ("POST", "/api/session", {"token": ""}),
        ("GET", "/api/projects", None),
        ("GET", "/api/jobs", None),
        ("GET", f"/api/projects/{p}/index-status", None),
        ("POST", f"/api/projects/{p}/similar", {"task_id": 1}),
        ("POST", f"/api/projects/{p}/queue", {"title": "t", "results": []}),
        ("POST", f"/api/projects/{p}/sync", {}),
        ("POST", f"/api/projects/{p}/reindex", {}),
        ("GET", f"/api/projects/{p}/tasks/1/thumbnail", None),
    ]


def test_without_credentials_every_route_but_health_is_refused(secured: Secured) -> None:
    for method, path, body in routes(secured):
        for environ in ({}, REMOTE):  # loopback is no exception once auth is on
            reply = secured.client.open(path, method=method, json=body, environ_base=environ)
            assert reply.status_code == 401, (method, path, reply.status_code)
            assert "Traceback" not in reply.get_data(as_text=True)
            assert path == "/" or "error" in reply.json
    assert secured.client.get("/health", environ_base=REMOTE).status_code == 200
    assert secured.rt.jobs.count == 0  # nothing was enqueued


def test_label_studio_with_its_basic_auth_speaks_the_protocol(secured: Secured) -> None:
    reply = secured.client.post(
        "/setup", json={"project": f"{secured.mine}.1"}, headers=LS_AUTH, environ_base=REMOTE
    )
    assert reply.status_code == 200 and reply.json == {"model_version": "lookalike"}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ls:guess").decode()}
    refused = secured.client.post("/webhook", json={}, headers=wrong, environ_base=REMOTE)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
    # Label Studio's credentials are for the protocol only, not for people's routes.
    api = secured.client.get("/api/projects", headers=LS_AUTH)
    assert api.status_code == 401


def test_metrics_take_their_own_token(secured: Secured) -> None:
    ok = secured.client.get("/metrics", headers={"Authorization": "Bearer m3trics"})
    assert ok.status_code == 200 and b"lookalike_" in ok.data
    assert secured.client.get("/metrics", headers={"Authorization": "Bearer x"}).status_code == 401


def test_a_user_reaches_only_projects_label_studio_lets_them_open(secured: Secured) -> None:
    theirs = {"Authorization": f"Token {secured.other_token}"}
    listed = secured.client.get("/api/projects", headers=theirs, environ_base=REMOTE).json
    assert [p["id"] for p in listed["projects"]] == [secured.theirs]
    own = secured.client.post(
        f"/api/projects/{secured.theirs}/similar", json={"task_id": 1}, headers=theirs
    )
    assert own.status_code == 200 and len(own.json["results"]) == 2
    for method, path, body in routes(secured)[12:]:  # every project route of the admin's project
        reply = secured.client.open(path, method=method, json=body, headers=theirs)
        assert reply.status_code == 403, (path, reply.status_code)
        assert f"cannot open project {secured.mine}" in reply.json["error"]
    admin = {"Authorization": f"Token {secured.ls.api_key}"}
    assert (
        secured.client.get(f"/api/projects/{secured.mine}/index-status", headers=admin).status_code
        == 200
    )
    bad = secured.client.get("/api/projects", headers={"Authorization": "Token nope"})
    assert bad.status_code == 401 and "does not accept this token" in bad.json["error"]


def test_the_sign_in_form_signs_in_without_any_script(secured: Secured) -> None:
    page = secured.client.get("/", environ_base=REMOTE)
    assert page.status_code == 401 and 'name="token"' in page.text
    wrong = secured.client.post("/api/session", data={"token": "nope"})
    assert wrong.status_code == 401 and "does not accept this token" in wrong.text
    ok = secured.client.post("/api/session", data={"token": secured.other_token})
    assert ok.status_code == 303 and ok.headers["Location"].endswith("/")
    after = secured.client.get("/", environ_base=REMOTE)
    assert after.status_code == 200 and 'id="results"' in after.text
    assert secured.client.get("/assets/lookalike.js").status_code == 200


def test_signing_in_keeps_the_token_server_side_and_signing_out_ends_it(secured: Secured) -> None:
    client = secured.client
    assert client.get("/api/session").status_code == 401
    reply = client.post("/api/session", json={"token": secured.other_token}, environ_base=REMOTE)
    assert reply.status_code == 200 and reply.json["user"]["email"] == "other@example.com"
    cookie = reply.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert secured.other_token not in cookie and secured.other_token not in reply.text
    assert client.get("/api/session").json["user"]["email"] == "other@example.com"
    page = client.get("/api/projects", environ_base=REMOTE).json["projects"]
    assert [p["id"] for p in page] == [secured.theirs]
    for body in (client.get("/").text, client.get("/api/projects").text):
        assert body
        assert secured.ls.api_key not in body and secured.other_token not in body
    client.delete("/api/session")
    assert client.get("/api/projects").status_code == 401


def test_expensive_routes_are_rate_limited_per_user(secured: Secured) -> None:
    admin = {"Authorization": f"Token {secured.ls.api_key}"}
    url = f"/api/projects/{secured.mine}/similar"
    codes = [
        secured.client.post(url, json={"task_id": 1}, headers=admin).status_code for _ in range(7)
    ]
    assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
    limited = secured.client.post(url, json={"task_id": 1}, headers=admin)
    assert int(limited.headers["Retry-After"]) > 0 and "at most 5 a minute" in limited.json["error"]
    other = {"Authorization": f"Token {secured.other_token}"}  # another user's budget is theirs
    theirs = f"/api/projects/{secured.theirs}/similar"
    assert secured.client.post(theirs, json={"task_id": 1}, headers=other).status_code == 200


def test_request_bodies_have_a_size_limit(redis_url, tmp_path, fake_label_studio) -> None:
    s = make(redis_url, tmp_path, fake_label_studio, max_request_bytes=1000)
    reply = s.client.post(f"/api/projects/{s.mine}/similar", json={"image": "A" * 5000})
    assert reply.status_code == 413 and "error" in reply.json


def test_without_auth_configured_only_loopback_is_served(
    redis_url, tmp_path, fake_label_studio
) -> None:
    s = make(redis_url, tmp_path, fake_label_studio)
    assert s.client.get("/api/projects").status_code == 200  # this machine: as before
    remote = s.client.get("/api/projects", environ_base=REMOTE)
    assert remote.status_code == 403 and "BASIC_AUTH_USER" in remote.json["error"]
    assert s.client.post("/setup", json={}, environ_base=REMOTE).status_code == 403
    assert s.client.get("/health", environ_base=REMOTE).status_code == 200
