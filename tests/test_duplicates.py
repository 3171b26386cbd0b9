"""Near-duplicate grouping (core.duplicates) on real photos with real weights, and at a scale
that takes the approximate path; varied results (one per group)."""

from __future__ import annotations

import numpy as np
import pytest
from tests.test_e2e_backend import PHOTOS, augmented, photo

from lookalike.core import duplicates
from lookalike.core.duplicates import near_duplicate_groups, one_per_group
from lookalike.core.store import Hit
from lookalike.service.duplicates import DEFAULT_THRESHOLDS


@pytest.fixture(scope="module")
def photo_vectors(lite0_embedder) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The e2e photos and their augmented copies (crop, mirror, colour, JPEG q60)."""
    names, images = [], []
    for name in PHOTOS:
        names += [name, f"{name}_copy"]
        images += [photo(name), augmented(photo(name))]
    vectors = lite0_embedder.embed_images(images)
    return np.arange(100, 100 + len(names)), vectors, names


def test_the_augmented_copies_and_nothing_else(photo_vectors) -> None:
    ids, vectors, names = photo_vectors
    threshold = DEFAULT_THRESHOLDS["timm"]
    report = near_duplicate_groups(ids, vectors, threshold)
    found = {tuple(names[i - 100] for i in g.task_ids) for g in report.groups}
    assert found == {(n, f"{n}_copy") for n in PHOTOS}
    for group in report.groups:
        a, b = (int(i) - 100 for i in group.task_ids)
        assert group.max_score == pytest.approx(float(vectors[a] @ vectors[b]), abs=1e-5)
        assert group.max_score >= threshold
    # The margin the default stands on: the weakest copy vs the closest distinct pair.
    copies = min(g.max_score for g in report.groups)
    distinct = near_duplicate_groups(ids, vectors, copies - 0.2).groups
    assert all(len(g.task_ids) == 2 for g in distinct)  # still only the copy pairs


def test_copies_of_copies_form_one_group() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((50, 32)).astype(np.float32)
    a = base[0]
    b = a + 0.25 * rng.standard_normal(32).astype(np.float32) * np.linalg.norm(a) / 32**0.5
    c = b + 0.25 * rng.standard_normal(32).astype(np.float32) * np.linalg.norm(a) / 32**0.5
    vectors = np.vstack([base, b, c])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ab, bc, ac = vectors[0] @ vectors[50], vectors[50] @ vectors[51], vectors[0] @ vectors[51]
    threshold = float(min(ab, bc)) - 1e-3
    assert ac < threshold  # a and c only meet through b
    groups = near_duplicate_groups(np.arange(52), vectors, threshold).groups
    assert [g.task_ids for g in groups] == [(0, 50, 51)]


def test_the_approximate_path_finds_planted_copies(monkeypatch) -> None:
    monkeypatch.setattr(duplicates, "EXACT_LIMIT", 5_000)
    rng = np.random.default_rng(1)
    n, dim, planted = 20_000, 64, 300
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    originals = rng.choice(n - planted, planted, replace=False)
    copies = np.arange(n - planted, n)
    vectors[copies] = vectors[originals] + 0.15 * rng.standard_normal((planted, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    report = near_duplicate_groups(np.arange(n), vectors, 0.95)
    assert report.index.startswith("IVF")
    found = {g.task_ids for g in report.groups}
    expected = {tuple(sorted((int(o), int(c)))) for o, c in zip(originals, copies, strict=True)}
    assert len(found & expected) >= 0.95 * planted
    assert found <= expected  # random 64-d vectors are never near-duplicates


def test_one_per_group_keeps_the_best_of_each() -> None:
    vectors = np.eye(4, dtype=np.float32)[[0, 0, 1, 2, 1]]  # hits 0,1 alike; 2,4 alike
    hits = [Hit(i, 1.0 - i / 10) for i in range(5)]
    assert [h.id for h in one_per_group(hits, vectors, 0.9, k=10)] == [0, 2, 3]
    assert [h.id for h in one_per_group(hits, vectors, 0.9, k=2)] == [0, 2]
    assert [h.id for h in one_per_group(hits, vectors, 1.1, k=10)] == [0, 1, 2, 3, 4]
