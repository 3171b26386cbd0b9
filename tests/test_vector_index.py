"""The search engine under every collection: exact vs compressed by size, O(1) updates by id,
exclusions inside the scan, a re-training swapped in while searches and writes go on."""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from lookalike.core.store import Collection
from lookalike.core.vector_index import IdBitmap, IndexPlan, VectorIndex

DIM = 32


def clustered(n: int, seed: int = 0, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around 50 centres (fixed), ids start..start+n-1."""
    centres = np.random.default_rng(99).standard_normal((50, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.arange(start, start + n, dtype=np.int64), x


def exact_top(ids: np.ndarray, vectors: np.ndarray, query: np.ndarray, k: int,
              skip: set[int]) -> list[int]:
    order = np.argsort(-(vectors @ query), kind="stable")
    return [int(ids[i]) for i in order if int(ids[i]) not in skip][:k]


# --------------------------------------------------------------------------- IdBitmap
def test_id_bitmap_is_a_set_of_ids() -> None:
    mask = IdBitmap()
    mask.add(np.array([3, 5, 5, 100_000]))
    assert len(mask) == 3 and 5 in mask and 100_000 in mask and 4 not in mask
    mask.discard(np.array([5, 7]))
    assert len(mask) == 2 and 5 not in mask
    assert mask.contains(np.array([3, -1, 10**9])).tolist() == [True, False, False]
    with pytest.raises(ValueError):
        mask.add(np.array([-2]))


# --------------------------------------------------------------------------- exact regime
def test_below_the_limit_search_is_exact_with_exclusions() -> None:
    ids, x = clustered(3000)
    index = VectorIndex(DIM, IndexPlan(exact_limit=10_000))
    index.upsert(ids, x)
    assert index.exact and not index.needs_rebuild()
    labeled = IdBitmap()
    labeled.add(ids[::2])
    for q in range(20):
        query = x[q * 7 + 1]
        _, found = index.search(query, 10, labeled, [q * 7 + 1])
        skip = set(ids[::2].tolist()) | {q * 7 + 1}
        assert found.tolist() == exact_top(ids, x, query, 10, skip)


def test_updates_replace_and_remove_by_id() -> None:
    ids, x = clustered(500)
    index = VectorIndex(DIM)
    index.upsert(ids, x)
    index.upsert(np.array([7]), x[8:9])  # replace: one entry for id 7, now equal to #8
    assert len(index) == 500
    np.testing.assert_allclose(index.get_many(np.array([7]))[0], x[8], atol=1e-6)
    assert index.remove(np.array([7, 7, 9999])) == 1 and 7 not in index and len(index) == 499
    with pytest.raises(KeyError):
        index.get_many(np.array([7]))
    assert sorted(index.ids().tolist()) == [i for i in range(500) if i != 7]


# --------------------------------------------------------------------------- compressed regime
@pytest.fixture(scope="module")
def big() -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    """40k vectors past a 5k exact limit: re-trained into the compressed index."""
    ids, x = clustered(40_000, seed=1)
    index = VectorIndex(DIM, IndexPlan(exact_limit=5000))
    index.upsert(ids, x)
    assert index.needs_rebuild()
    assert index.rebuild()
    return index, ids, x


def test_past_the_limit_the_index_is_compressed_and_recalls(big) -> None:
    index, ids, x = big
    assert not index.exact and index.kind.startswith("IVF") and "SQ8" in index.kind
    assert len(index) == len(ids) and not index.needs_rebuild()
    labeled = IdBitmap()
    labeled.add(ids[1::2])
    recalls = []
    for q in range(0, 2000, 100):
        _, found = index.search(x[q], 20, labeled, [q])
        truth = exact_top(ids, x, x[q], 20, set(ids[1::2].tolist()) | {q})
        assert not set(found.tolist()) & (set(ids[1::2].tolist()) | {q})
        recalls.append(len(set(found.tolist()) & set(truth)) / 20)
    assert np.mean(recalls) >= 0.9


def test_add_and_remove_at_scale(big) -> None:
    index, ids, x = big
    rng = np.random.default_rng(5)
    gone = rng.choice(ids, 1000, replace=False)
    assert index.remove(gone) == 1000
    new_ids, new_x = clustered(1000, seed=2, start=1_000_000)
    index.upsert(new_ids, new_x)
    assert len(index) == len(ids)
    gone_set = set(gone.tolist())
    for n in range(0, 1000, 50):
        _, found = index.search(new_x[n], 5)
        assert found[0] == new_ids[n]  # a new vector is its own best match at once
        assert not gone_set & set(found.tolist())
    # and the removed ones come back by id when re-added
    index.upsert(gone[:10], x[gone[:10]])
    assert all(int(i) in index for i in gone[:10])


@pytest.mark.parametrize("through", ["bytes", "file"])
def test_a_snapshot_round_trip_keeps_the_trained_index(big, through, tmp_path) -> None:
    index, _, x = big
    if through == "bytes":
        copy = VectorIndex.from_bytes(index.to_bytes())
    else:
        index.write(str(tmp_path / "index.faiss"))
        copy = VectorIndex.read(str(tmp_path / "index.faiss"))
    assert copy.kind == index.kind and len(copy) == len(index)
    for q in (3, 333, 3333):
        np.testing.assert_array_equal(copy.search(x[q], 10)[1], index.search(x[q], 10)[1])
    copy.upsert(np.array([5_000_000]), x[:1])  # updates still O(1) by id after loading
    assert copy.remove(np.array([5_000_000])) == 1
    assert 5_000_000 not in copy and 5_000_000 not in index


def test_rebuild_swaps_in_while_searches_and_writes_go_on() -> None:
    ids, x = clustered(30_000, seed=3)
    index = VectorIndex(DIM, IndexPlan(exact_limit=4000))
    index.upsert(ids, x)
    errors: list[BaseException] = []
    stop = threading.Event()
    added: list[int] = []
    removed: list[int] = []

    def search_and_write() -> None:
        rng = np.random.default_rng(0)
        n = 0
        try:
            while not stop.is_set():
                _, found = index.search(x[n % 1000], 10)
                assert (found >= 0).sum() == 10
                new_id = 2_000_000 + n
                index.upsert(np.array([new_id]), x[n % 1000 : n % 1000 + 1])
                added.append(new_id)
                victim = int(rng.integers(1000, 30_000))
                index.remove(np.array([victim]))
                removed.append(victim)
                n += 1
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=search_and_write)
    worker.start()
    try:
        assert index.rebuild()
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    assert not index.exact and len(added) > 0
    held = set(index.ids().tolist())
    # every write made during the rebuild survived the swap (journal replayed)
    assert set(added) <= held
    assert not set(removed) & held
    assert len(held) == 30_000 + len(added) - len(set(removed))


def test_shrinking_far_below_the_limit_goes_back_to_exact() -> None:
    ids, x = clustered(9000, seed=4)
    index = VectorIndex(DIM, IndexPlan(exact_limit=5000))
    index.upsert(ids, x)
    index.rebuild()
    assert not index.exact
    index.remove(ids[:7000])
    assert index.needs_rebuild() and index.rebuild() and index.exact
    assert len(index) == 2000


def test_format_1_collections_are_migrated(tmp_path: Path) -> None:
    """Collections saved by the previous version (an exact IndexIDMap2) still open."""
    import json

    ids, x = clustered(100)
    old = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    old.add_with_ids(x, ids + 10)
    header = {"format": 1, "model": "m", "dim": DIM, "payloads": {"10": {"path": "a"}},
              "meta": {}}
    path = tmp_path / "old.lookalike"
    with open(path, "wb") as handle:
        np.savez(handle, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                 index=faiss.serialize_index(old))
    collection = Collection.load(path)
    assert len(collection) == 100 and collection.payloads[10] == {"path": "a"}
    assert collection.search(x[5], k=1)[0].id == 15
    collection.save()
    assert Collection.load(path).search(x[5], k=1)[0].id == 15


def test_the_settings_choose_the_limit_and_the_codes() -> None:
    from lookalike.config import Settings

    plan = IndexPlan.from_settings(
        Settings.from_env({"LOOKALIKE_EXACT_LIMIT": "2000", "LOOKALIKE_INDEX_CODES": "SQ4"})
    )
    ids, x = clustered(6000, seed=8)
    index = VectorIndex(DIM, plan)
    index.upsert(ids, x)
    assert index.rebuild() and "SQ4" in index.kind
    assert index.search(x[10], 1)[1][0] == 10
