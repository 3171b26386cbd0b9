"""Label suggestions and likely mislabels, measured on a real labeled set: scikit-learn's
handwritten digits (real scans, 10 classes), embedded with real ImageNet EfficientNet-Lite0
weights. The figures printed here are the README's."""

from __future__ import annotations

import numpy as np
import pytest
from tests.conftest import digit_images

from lookalike.service.suggestions import (
    PROMPT_TEMPLATES,
    ChoicesControl,
    knn_vote,
    likely_mislabels,
    zero_shot,
)

PER_CLASS = 40
K = 10


@pytest.fixture(scope="module")
def digits(lite0_embedder):
    images, labels = digit_images(PER_CLASS, seed=1)
    return lite0_embedder.embed_images(images), [str(t) for t in labels]


def test_neighbours_suggest_the_right_digit_far_above_chance(digits) -> None:
    vectors, labels = digits
    rng = np.random.default_rng(2)
    labeled = rng.choice(len(labels), len(labels) // 2, replace=False)  # half labeled
    unlabeled = np.setdiff1d(np.arange(len(labels)), labeled)
    suggestions = knn_vote(vectors[labeled], [[labels[i]] for i in labeled], vectors[unlabeled], K)
    right = [
        s is not None and s.labels[0] == labels[i]
        for s, i in zip(suggestions, unlabeled, strict=True)
    ]
    accuracy = float(np.mean(right))
    confident = [s.confidence for s, ok in zip(suggestions, right, strict=True) if ok and s]
    wrong = [s.confidence for s, ok in zip(suggestions, right, strict=True) if not ok and s]
    print(f"suggestion accuracy at k={K}: {accuracy:.3f} over {len(unlabeled)} tasks "
          f"(confidence right {np.mean(confident):.2f}, wrong {np.mean(wrong):.2f})")  # fmt: skip
    assert accuracy > 0.5  # chance is 0.1
    assert np.mean(confident) > np.mean(wrong)  # the confidence means something


def test_flipped_labels_are_found(digits) -> None:
    vectors, labels = digits
    rng = np.random.default_rng(3)
    flipped = set(rng.choice(len(labels), len(labels) // 20, replace=False).tolist())  # 5 %
    given = [
        [str((int(label) + 1 + rng.integers(9)) % 10)] if i in flipped else [label]
        for i, label in enumerate(labels)
    ]
    assert all(given[i] != [labels[i]] for i in flipped)
    found = likely_mislabels(list(range(len(labels))), vectors, given, K)
    hits = {m.task_id for m in found}
    precision = len(hits & flipped) / max(len(hits), 1)
    recall = len(hits & flipped) / len(flipped)
    print(f"mislabels (5 % flipped, k={K}): precision {precision:.2f}, recall {recall:.2f}, "
          f"{len(hits)} flagged of {len(labels)}")  # fmt: skip
    assert recall >= 0.5 and precision >= 0.3  # far above the 5 % base rate
    top = found[0]
    assert top.neighbours_say != top.labeled[0] and 0.5 < top.score <= 1.0


def test_multiple_choice_suggests_every_label_half_the_vote_carries() -> None:
    neighbours = np.eye(3, dtype=np.float32)
    labels = [["Night", "Urban"], ["Night"], ["Rural"]]
    query = np.array([[0.7, 0.5, 0.1]], np.float32)  # Urban: 0.7 / 1.3 of the vote
    [single] = knn_vote(neighbours, labels, query, k=3)
    [multiple] = knn_vote(neighbours, labels, query, k=3, multiple=True)
    assert single.labels == ("Night",) and multiple.labels == ("Night", "Urban")
    assert knn_vote(np.empty((0, 3)), [], query, k=3) == [None]


def test_zero_shot_picks_the_label_whose_prompts_match(clip_random_embedder) -> None:
    """Random weights: the plumbing, not the meaning. A query equal to a label's prompt
    centroid must get that label."""
    labels = ["police car", "cat", "coffee"]
    texts = [template.format("cat") for template in PROMPT_TEMPLATES]
    centroid = clip_random_embedder.embed_text(texts).mean(axis=0)
    centroid /= np.linalg.norm(centroid)
    [suggestion] = zero_shot(clip_random_embedder, labels, centroid[None])
    assert suggestion.labels == ("cat",) and 0.0 < suggestion.confidence <= 1.0


def test_the_choices_control_of_a_config_is_found() -> None:
    config = """<View><Image name="image" value="$image"/>
      <Choices name="kind" toName="image" choice="multiple">
        <Choice value="Cat"/><Choice value="Dog"/></Choices>
      <RectangleLabels name="label" toName="image"><Label value="Car"/></RectangleLabels>
    </View>"""
    control = ChoicesControl.find(config, "image")
    assert control == ChoicesControl("kind", "image", ("Cat", "Dog"), True)
    assert control.result(["Cat"], 0.81234)["value"] == {"choices": ["Cat"]}
    plugin = (__import__("pathlib").Path(__file__).parents[1] / "plugin_config.xml").read_text()
    assert ChoicesControl.find(plugin) is None  # boxes only: no whole-image label to suggest
    assert ChoicesControl.find("<not xml") is None
