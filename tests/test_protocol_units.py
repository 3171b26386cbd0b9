"""Label Studio's wire format and the plain functions behind the routes, in process."""

from __future__ import annotations

import base64

import pytest

from lookalike.core.query import QueryError
from lookalike.errors import BadRequestError
from lookalike.service.protocol import (
    STATUS_CONTROL,
    annotation_labels,
    parse_project_id,
    query_from_regions,
    status_prediction,
)
from lookalike.service.queueing import rare_labels
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
    with pytest.raises(QueryError, match="draw a box"):
        query_from_regions(1, regions)


def test_a_box_with_non_numbers_is_a_clear_query_error() -> None:
    region = box_region()
    region["value"]["x"] = "left"
    with pytest.raises(QueryError, match="must be numbers"):
        query_from_regions(1, [region])


def test_the_reply_goes_into_the_status_textarea_of_plugin_config() -> None:
    reply = status_prediction(PLUGIN_CONFIG, "20 similar tasks queued", "lookalike")
    assert reply["model_version"] == "lookalike" and reply["message"] == "20 similar tasks queued"
    [region] = reply["result"]
    assert region["from_name"] == STATUS_CONTROL and region["type"] == "textarea"
    assert region["to_name"] == "image" and region["value"] == {"text": ["20 similar tasks queued"]}


@pytest.mark.parametrize(
    "config", [None, "", "<View><Image name='i' value='$image'/></View>", "<not xml"]
)
def test_without_a_status_textarea_the_reply_has_no_region(config) -> None:
    reply = status_prediction(config, "done", "v1")
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
