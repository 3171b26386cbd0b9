"""End to end in the real Label Studio editor: "Find similar" as an annotator meets it.

Headless Chromium (1600 x 1000) signs in to a real Label Studio 1.23 and does what the README's
"Find similar, for annotators" says: open a task, switch on Auto-Annotation, press M, drag a box
(or double-click for the whole image, or type a prompt), read the reply without scrolling, open
the new tab and find the expected match first, then submit: the stored annotation holds no
Lookalike region. Two backends: EfficientNet-Lite0 with real ImageNet weights (boxes, whole
image) and open_clip ViT-B-32 with random weights (the text plumbing; its ranking is checked
against the REST API, not against meaning).

Screenshots go to test-artifacts/; with LOOKALIKE_DOC_SCREENSHOTS=1 also to docs/ (the README's).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    PHOTOS,
    augmented,
    connect,
    create_project,
    jpeg_bytes,
    photo,
    task_ids_by_name,
    upload,
    wait_for,
)
from tests.test_e2e_browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS

from lookalike.core.weights import convert_efficientnet_lite0

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
WINDOW = (1600, 1000)
NAMES = PHOTOS[:4]  # chelsea, coffee, astronaut, rocket: each with an augmented copy


@dataclass
class Project:
    id: int
    backend: str
    names: dict[str, int]  # file name -> task id


@dataclass
class EditorStack:
    ls: LabelStudioServer
    photos: Project  # EfficientNet-Lite0, real weights
    clip: Project  # open_clip ViT-B-32, random weights: text plumbing


@pytest.fixture(scope="module")
def editor_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditorStack]:
    root = tmp_path_factory.mktemp("editor")
    weights = convert_efficientnet_lite0(root / "efficientnet_lite0.pth")
    files = {f"{n}.jpg": jpeg_bytes(photo(n)) for n in NAMES}
    files |= {f"{n}_copy.jpg": jpeg_bytes(augmented(photo(n))) for n in NAMES}
    with redis_server(root / "redis") as redis_url, label_studio_server(root / "ls") as ls:
        lite0 = backend_env(root, ls, redis_url, weights)
        # Random weights make distinct photos "near-duplicates" of each other: queueing keeps
        # every match here (LOOKALIKE_DIVERSE=false), as the tests compare tabs with the plain
        # REST top matches.
        clip = backend_env(
            root, ls, redis_url, LOOKALIKE_MODEL="open_clip:ViT-B-32/random",
            LOOKALIKE_QUEUE="clip", LOOKALIKE_DIVERSE="false",
        )
        with (
            lookalike_process(["worker"], lite0, root / "worker.log"),
            lookalike_process(["worker"], clip, root / "clip-worker.log"),
            serving(lite0, root / "serve.log") as lite0_url,
            serving(clip, root / "clip-serve.log") as clip_url,
        ):
            projects = []
            for url, title in [(lite0_url, "Editor photos"), (clip_url, "Editor text")]:
                project = create_project(ls, title)
                upload(ls, project, files)
                connect(ls, project, url, "lookalike")
                projects.append(Project(project, url, task_ids_by_name(ls, project)))
            for project in projects:
                wait_for(
                    lambda p=project: _indexed(p) == len(files) or None,
                    240,
                    f"indexing {project.backend}",
                )
            yield EditorStack(ls, *projects)


def _indexed(project: Project) -> int:
    url = f"{project.backend}/api/projects/{project.id}/index-status"
    return requests.get(url, timeout=10).json()["indexed"]


@pytest.fixture(scope="module")
def editor(editor_stack: EditorStack, tmp_path_factory: pytest.TempPathFactory):
    """Chromium signed in to Label Studio as its admin."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} not found: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    root = tmp_path_factory.mktemp("chromium")
    options.add_argument(f"--user-data-dir={root / 'profile'}")
    service = Service(CHROMEDRIVER, log_output=str(root / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        ls = editor_stack.ls
        driver.get(f"{ls.url}/user/login/")
        driver.find_element(By.NAME, "email").send_keys(ls.username)
        driver.find_element(By.NAME, "password").send_keys(ls.password)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        _until(driver, lambda d: "/user/login" not in d.current_url, 30, "signing in")
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------ what the annotator does
def _until(driver, condition, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if value := condition(driver):
                return value
        except Exception:  # an element the editor re-rendered meanwhile: look again
            pass
        time.sleep(0.3)
    _shot(driver, "editor-failure")
    raise AssertionError(f"timed out after {timeout} s: {what}")


def _shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("LOOKALIKE_DOC_SCREENSHOTS") == "1" and not name.endswith("failure"):
        shutil.copy(path, ROOT / "docs" / path.name)
    return path


def open_task(driver, stack: EditorStack, project: Project, task: int) -> None:
    """Open the task in the editor and make sure Auto-Annotation is on (README step 1)."""
    from selenium.webdriver.common.by import By

    driver.get(f"{stack.ls.url}/projects/{project.id}/data?task={task}")
    _until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".lsf-toolbar"), 60, "the editor")
    _until(driver, lambda d: d.find_elements(By.TAG_NAME, "canvas"), 30, "the image")
    time.sleep(1.5)  # the editor settles (the reply's tab title names the task: checked there)
    toggle = driver.find_element(By.XPATH, "//*[text()='Auto-Annotation']")
    if driver.execute_script("return localStorage.getItem('autoAnnotation')") != "true":
        toggle.click()
    _until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".lsf-tool_smart"), 10, "smart tool")


def press_m(driver) -> None:
    """README step 2: M selects the Auto-Detect tool, which is Lookalike's box."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.TAG_NAME, "body").send_keys("m")
    _until(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, ".lsf-tool_smart.lsf-tool_active"),
        10,
        "the Find similar box tool active",
    )


def image_canvas(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.TAG_NAME, "canvas")[-1]


def drag_box(driver, left: float, top: float, right: float, bottom: float) -> None:
    """Drag a box over the image, corners in fractions of the displayed image."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = image_canvas(driver)
    width, height = canvas.size["width"], canvas.size["height"]
    start = (int((left - 0.5) * width), int((top - 0.5) * height))
    steps = [(int((right - left) * width / 2), int((bottom - top) * height / 2))] * 2
    chain = ActionChains(driver).move_to_element_with_offset(canvas, *start).click_and_hold()
    for dx, dy in steps:
        chain = chain.move_by_offset(dx, dy)
    chain.release().perform()


def double_click_image(driver, x: float = 0.85, y: float = 0.85) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = image_canvas(driver)
    offset = (int((x - 0.5) * canvas.size["width"]), int((y - 0.5) * canvas.size["height"]))
    ActionChains(driver).move_to_element_with_offset(canvas, *offset).double_click().perform()


def reply(driver, containing: str) -> str:
    """The newest line under "Lookalike says", once it contains `containing`; it must be on
    screen without scrolling, and read as text, not as an input."""
    script = """
        const box = [...document.querySelectorAll('[data-testid="textarea-control"]')][0];
        const regions = box && box.querySelector('[data-testid="textarea-regions"]');
        if (!regions) return null;
        const rect = regions.getBoundingClientRect();
        return {text: regions.innerText, bottom: rect.bottom, top: rect.top,
                inputs: box.querySelectorAll('input, textarea').length};
    """
    found = _until(
        driver,
        lambda d: (r := d.execute_script(script)) and containing in r["text"] and r,
        90,
        f"a reply containing {containing!r}",
    )
    viewport = driver.execute_script("return window.innerHeight")
    assert found["top"] >= 0 and found["bottom"] <= viewport, (found, viewport)
    assert found["inputs"] == 0, "the reply must not look like an input"
    return found["text"].split("\n")[0]


def type_prompt(driver, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, "input[placeholder^='e.g. police car']")
    field.send_keys(text, Keys.ENTER)


def open_tab(driver, stack: EditorStack, project: Project, title: str) -> list[int]:
    """Open the tab Lookalike created, as the annotator would; the task ids as listed."""
    from selenium.webdriver.common.by import By

    views = stack.ls.request("GET", "/api/dm/views/", params={"project": project.id}).json()
    [view] = [v for v in views if v["data"].get("title") == title]
    driver.get(f"{stack.ls.url}/projects/{project.id}/data?tab={view['id']}")
    rows = _until(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, ".lsf-table__row-wrapper"),
        30,
        f"rows of tab {title!r}",
    )
    return [int(row.text.split()[0]) for row in rows]


def submit_and_read_annotation(driver, stack: EditorStack, task: int) -> list[dict]:
    """Submit the task; returns the stored annotation's result once Lookalike cleaned it."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, "//button[normalize-space()='Submit']").click()

    def stored(_driver) -> list[dict] | None:
        annotations = stack.ls.request("GET", f"/api/tasks/{task}").json()["annotations"]
        if not annotations:
            return None
        result = annotations[-1]["result"]
        return None if any(r["from_name"].startswith("lookalike_") for r in result) else [result]

    return _until(driver, stored, 60, "a submitted annotation without Lookalike's regions")[0]


# ------------------------------------------------------------------ the tests
def test_a_box_finds_the_original_first_and_leaves_the_annotation_clean(
    editor, editor_stack: EditorStack
) -> None:
    project = editor_stack.photos
    query, original = project.names["chelsea_copy.jpg"], project.names["chelsea.jpg"]
    open_task(editor, editor_stack, project, query)
    press_m(editor)
    drag_box(editor, 0.05, 0.05, 0.95, 0.95)
    title = f"Similar to #{query} (box)"
    said = reply(editor, f"queued in tab '{title}'")
    assert "'Label All Tasks' serves them next" in said
    _shot(editor, "editor-find-similar")
    result = submit_and_read_annotation(editor, editor_stack, query)
    assert result == []  # only the query box was drawn: nothing else to keep
    tasks = open_tab(editor, editor_stack, project, title)
    assert tasks[0] == original and query not in tasks, tasks
    _shot(editor, "editor-tab")


def test_a_double_click_searches_the_whole_image(editor, editor_stack: EditorStack) -> None:
    project = editor_stack.photos
    query, copy = project.names["coffee.jpg"], project.names["coffee_copy.jpg"]
    open_task(editor, editor_stack, project, query)
    press_m(editor)
    double_click_image(editor)
    title = f"Similar to #{query}"
    reply(editor, f"queued in tab '{title}'")
    submit_and_read_annotation(editor, editor_stack, query)
    tasks = open_tab(editor, editor_stack, project, title)
    assert tasks[0] == copy, tasks


def test_text_prompts_can_be_repeated(editor, editor_stack: EditorStack) -> None:
    project = editor_stack.clip
    task = project.names["rocket.jpg"]
    open_task(editor, editor_stack, project, task)
    for prompt in ("a police car at night", "a cat on a sofa"):
        type_prompt(editor, prompt)
        said = reply(editor, f"tab 'Text: {prompt}'")
        assert said.startswith(f"7 similar unlabeled tasks queued in tab 'Text: {prompt}'"), said
    _shot(editor, "editor-text")
    history = reply(editor, "Text: a police car at night")  # the earlier reply is still listed
    assert "a cat on a sofa" in history
    submit_and_read_annotation(editor, editor_stack, task)
    tasks = open_tab(editor, editor_stack, project, "Text: a cat on a sofa")
    expected = requests.post(
        f"{project.backend}/api/projects/{project.id}/similar",
        json={"text": "a cat on a sofa", "k": 8},
        timeout=60,
    ).json()["results"]
    # The tab is in the prompt's own order; the task it was typed on is now labeled.
    assert tasks == [r["task_id"] for r in expected if r["task_id"] != task][: len(tasks)]
    assert task not in tasks
