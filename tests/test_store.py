"""The FAISS vector store: upsert/remove/search, persistence, atomic saves, model checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

import lookalike.core.store as store_module
from lookalike.core.store import Collection, Hit, ModelMismatchError, StoreError, VectorStore

MODEL = "test:model"
DIM = 16


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force(vectors: np.ndarray, ids: list[int], query: np.ndarray) -> list[tuple[int, float]]:
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")
    return [(ids[i], float(scores[i])) for i in order]


@pytest.fixture
def store(tmp_path: Path) -> VectorStore:
    return VectorStore(tmp_path / "collections")


@pytest.fixture
def filled(store: VectorStore) -> tuple[Collection, np.ndarray, list[int]]:
    """A saved collection of 50 random unit vectors with ids 100..149 and payloads."""
    vectors = unit_vectors(50)
    ids = list(range(100, 150))
    collection = store.open("photos", MODEL, DIM)
    collection.upsert(ids, vectors, [{"n": i} for i in ids])
    collection.save()
    return collection, vectors, ids


# --------------------------------------------------------------------------- basic operations
def test_new_collection_is_empty(store: VectorStore):
    collection = store.open("empty", MODEL, DIM)
    assert len(collection) == 0
    assert collection.ids().tolist() == []
    assert collection.search(unit_vectors(1)[0], k=5) == []
    assert not store.exists("empty")  # nothing on disk until saved


def test_upsert_and_get(filled):
    collection, vectors, ids = filled
    assert len(collection) == 50
    assert sorted(collection.ids().tolist()) == ids
    for position in (0, 17, 49):
        np.testing.assert_allclose(collection.get(ids[position]), vectors[position], atol=1e-6)
    assert collection.payloads[117] == {"n": 117}
    assert 117 in collection and 99 not in collection and "117" not in collection


def test_get_many(filled):
    collection, vectors, _ = filled
    np.testing.assert_allclose(collection.get_many([103, 101]), vectors[[3, 1]], atol=1e-6)
    np.testing.assert_allclose(collection.get_many(np.array([102])), vectors[[2]], atol=1e-6)
    assert collection.get_many([]).shape == (0, DIM)


def test_get_missing_raises_keyerror(filled):
    collection, _, _ = filled
    with pytest.raises(KeyError):
        collection.get(5)
    collection.remove([100])
    with pytest.raises(KeyError):
        collection.get(100)


def test_upsert_existing_id_replaces(filled):
    collection, vectors, _ = filled
    replacement = unit_vectors(1, seed=99)[0]
    collection.upsert([120], replacement, [{"n": "new"}])
    assert len(collection) == 50
    np.testing.assert_allclose(collection.get(120), replacement, atol=1e-6)
    assert collection.payloads[120] == {"n": "new"}
    hits = collection.search(replacement, k=1)
    assert hits[0].id == 120 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    # the old vector is gone: searching for it no longer finds 120 with score 1
    old_hits = collection.search(vectors[20], k=50)
    assert all(not (h.id == 120 and h.score > 0.999) for h in old_hits)


def test_duplicate_ids_in_one_upsert_keep_the_last(store: VectorStore):
    collection = store.open("dups", MODEL, DIM)
    vectors = unit_vectors(4)
    collection.upsert([7, 8, 7, 9], vectors, ["a", "b", "c", "d"])
    assert len(collection) == 3
    assert sorted(collection.ids().tolist()) == [7, 8, 9]
    np.testing.assert_allclose(collection.get(7), vectors[2], atol=1e-6)
    assert collection.payloads[7] == "c"


def test_upsert_count_mismatch(store: VectorStore):
    collection = store.open("x", MODEL, DIM)
    with pytest.raises(StoreError):
        collection.upsert([1, 2], unit_vectors(3))
    with pytest.raises(StoreError):
        collection.upsert([1, 2], unit_vectors(2), ["only one"])
    assert len(collection) == 0


def test_upsert_wrong_dimension(store: VectorStore):
    collection = store.open("x", MODEL, DIM)
    with pytest.raises(ModelMismatchError):
        collection.upsert([1], unit_vectors(1, dim=DIM + 1))


def test_remove(filled):
    collection, vectors, _ = filled
    assert collection.remove([101, 103, 999]) == 2
    assert len(collection) == 48
    assert 101 not in collection and 101 not in collection.payloads
    assert all(h.id not in (101, 103) for h in collection.search(vectors[1], k=50))
    assert collection.remove([]) == 0


def test_search_matches_brute_force(filled):
    collection, vectors, ids = filled
    query = unit_vectors(1, seed=7)[0]
    expected = brute_force(vectors, ids, query)[:10]
    hits = collection.search(query, k=10)
    assert [h.id for h in hits] == [i for i, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(isinstance(h, Hit) and isinstance(h.id, int) for h in hits)


def test_search_self_is_first(filled):
    collection, vectors, ids = filled
    for position in (0, 25, 49):
        hit = collection.search(vectors[position], k=3)[0]
        assert hit.id == ids[position]
        assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_search_exclude(filled):
    collection, vectors, ids = filled
    query = vectors[5]
    excluded = {105} | {h.id for h in collection.search(query, k=4)}
    hits = collection.search(query, k=10, exclude=excluded)
    assert len(hits) == 10
    assert not excluded & {h.id for h in hits}
    expected = [i for i, _ in brute_force(vectors, ids, query) if i not in excluded][:10]
    assert [h.id for h in hits] == expected


def test_search_min_score(filled):
    collection, vectors, ids = filled
    query = vectors[0]
    threshold = 0.2
    hits = collection.search(query, k=50, min_score=threshold)
    expected = [i for i, s in brute_force(vectors, ids, query) if s >= threshold]
    assert [h.id for h in hits] == expected
    assert 0 < len(hits) < 50
    assert all(h.score >= threshold for h in hits)


def test_search_k_larger_than_collection(filled):
    collection, vectors, _ = filled
    hits = collection.search(vectors[0], k=1000)
    assert len(hits) == 50
    assert len({h.id for h in hits}) == 50
    assert len(collection.search(vectors[0], k=1000, exclude=[100, 101])) == 48


def test_search_k_zero(filled):
    collection, vectors, _ = filled
    assert collection.search(vectors[0], k=0) == []


def test_search_wrong_dimension(filled):
    collection, _, _ = filled
    with pytest.raises(ModelMismatchError):
        collection.search(unit_vectors(1, dim=DIM * 2)[0])


# --------------------------------------------------------------------------- persistence
def test_save_and_reload_round_trip(filled, store: VectorStore):
    collection, vectors, ids = filled
    collection.remove([110])
    collection.upsert([200], unit_vectors(1, seed=5), [{"n": 200, "tags": ["a", "é"]}])
    collection.meta["source"] = "test"
    collection.save()

    for reloaded in (Collection.load(collection.path), VectorStore(store.root).open("photos")):
        assert reloaded.model == MODEL and reloaded.dim == DIM
        assert sorted(reloaded.ids().tolist()) == [i for i in ids if i != 110] + [200]
        assert 110 not in reloaded and 110 not in reloaded.payloads
        np.testing.assert_array_equal(reloaded.get(149), collection.get(149))
        np.testing.assert_array_equal(reloaded.get(200), collection.get(200))
        assert reloaded.payloads[200] == {"n": 200, "tags": ["a", "é"]}
        assert reloaded.payloads[101] == {"n": 101}
        assert reloaded.meta == {"source": "test"}
        query = vectors[3]
        assert reloaded.search(query, k=5) == collection.search(query, k=5)


def test_reloaded_collection_can_be_updated(filled):
    collection, _, _ = filled
    reloaded = Collection.load(collection.path)
    reloaded.upsert([100], unit_vectors(1, seed=11))  # replace after reload
    reloaded.upsert([500], unit_vectors(1, seed=12))
    assert len(reloaded) == 51
    reloaded.save()
    assert len(Collection.load(collection.path)) == 51


def test_store_names_exists_drop(store: VectorStore):
    assert store.names() == []
    for name in ("b", "a"):
        collection = store.open(name, MODEL, DIM)
        collection.upsert([1], unit_vectors(1))
        collection.save()
    assert store.names() == ["a", "b"]
    assert store.exists("a")
    assert store.drop("a") is True
    assert store.drop("a") is False
    assert store.names() == ["b"]
    with pytest.raises(StoreError):
        store.open("a")


def test_open_missing_without_model_raises(store: VectorStore):
    with pytest.raises(StoreError, match="no collection"):
        store.open("nothing")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "x" * 129, "sp ace"])
def test_bad_collection_names(store: VectorStore, name: str):
    with pytest.raises(StoreError):
        store.path_for(name)


def test_atomic_save_survives_crash_in_write(filled, monkeypatch: pytest.MonkeyPatch):
    collection, _, ids = filled
    before = collection.path.read_bytes()

    def crash(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")  # partial data, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(store_module.np, "savez", crash)
    collection.upsert([999], unit_vectors(1, seed=3))
    with pytest.raises(OSError, match="disk full"):
        collection.save()
    monkeypatch.undo()

    assert collection.path.read_bytes() == before
    reloaded = Collection.load(collection.path)
    assert sorted(reloaded.ids().tolist()) == ids
    assert list(collection.path.parent.glob("*.tmp")) == []


def test_atomic_save_survives_crash_before_rename(filled, monkeypatch: pytest.MonkeyPatch):
    collection, _, ids = filled

    def crash(src, dst):
        raise KeyboardInterrupt  # even a BaseException must not leave the temp file behind

    monkeypatch.setattr(store_module.os, "replace", crash)
    collection.remove([100, 101])
    with pytest.raises(KeyboardInterrupt):
        collection.save()
    monkeypatch.undo()

    assert sorted(Collection.load(collection.path).ids().tolist()) == ids
    assert sorted(os.listdir(collection.path.parent)) == ["photos.lookalike"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: b"not a collection at all",
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: data[:200] + bytes(len(data) - 200),  # zeroed after the zip header
    ],
    ids=["empty", "garbage", "truncated", "zeroed"],
)
def test_corrupt_file_raises_store_error(filled, damage):
    collection, _, _ = filled
    collection.path.write_bytes(damage(collection.path.read_bytes()))
    with pytest.raises(StoreError):
        Collection.load(collection.path)
    with pytest.raises(StoreError):
        VectorStore(collection.path.parent).open("photos")


def test_corrupt_index_bytes_raise_store_error(tmp_path: Path):
    # A well-formed archive whose FAISS index is nonsense.
    path = tmp_path / "bad.lookalike"
    header = b'{"format": 1, "model": "m", "dim": 4, "payloads": {}, "meta": {}}'
    with open(path, "wb") as handle:
        np.savez(
            handle,
            header=np.frombuffer(header, dtype=np.uint8),
            index=np.frombuffer(b"IxMp" + bytes(40), dtype=np.uint8),
        )
    with pytest.raises(StoreError):
        Collection.load(path)


def test_unknown_format_version(filled, monkeypatch: pytest.MonkeyPatch):
    collection, _, _ = filled
    monkeypatch.setattr(store_module, "FORMAT_VERSION", 99)  # a file from a future version
    collection.save()
    monkeypatch.undo()
    with pytest.raises(StoreError, match="format 99"):
        Collection.load(collection.path)


# --------------------------------------------------------------------------- model checks
def test_model_mismatch_refused(filled, store: VectorStore):
    with pytest.raises(ModelMismatchError) as caught:
        VectorStore(store.root).open("photos", "other:model", DIM)
    assert "reindex" in str(caught.value).lower()
    assert MODEL in str(caught.value) and "other:model" in str(caught.value)


def test_dimension_mismatch_refused(filled, store: VectorStore):
    with pytest.raises(ModelMismatchError) as caught:
        VectorStore(store.root).open("photos", MODEL, DIM * 2)
    assert "reindex" in str(caught.value).lower()


def test_same_model_accepted(filled, store: VectorStore):
    assert len(VectorStore(store.root).open("photos", MODEL, DIM)) == 50


# --------------------------------------------------------------------------- several processes
def test_reader_sees_writers_saves(store: VectorStore):
    writer = store.open("shared", MODEL, DIM)
    writer.upsert([1], unit_vectors(1, seed=1))
    writer.save()

    reader_store = VectorStore(store.root)  # another process's view of the same files
    reader = reader_store.open("shared")
    assert reader.ids().tolist() == [1]
    assert reader_store.open("shared") is reader  # unchanged file: the cached copy

    writer.upsert([2, 3], unit_vectors(2, seed=2))
    assert not reader.is_stale()  # nothing saved yet
    writer.save()
    assert reader.is_stale()
    fresh = reader_store.open("shared")
    assert sorted(fresh.ids().tolist()) == [1, 2, 3]
    np.testing.assert_array_equal(fresh.get(3), writer.get(3))
    assert not fresh.is_stale()


def test_reader_sees_saves_with_identical_mtime(store: VectorStore):
    # Filesystems with coarse timestamps (1 s on some, a clock tick on older kernels) can give
    # two quick saves the same mtime: staleness must not rest on the mtime alone.
    writer = store.open("shared", MODEL, DIM)
    writer.upsert([1], unit_vectors(1, seed=1))
    writer.save()
    first = os.stat(writer.path)
    reader_store = VectorStore(store.root)
    assert len(reader_store.open("shared")) == 1

    writer.upsert([2], unit_vectors(1, seed=2))
    writer.save()
    os.utime(writer.path, ns=(first.st_atime_ns, first.st_mtime_ns))
    assert len(reader_store.open("shared")) == 2


def test_reader_sees_drop_and_recreate(store: VectorStore):
    writer = store.open("shared", MODEL, DIM)
    writer.upsert([1, 2], unit_vectors(2))
    writer.save()
    reader_store = VectorStore(store.root)
    assert len(reader_store.open("shared")) == 2
    store.drop("shared")
    with pytest.raises(StoreError):
        reader_store.open("shared")


def test_writer_does_not_see_itself_as_stale(store: VectorStore):
    collection = store.open("self", MODEL, DIM)
    collection.upsert([1], unit_vectors(1))
    collection.save()
    assert not collection.is_stale()
    assert store.open("self") is collection


def test_saved_file_follows_the_umask_not_mkstemps_0600(filled):
    collection, _, _ = filled
    old = os.umask(0o022)
    try:
        collection.save()
    finally:
        os.umask(old)
    # Readable by a web process or worker running as another user of the same group.
    assert stat.S_IMODE(collection.path.stat().st_mode) == 0o644
