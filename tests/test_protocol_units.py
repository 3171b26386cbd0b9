"""Label Studio's wire format and the plain functions behind the routes, in process."""

from __future__ import annotations

import base64

import pytest

from lookalike.core.embedding import TextNotSupportedError
from lookalike.core.query import QueryError
from lookalike.errors import BadRequestError, ConflictError, LookalikeError
from lookalike.service.annotations import annotation_labels, own_region_ids, without_own_regions
from lookalike.service.ls_client import TaskImageError
from lookalike.service.protocol import (
    STATUS_CONTROL,
    annotator_message,
    parse_project_id,
    query_from_regions,
    status_prediction,
)
from lookalike.service.queueing import priority_score, rare_labels
from lookalike.service.similarity import SimilarQuery

PLUGIN_CONFIG = (__import__("pathlib").Path(__file__).parents[1] / "plugin_config.xml").read_text()


def box_region(x: float = 10, y: float = 20, w: float = 30, h: float = 40) -> dict:
    return {
        "type": "rectanglelabels",
        "from_name": "lookalike_box",
        "to_name": "image",
        "value": {
            "x": x,
            "y": y,
            "width": w,
            "height": h,
            "rotation": 0,
            "rectanglelabels": ["Find similar"],
        },
        "original_width": 640,
        "original_height": 480,
    }


@pytest.mark.parametrize(
    ("value", "expected"), [("12.1700000000", 12), ("3", 3), (7, 7), ("42.1699.5", 42)]
)
def test_project_ids_are_read_from_label_studios_id_dot_timestamp(value, expected) -> None:
    assert parse_project_id(value) == expected


@pytest.mark.parametrize("value", [None, "", "abc.123", "-1.5"])
def test_a_bad_project_id_is_a_bad_request(value) -> None:
    with pytest.raises(BadRequestError, match="project id"):
        parse_project_id(value)


def test_a_box_region_queries_by_its_crop_in_percent() -> None:
    query = query_from_regions(5, [box_region()])
    assert (query.task_id, query.box, query.text) == (5, (10.0, 20.0, 30.0, 40.0), None)
    assert query.title() == "Similar to #5 (box)"


def test_the_last_region_decides_and_text_wins_when_it_is_last() -> None:
    text = {"type": "textarea", "from_name": "lookalike_text", "value": {"text": [" police car "]}}
    query = query_from_regions(5, [box_region(), text])
    assert query.text == "police car" and query.box is None
    assert query.title() == "Text: police car"
    assert query_from_regions(5, [text, box_region()]).box is not None


def test_the_latest_of_several_prompts_is_the_query() -> None:
    text = {
        "type": "textarea",
        "from_name": "lookalike_text",
        "value": {"text": ["a cat", "a car "]},
    }
    assert query_from_regions(5, [text]).text == "a car"


def test_a_double_click_box_queries_the_whole_image() -> None:
    """Label Studio's double-click draws a small box that is square in image pixels."""
    square = box_region(x=50, y=50, w=30 / 640 * 100, h=30 / 480 * 100)
    assert query_from_regions(5, [square]).box is None
    assert query_from_regions(5, [box_region(50, 50, 4.7, 5.9)]).box is not None  # by hand
    big_square = box_region(x=0, y=0, w=60, h=80)  # square too, but a real selection
    assert query_from_regions(5, [big_square]).box == (0.0, 0.0, 60.0, 80.0)
    no_size = box_region(x=50, y=50, w=30 / 640 * 100, h=30 / 480 * 100)
    del no_size["original_width"]  # an API caller: a box is a box
    assert query_from_regions(5, [no_size]).box is not None


def test_the_users_own_labels_on_a_query_box_are_ignored() -> None:
    """A label selected while drawing rides along under the same region id: not a query."""
    own = {**box_region(1, 1, 50, 50), "id": "r1"}
    users = {**own, "from_name": "label", "value": {**own["value"], "rectanglelabels": ["Car"]}}
    assert query_from_regions(5, [own, users]).box == (1.0, 1.0, 50.0, 50.0)
    with pytest.raises(QueryError):
        query_from_regions(5, [users])


def test_a_keypoint_queries_by_the_whole_image() -> None:
    point = {"type": "keypointlabels", "value": {"x": 3, "y": 4, "keypointlabels": ["x"]}}
    query = query_from_regions(9, [point])
    assert query.task_id == 9 and query.box is None and query.text is None
    assert query.title() == "Similar to #9"


@pytest.mark.parametrize(
    "regions",
    [
        [],
        [{"type": "textarea", "value": {"text": ["  "]}}],
        [{"type": "polygon", "value": {}}],
        ["not a dict"],
    ],
)
def test_regions_without_a_query_say_what_to_do(regions) -> None:
    with pytest.raises(QueryError, match="drag a box"):
        query_from_regions(1, regions)


def test_a_box_with_non_numbers_is_a_clear_query_error() -> None:
    region = box_region()
    region["value"]["x"] = "left"
    with pytest.raises(QueryError, match="must be numbers"):
        query_from_regions(1, [region])


def test_the_reply_goes_into_the_status_textarea_of_plugin_config() -> None:
    replies = ["20 similar tasks queued", "an older reply"]
    reply = status_prediction(PLUGIN_CONFIG, replies, "lookalike")
    assert reply["model_version"] == "lookalike" and reply["message"] == "20 similar tasks queued"
    [region] = reply["result"]
    assert region["from_name"] == STATUS_CONTROL and region["type"] == "textarea"
    assert region["to_name"] == "image" and region["value"] == {"text": replies}


@pytest.mark.parametrize(
    "config", [None, "", "<View><Image name='i' value='$image'/></View>", "<not xml"]
)
def test_without_a_status_textarea_the_reply_has_no_region(config) -> None:
    reply = status_prediction(config, ["done"], "v1")
    assert reply["result"] == [] and reply["message"] == "done"


def test_annotation_labels_skip_lookalikes_own_tools() -> None:
    annotation = {
        "result": [
            {"from_name": "label", "value": {"rectanglelabels": ["Police car"]}},
            {"from_name": "class", "value": {"choices": ["Night", "Urban"]}},
            {"from_name": "lookalike_box", "value": {"rectanglelabels": ["Find similar"]}},
            {"from_name": "notes", "value": {"text": ["not a label"]}},
        ]
    }
    assert annotation_labels(annotation) == ["Police car", "Night", "Urban"]
    assert annotation_labels({}) == []


@pytest.mark.parametrize(
    ("counts", "share", "expected"),
    [
        ({"Car": 10}, 0.2, set()),  # one label: nothing is rare yet
        ({"Car": 10, "Police car": 1}, 0.2, {"Police car"}),
        ({"Car": 5, "Truck": 5}, 0.2, set()),  # a tie is not rare
        ({"Car": 10, "Truck": 9, "Bus": 2}, 0.2, {"Bus"}),
        ({"Car": 10, "Truck": 2, "Bus": 1}, 0.2, {"Truck", "Bus"}),  # below the share
    ],
)
def test_rare_labels(counts, share, expected) -> None:
    assert rare_labels(counts, share) == expected


def test_similar_query_from_json_accepts_each_kind_of_query() -> None:
    png = base64.b64encode(b"\x89PNG fake").decode()
    assert SimilarQuery.from_json({"task_id": 4}).task_id == 4
    assert SimilarQuery.from_json({"text": "a cat"}).text == "a cat"
    assert (
        SimilarQuery.from_json({"image": f"data:image/png;base64,{png}"}).image == b"\x89PNG fake"
    )
    assert SimilarQuery.from_json({"url": "https://example.org/x.jpg"}).url.endswith("x.jpg")
    boxed = SimilarQuery.from_json(
        {"task_id": "4", "box": {"x": 1, "y": 2, "width": 3, "height": 4}}
    )
    assert boxed.box == (1.0, 2.0, 3.0, 4.0) and boxed.task_id == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "exactly one"),
        ({"task_id": 1, "text": "x"}, "exactly one"),
        ({"image": "%%%"}, "base64"),
        ({"task_id": 1, "box": {"x": 1}}, "box is"),
        ({"task_id": 1, "box": "wide"}, "box is"),
        ({"url": "/etc/passwd"}, "http"),
        ({"url": "file:///etc/passwd"}, "http"),
        ({"text": 5}, "string"),
        ({"task_id": "one"}, "integer"),
    ],
)
def test_similar_query_from_json_refuses_bad_bodies_with_a_message(body, message) -> None:
    with pytest.raises(QueryError, match=message):
        SimilarQuery.from_json(body)


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (TextNotSupportedError("timm:x is image-only; use LOOKALIKE_MODEL=..."), "ask your admin"),
        (ConflictError("project 3 has no index yet: connect the backend"), "not searchable yet"),
        (TaskImageError("task 4 image: HTTP 403 from http://internal/x.jpg", "http_403"), "image"),
        (LookalikeError("redis key lookalike:project:3 ..."), "could not search right now"),
    ],
)
def test_annotators_read_what_to_do_not_admin_details(error, says) -> None:
    message = annotator_message(error)
    assert says in message
    assert "LOOKALIKE_" not in message and "http" not in message and "lookalike:" not in message


def test_query_errors_reach_the_annotator_as_they_are() -> None:
    assert annotator_message(QueryError("Press M and drag a box")) == "Press M and drag a box"


def test_query_regions_come_out_of_annotations_with_labels_riding_on_them() -> None:
    box = {"x": 1, "y": 1, "width": 40, "height": 40}
    result = [
        {"id": "q", "from_name": "lookalike_box", "type": "rectangle", "value": box},
        {"id": "q", "from_name": "label", "value": {**box, "rectanglelabels": ["Car"]}},
        {"id": "s", "from_name": "lookalike_status", "value": {"text": ["queued"]}},
        {"id": "u", "from_name": "label", "value": {**box, "rectanglelabels": ["Person"]}},
        {"id": "c", "from_name": "class", "value": {"choices": ["Night"]}},
    ]
    assert own_region_ids(result) == {"q", "s"}
    assert [r["id"] for r in without_own_regions(result)] == ["u", "c"]
    assert without_own_regions(result[3:]) == result[3:]


def test_priority_scores_order_matches_within_a_request_and_requests_latest_first() -> None:
    sims = [0.99, 0.5, 0.2, 0.0001, 0.00005, 0.0, -0.01, -0.02, -0.5, -1.0]
    first, second = [priority_score(1, s) for s in sims], [priority_score(2, s) for s in sims]
    assert first == sorted(first) and len(set(first)) == len(first)  # best first, no ties
    assert max(second) < min(first)  # the later request's band lies below the earlier one
    assert priority_score(3, 0.87) == pytest.approx(-3.87)  # reads -R.SS
