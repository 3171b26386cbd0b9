"""End to end in a real browser: the backend's search page (`/`) driven by headless Chromium.

A real Label Studio, Redis, `lookalike serve` and `lookalike worker` (EfficientNet-Lite0 with
real ImageNet weights), a project of real photos and augmented copies of them. The test opens
the page, watches indexing finish in the progress panel, searches by an uploaded image, by a
task id and by clicking a result, queues the selected results and checks the Label Studio tab
they land in, then saves a screenshot to test-artifacts/search-page.png.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from PIL import Image
from tests.services import (
    LabelStudioServer,
    free_port,
    label_studio_server,
    lookalike_process,
    redis_server,
    wait_http,
)
from tests.test_e2e_backend import (
    PHOTOS,
    augmented,
    connect,
    create_project,
    jpeg_bytes,
    photo,
    tab,
    task_ids_by_name,
    upload,
    wait_for,
)

from lookalike.core.weights import convert_efficientnet_lite0

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("LOOKALIKE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LOOKALIKE_CHROMEDRIVER", "/usr/bin/chromedriver")
BASIC_AUTH = ("label-studio", "browser-test-secret-0123456789")
NAMES = PHOTOS[:5]  # chelsea, coffee, astronaut, rocket, camera: each with an augmented copy
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1440,1000",
]


@dataclass
class PageStack:
    ls: LabelStudioServer
    url: str  # the backend
    project: int
    names: dict[str, int]  # file name -> task id
    root: Path


@pytest.fixture(scope="module")
def page_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageStack]:
    root = tmp_path_factory.mktemp("browser")
    weights = convert_efficientnet_lite0(root / "efficientnet_lite0.pth")
    uploads: dict[str, bytes] = {}
    for name in NAMES:
        uploads[f"{name}.jpg"] = jpeg_bytes(photo(name))
        uploads[f"{name}_copy.jpg"] = jpeg_bytes(augmented(photo(name)))
    with redis_server(root / "redis") as redis_url, label_studio_server(root / "ls") as ls:
        env = {
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.api_key,
            "LOOKALIKE_DATA_DIR": str(root / "data"),
            "LOOKALIKE_MODEL": "timm:efficientnet_lite0",
            "LOOKALIKE_WEIGHTS": str(weights),
            "BASIC_AUTH_USER": BASIC_AUTH[0],
            "BASIC_AUTH_PASS": BASIC_AUTH[1],
        }
        port = free_port()
        with (
            lookalike_process(["worker"], env, root / "worker.log"),
            lookalike_process(
                ["serve", "--host", "127.0.0.1", "--port", str(port)], env, root / "serve.log"
            ) as serve,
        ):
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/health", 60, proc=serve, log_path=root / "serve.log")
            project = create_project(ls, "Search page photos")
            upload(ls, project, uploads)
            connect(ls, project, url, "lookalike", BASIC_AUTH)
            names = task_ids_by_name(ls, project)
            assert len(names) == 2 * len(NAMES), names
            yield PageStack(ls=ls, url=url, project=project, names=names, root=root)


@pytest.fixture(scope="module")
def browser(page_stack: PageStack):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} not found: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = page_stack.root / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(CHROMEDRIVER, log_output=str(page_stack.root / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _live_text(driver, selector: str) -> str | None:
    """Text of an element in a panel the page re-renders every 2 s, read in one JS call (finding
    then reading in two steps races the re-render: a stale element)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
        selector,
    )


def _results(driver) -> list[dict]:
    """The result cards as the page shows them."""
    return driver.execute_script(
        """
        return Array.from(document.querySelectorAll('#results .result')).map(card => ({
            task_id: Number(card.dataset.taskId),
            score: card.querySelector('.score').textContent,
            link: card.querySelector('a.open').href,
            loaded: card.querySelector('img.thumb').complete
                    && card.querySelector('img.thumb').naturalWidth > 0,
        }));
        """
    )


def page_wait(driver, timeout: float, poll_frequency: float = 0.5):
    """Selenium's wait, also riding out elements the page replaced while we looked at them."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait as SeleniumWait

    return SeleniumWait(
        driver,
        timeout,
        poll_frequency=poll_frequency,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )


def _wait_results(driver, after_query: str, timeout: float = 60) -> list[dict]:
    """Wait until the page shows results of the query titled `after_query`."""

    def ready(d):
        titles = d.find_elements("css selector", "#query .title")
        if not titles or titles[0].text != after_query:
            return False  # the search has not started yet
        message = d.find_element("id", "message")
        if "error" in message.get_attribute("class"):
            raise AssertionError(f"the page says: {message.text}")
        return _results(d) or False

    return page_wait(driver, timeout, poll_frequency=0.2).until(ready)


def _wait_thumbnails(driver, timeout: float = 60) -> list[dict]:
    return wait_for(
        lambda: (r := _results(driver)) and all(x["loaded"] for x in r) and r,
        timeout,
        "every thumbnail to load",
    )


def test_search_page_searches_queues_and_shows_progress(
    page_stack: PageStack, browser, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    stack, driver, names = page_stack, browser, page_stack.names
    total = len(names)
    started = time.monotonic()
    driver.get(stack.url + "/")

    # Signing in with one's own Label Studio token (here: the LS admin's own account).
    token = page_wait(driver, 30).until(lambda d: d.find_element(By.ID, "token"))
    page_wait(driver, 10).until(lambda d: token.is_displayed())
    token.send_keys(stack.ls.api_key)
    driver.find_element(By.ID, "sign-in-button").click()
    page_wait(driver, 30).until(lambda d: "admin@example.com" in d.find_element(By.ID, "user").text)

    # The project is picked automatically; its progress bar reaches indexed == total.
    page_wait(driver, 30).until(
        lambda d: d.find_element(By.ID, "project").get_attribute("value") == str(stack.project)
    )
    count = f'#progress .project[data-project="{stack.project}"] .indexed-count'
    page_wait(driver, 240, poll_frequency=0.5).until(
        lambda d: _live_text(d, count) == f"{total} / {total}"
    )
    failed = _live_text(driver, f'#progress .project[data-project="{stack.project}"] .failed')
    assert failed == "failed 0"
    page_wait(driver, 10).until(lambda d: _live_text(d, "#jobs .workers b") == "1")
    # Once indexed, the picker no longer calls the project unknown to this backend.
    page_wait(driver, 10).until(
        lambda d: "not indexed" not in d.find_element(By.ID, "project").text
    )
    assert "null" not in _live_text(driver, "#jobs")

    # An image-only model cannot search by text: the page offers no text box.
    page_wait(driver, 10).until(lambda d: not d.find_element(By.ID, "text").is_displayed())

    # Search by an uploaded image: a near copy of the rocket photo finds the rocket tasks.
    query_file = tmp_path / "rocket-query.jpg"
    query_image = augmented(photo("rocket")).rotate(3, expand=False)
    query_image.save(query_file, "JPEG", quality=80)
    driver.find_element(By.ID, "image-file").send_keys(str(query_file))
    results = _wait_results(driver, "Similar to uploaded image")
    assert results[0]["task_id"] in {names["rocket.jpg"], names["rocket_copy.jpg"]}, results

    # Search by task id: the augmented copy comes first, the query task is never a result.
    query = names["chelsea.jpg"]
    task_field = driver.find_element(By.ID, "task-id")
    task_field.clear()
    task_field.send_keys(str(query))
    driver.find_element(By.ID, "search-task").click()
    results = _wait_results(driver, f"Similar to #{query}")
    assert results[0]["task_id"] == names["chelsea_copy.jpg"], results
    assert query not in [r["task_id"] for r in results]
    assert len(results) == total - 1
    scores = [float(r["score"]) for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(len(r["score"].split(".")[1]) == 3 for r in results)
    copy = names["chelsea_copy.jpg"]
    assert results[0]["link"] == f"{stack.ls.url}/projects/{stack.project}/data?task={copy}"
    _wait_thumbnails(driver)

    # Clicking a result's thumbnail searches from it: the copy leads back to the original.
    driver.find_element(By.CSS_SELECTOR, "#results .result img.thumb").click()
    results = _wait_results(driver, f"Similar to #{copy}")
    assert results[0]["task_id"] == query, results

    # The query's image has a fixed box, loaded or not: the results never move under the
    # pointer when it arrives (this click once landed on a thumbnail that had moved there).
    box = driver.execute_script(
        """
        const img = document.querySelector('#query img');
        const unloaded = img.cloneNode();
        unloaded.removeAttribute('src');
        img.after(unloaded);
        const r = unloaded.getBoundingClientRect();
        unloaded.remove();
        return [r.width, r.height, img.getBoundingClientRect().height];
        """
    )
    assert box == [120, 72, 72], box

    # "Not this" on the top result: the same query again, refined; that task is gone.
    driver.find_element(By.CSS_SELECTOR, "#results .result button.not-this").click()
    refined = _wait_results(driver, f"Similar to #{copy} (refined)")
    assert query not in [r["task_id"] for r in refined] and copy not in [
        r["task_id"] for r in refined
    ]

    # Back to the original query; select its three best results and queue them.
    task_field.clear()
    task_field.send_keys(str(query))
    driver.find_element(By.ID, "search-task").click()
    results = _wait_results(driver, f"Similar to #{query}")
    results = _wait_thumbnails(driver)
    chosen = [r["task_id"] for r in results[:3]]
    for checkbox in driver.find_elements(By.CSS_SELECTOR, "#results .result input.select")[:3]:
        checkbox.click()
    queue_button = driver.find_element(By.ID, "queue")
    assert queue_button.text == "Queue selected (3)"
    queue_button.click()
    title = f"Similar to #{query}"
    page_wait(driver, 60).until(
        lambda d: (
            "queued" in d.find_element(By.ID, "message").text
            or "error" in d.find_element(By.ID, "message").get_attribute("class")
        )
    )
    message = driver.find_element(By.ID, "message").text
    assert f"3 similar unlabeled tasks queued in tab '{title}'" in message, message

    # The Label Studio tab holds exactly the selected tasks, best match first.
    _, tab_tasks = tab(stack.ls, stack.project, title)
    assert sorted(tab_tasks) == sorted(chosen)
    assert tab_tasks[0] == copy

    # The progress panel still reads indexed == total; the page never holds the API key.
    assert _live_text(driver, count) == f"{total} / {total}"
    me = {"Authorization": f"Token {stack.ls.api_key}"}  # a script uses the same tokens
    assert requests.get(f"{stack.url}/api/projects", timeout=10).status_code == 401
    projects = requests.get(f"{stack.url}/api/projects", headers=me, timeout=10)
    [listed] = [p for p in projects.json()["projects"] if p["id"] == stack.project]
    assert listed["connected"] and listed["task_count"] == total
    assert listed["status"]["indexed"] == listed["status"]["total"] == total
    jobs = requests.get(f"{stack.url}/api/jobs", headers=me, timeout=10)
    assert jobs.json()["workers"] == 1 and jobs.json()["failed"] == 0
    for text in (driver.page_source, projects.text, jobs.text):
        assert stack.ls.api_key not in text
    thumb = requests.get(
        f"{stack.url}/api/projects/{stack.project}/tasks/{copy}/thumbnail?size=128",
        headers=me,
        timeout=30,
    )
    assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/jpeg"
    assert "max-age" in thumb.headers["Cache-Control"]
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 128
    assert stack.ls.api_key.encode() not in thumb.content

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "search-page.png"
    assert driver.save_screenshot(str(screenshot))
    shutil.copy(screenshot, stack.root / "search-page.png")
    print(f"browser part took {time.monotonic() - started:.1f} s; screenshot: {screenshot}")


def test_search_page_near_duplicates_and_coverage_order(page_stack: PageStack, browser) -> None:
    """The page's Near-duplicates view (each group's thumbnails side by side, the kept one
    marked) and its Coverage order switch (the project setting the REST API reads)."""
    from selenium.webdriver.common.by import By

    stack, driver, names = page_stack, browser, page_stack.names
    driver.get(stack.url + "/")
    token = page_wait(driver, 30).until(lambda d: d.find_element(By.ID, "token"))
    if token.is_displayed():  # run alone: sign in first
        token.send_keys(stack.ls.api_key)
        driver.find_element(By.ID, "sign-in-button").click()
    page_wait(driver, 30).until(
        lambda d: d.find_element(By.ID, "project").get_attribute("value") == str(stack.project)
    )
    driver.find_element(By.ID, "duplicates").click()
    groups = page_wait(driver, 120).until(
        lambda d: (found := d.find_elements(By.CSS_SELECTOR, "#results .dup-group"))
        and len(found) >= len(NAMES) and found
    )
    assert len(groups) == len(NAMES)
    by_id = {v: k for k, v in names.items()}
    for group in groups:
        members = group.find_elements(By.CSS_SELECTOR, ".dup-member")
        ids = [int(m.text.split()[0].lstrip("#")) for m in members]
        original, copy = sorted(by_id[i] for i in ids)
        assert copy == original.replace(".jpg", "_copy.jpg")
        kept = group.find_elements(By.CSS_SELECTOR, ".dup-member.keep")
        assert [int(k.text.split()[0].lstrip("#")) for k in kept] == [names[original]]
    page_wait(driver, 60).until(lambda d: all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
        for img in d.find_elements(By.CSS_SELECTOR, "#results .dup-group img.thumb")))
    assert "redundant copies" in driver.find_element(By.ID, "message").text

    me = {"Authorization": f"Token {stack.ls.api_key}"}
    url = f"{stack.url}/api/projects/{stack.project}/coverage"
    switch = page_wait(driver, 30).until(
        lambda d: (box := d.find_element(By.ID, "coverage")).is_enabled() and box
    )
    assert not switch.is_selected()
    switch.click()
    page_wait(driver, 30).until(
        lambda d: "Coverage order on" in d.find_element(By.ID, "message").text
    )
    assert requests.get(url, headers=me, timeout=30).json()["enabled"] is True
    switch.click()
    page_wait(driver, 30).until(
        lambda d: "Coverage order off" in d.find_element(By.ID, "message").text
    )
    assert requests.get(url, headers=me, timeout=30).json()["enabled"] is False
