"""`lookalike demo`: the whole stack on one machine, with a demo project, in one command.

Starts Redis, Label Studio (from its own venv), `lookalike serve` and a `lookalike worker`,
creates a project with plugin_config.xml and demo photos, connects the backend, waits for
indexing and prints where to click. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import requests
from PIL import Image, ImageEnhance, ImageOps

from lookalike.config import Settings
from lookalike_dev.devstack import (
    label_studio_server,
    lookalike_process,
    redis_server,
    wait_http,
)

PLUGIN_CONFIG = Path(__file__).resolve().parents[2] / "plugin_config.xml"
# skimage's bundled photos ("cat" is the same photo as "chelsea", so it is left out).
DEMO_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "horse",
    "immunohistochemistry",
    "coins",
    "moon",
    "page",
    "clock",
    "text",
)


def demo_images(directory: Path) -> list[Path]:
    """Demo photos and, for each, two near duplicates (so 'find similar' has answers)."""
    from skimage import data as skdata

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in DEMO_PHOTOS:
        loader = getattr(skdata, name, None)
        if loader is None:
            continue
        photo = Image.fromarray(loader()).convert("RGB")
        w, h = photo.size
        variants = {
            name: photo,
            f"{name}-flipped": ImageOps.mirror(photo),
            f"{name}-cropped": ImageEnhance.Brightness(
                photo.crop((w // 10, h // 10, w - w // 10, h - h // 10))
            ).enhance(1.2),
        }
        for stem, image in variants.items():
            path = directory / f"{stem}.jpg"
            if not path.exists():
                image.save(path, "JPEG", quality=90)
            paths.append(path)
    return paths


def _request(ls_url: str, api_key: str, method: str, path: str, **kwargs) -> requests.Response:
    response = requests.request(
        method,
        f"{ls_url}{path}",
        headers={"Authorization": f"Token {api_key}"},
        timeout=60,
        **kwargs,
    )
    response.raise_for_status()
    return response


def run_demo(settings: Settings, root: Path, ls_port: int, backend_port: int) -> int:
    root = root.resolve()
    images = demo_images(root / "images")
    username, password = "admin@example.com", secrets.token_urlsafe(9)
    print(f"Lookalike demo: {len(images)} photos in {root / 'images'}")
    print(
        f"model: {settings.model}" + (f" (weights: {settings.weights})" if settings.weights else "")
    )
    with ExitStack() as stack:
        # Ctrl-C and SIGTERM both unwind the stack, which stops every process we started.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # Started in the background by a script, SIGINT may arrive ignored: make Ctrl-C work.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("starting Redis ...", flush=True)
        redis_url = stack.enter_context(redis_server(root / "redis"))
        print("starting Label Studio (30-60 s the first time) ...", flush=True)
        # A fresh Label Studio each run: its token is only set when its database is created.
        shutil.rmtree(root / "label-studio", ignore_errors=True)
        ls = stack.enter_context(
            label_studio_server(
                root / "label-studio",
                port=ls_port,
                username=username,
                password=password,
            )
        )
        env = {
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.api_key,
            "LOOKALIKE_DATA_DIR": str(root / "data"),
            "LOOKALIKE_MODEL": settings.model,
            "LOOKALIKE_WEIGHTS": settings.weights,
            # Secured like a real install: Label Studio connects with these (below), and
            # people sign in to the search page with their Label Studio token.
            "BASIC_AUTH_USER": "label-studio",
            "BASIC_AUTH_PASS": secrets.token_urlsafe(18),
        }
        backend_url = f"http://127.0.0.1:{backend_port}"
        print("starting lookalike serve and lookalike worker ...", flush=True)
        serve = stack.enter_context(
            lookalike_process(
                ["serve", "--host", "127.0.0.1", "--port", str(backend_port)],
                env,
                root / "serve.log",
            )
        )
        stack.enter_context(lookalike_process(["worker"], env, root / "worker.log"))
        wait_http(f"{backend_url}/health", 120, proc=serve, log_path=root / "serve.log")

        project = _request(
            ls.url,
            ls.api_key,
            "POST",
            "/api/projects/",
            json={
                "title": "Lookalike demo",
                "label_config": PLUGIN_CONFIG.read_text(),
            },
        ).json()["id"]
        for start in range(0, len(images), 20):
            files = {
                f"file{i}": (p.name, p.read_bytes(), "image/jpeg")
                for i, p in enumerate(images[start : start + 20])
            }
            _request(ls.url, ls.api_key, "POST", f"/api/projects/{project}/import", files=files)
        _request(
            ls.url,
            ls.api_key,
            "POST",
            "/api/ml/",
            json={
                "url": backend_url,
                "project": project,
                "title": "Lookalike",
                "is_interactive": True,
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": env["BASIC_AUTH_USER"],
                "basic_auth_pass": env["BASIC_AUTH_PASS"],
            },
        )
        _wait_indexed(backend_url, ls.api_key, project, len(images), root)
        print(
            f"""
Ready.
  Label Studio   {ls.url}/projects/{project}/data   login {username} / {password}
  Search page    {backend_url}/   sign in with your Label Studio token: {ls.api_key}
  Index status   {backend_url}/api/projects/{project}/index-status
  Logs           {root}/*.log

In Label Studio open a task, switch on Auto-Annotation (bottom bar), press M and drag a
box (or double-click the image for the whole image). Matches appear in a new tab and
"Label All Tasks" serves them next. Press Ctrl-C to stop everything.""",
            flush=True,
        )
        try:
            while serve.poll() is None:
                time.sleep(1)
            print(f"lookalike serve exited; see {root / 'serve.log'}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nstopping ...", flush=True)
            return 0


def _wait_indexed(backend_url: str, token: str, project: int, total: int, root: Path) -> None:
    from tqdm import tqdm

    with tqdm(total=total, desc="indexing", unit="task") as bar:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = requests.get(
                f"{backend_url}/api/projects/{project}/index-status",
                headers={"Authorization": f"Token {token}"},
                timeout=10,
            ).json()
            bar.total = max(status["total"], total)
            bar.n = status["indexed"] + status["failed"]
            bar.refresh()
            if status["total"] >= total and status["pending"] == 0:
                for failure in status["failures"]:
                    print(f"  task {failure['task_id']} failed: {failure['reason']}")
                return
            time.sleep(1)
    raise RuntimeError(f"indexing did not finish in 15 minutes; see {root / 'worker.log'}")
