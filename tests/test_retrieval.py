"""Search end to end: real photos, real weights, real FAISS; and folder indexing."""

from __future__ import annotations

import io
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from lookalike.core.embedding import TextNotSupportedError
from lookalike.core.folder_index import index_folder, iter_image_files
from lookalike.core.images import ImageLoadError
from lookalike.core.query import QueryError, Searcher, SearchOptions
from lookalike.core.store import Collection, ModelMismatchError, VectorStore


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------- augmentations
def random_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    width, height = image.size
    w, h = int(width * 0.8), int(height * 0.8)
    x, y = rng.randint(0, width - w), rng.randint(0, height - h)
    return image.crop((x, y, x + w, y + h))


def colour_jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))


def jpeg_q30(image: Image.Image, rng: random.Random) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes(image, quality=30))).convert("RGB")


def half_size(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC)


def flip(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(image)


def everything(image: Image.Image, rng: random.Random) -> Image.Image:
    for augment in (random_crop, flip, colour_jitter, half_size, jpeg_q30):
        image = augment(image, rng)
    return image


AUGMENTATIONS = {
    "crop80": random_crop,
    "flip": flip,
    "jitter": colour_jitter,
    "jpeg30": jpeg_q30,
    "half": half_size,
    "all": everything,
}
QUALITY_PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "page",
)


# --------------------------------------------------------------------------- real-weights quality
@pytest.fixture(scope="module")
def photo_index(lite0_embedder, photos, tmp_path_factory):
    """All session photos indexed with real EfficientNet-Lite0 weights; ids follow `names`."""
    names = list(photos)
    collection = Collection(
        tmp_path_factory.mktemp("quality") / "photos.lookalike", lite0_embedder.spec, 1280
    )
    collection.upsert(range(len(names)), lite0_embedder.embed_images([photos[n] for n in names]))
    return names, Searcher(collection, lite0_embedder)


@pytest.mark.parametrize("name", QUALITY_PHOTOS)
def test_augmented_copies_find_their_original(photo_index, photos, name):
    names, searcher = photo_index
    rng = random.Random(f"augment-{name}")  # seeded per photo: reproducible, not hand-picked
    for kind, augment in AUGMENTATIONS.items():
        query = augment(photos[name], rng)
        hits = searcher.by_image(png_bytes(query), SearchOptions(k=3))
        found = [names[h.id] for h in hits]
        assert found[0] == name, f"{kind} copy of {name} found {found}"
        assert hits[0].score > hits[1].score


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"])
def test_crop_query_finds_its_source(photo_index, photos, name, tmp_path: Path):
    names, searcher = photo_index
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(jpeg_bytes(photos[name], quality=92))
    width, height = photos[name].size
    box = (width * 0.3, height * 0.25, width * 0.45, height * 0.5)  # a region, in pixels
    query = searcher.image_vector(path, box=box)
    hits = searcher.by_vector(query, SearchOptions(k=2))
    assert names[hits[0].id] == name
    assert hits[0].score < 0.95  # the crop really is a different picture from the whole photo


def test_crop_query_in_percent(photo_index, photos):
    names, searcher = photo_index
    data = png_bytes(photos["rocket"])
    hits = searcher.by_image(data, SearchOptions(k=1), box=(40, 10, 40, 70), box_unit="%")
    assert names[hits[0].id] == "rocket"


def test_other_stereo_camera_finds_the_same_scene(photo_index, motorcycle_right):
    names, searcher = photo_index
    hits = searcher.by_image(png_bytes(motorcycle_right), SearchOptions(k=2))
    assert names[hits[0].id] == "motorcycle_left"


def test_exact_copy_scores_one(photo_index, photos):
    names, searcher = photo_index
    hits = searcher.by_image(png_bytes(photos["coins"]), SearchOptions(k=2))
    assert names[hits[0].id] == "coins"
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[1].score < 0.9


def test_by_id_excludes_itself(photo_index):
    names, searcher = photo_index
    hits = searcher.by_id(names.index("chelsea"), SearchOptions(k=len(names)))
    assert len(hits) == len(names) - 1
    assert names.index("chelsea") not in [h.id for h in hits]


def test_image_only_searcher_refuses_text(photo_index):
    _, searcher = photo_index
    with pytest.raises(TextNotSupportedError):
        searcher.by_text("a cat")


# --------------------------------------------------------------------------- pipeline (open_clip)
@pytest.fixture(scope="module")
def clip_folder(clip_random_embedder, photos, tmp_path_factory):
    """Photo files with one exact duplicate, indexed with random-weight CLIP."""
    root = tmp_path_factory.mktemp("clip-folder")
    for name in ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "page"):
        photos[name].save(root / f"{name}.png")
    store = VectorStore(root / "store")
    collection = store.open("clip", clip_random_embedder.spec, clip_random_embedder.dim)
    report = index_folder(collection, clip_random_embedder, [root])
    assert report.embedded == 7 and not report.failed
    shutil.copyfile(root / "coffee.png", root / "coffee-copy.png")  # not indexed: a query
    return root, collection, Searcher(collection, clip_random_embedder)


def path_of(collection: Collection, item_id: int) -> str:
    return Path(collection.payloads[item_id]["path"]).name


def test_duplicate_file_scores_one_and_ranks_first(clip_folder):
    root, collection, searcher = clip_folder
    hits = searcher.by_image(root / "coffee-copy.png", SearchOptions(k=7))
    assert path_of(collection, hits[0].id) == "coffee.png"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[1].score < 1.0 - 1e-3
    assert len(hits) == 7


def test_text_search_returns_k_sorted(clip_folder):
    _, collection, searcher = clip_folder
    hits = searcher.by_text("a photo of a cat", SearchOptions(k=5))
    assert len(hits) == 5
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h.id in collection for h in hits)
    assert len({h.id for h in hits}) == 5


def test_text_vector_is_normalised(clip_folder):
    _, _, searcher = clip_folder
    vector = searcher.text_vector("  coffee cup  ")
    assert vector.shape == (512,)
    assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_text_query_raises(clip_folder, text):
    _, _, searcher = clip_folder
    with pytest.raises(QueryError):
        searcher.by_text(text)


def test_search_options_apply(clip_folder):
    root, _, searcher = clip_folder
    source = root / "coffee-copy.png"
    everything = searcher.by_image(source, SearchOptions(k=100))
    assert len(everything) == 7
    coffee = everything[0].id
    without = searcher.by_image(source, SearchOptions(k=3, exclude=[coffee]))
    assert [h.id for h in without] == [h.id for h in everything[1:4]]
    cutoff = everything[3].score
    above = searcher.by_image(source, SearchOptions(k=100, min_score=cutoff))
    assert [h.id for h in above] == [h.id for h in everything[:4]]


def test_by_ids_uses_the_mean_and_excludes_queries(clip_folder):
    _, collection, searcher = clip_folder
    ids = sorted(collection.ids().tolist())[:2]
    hits = searcher.by_ids(ids, SearchOptions(k=10))
    assert len(hits) == 5 and not set(ids) & {h.id for h in hits}
    mean = collection.get_many(ids).mean(axis=0)
    direct = searcher.by_vector(mean, SearchOptions(k=10, exclude=ids))
    assert [h.id for h in hits] == [h.id for h in direct]


def test_by_ids_unknown_id(clip_folder):
    _, _, searcher = clip_folder
    with pytest.raises(QueryError, match="not in the index"):
        searcher.by_ids([123456])
    with pytest.raises(QueryError):
        searcher.by_ids([])


def test_by_vector_checks(clip_folder):
    _, collection, searcher = clip_folder
    with pytest.raises(QueryError):
        searcher.by_vector(np.zeros(512, np.float32))
    with pytest.raises(QueryError):
        searcher.by_vector(np.full(512, np.nan, np.float32))
    with pytest.raises(QueryError):
        searcher.by_vector(np.ones(100, np.float32))
    some_id = int(collection.ids()[0])
    scaled = collection.get(some_id) * 7.0  # not normalised: the searcher normalises it
    hit = searcher.by_vector(scaled, SearchOptions(k=1))[0]
    assert hit.id == some_id and hit.score == pytest.approx(1.0, abs=1e-5)


def test_bad_query_image_raises(clip_folder, tmp_path: Path):
    _, _, searcher = clip_folder
    with pytest.raises(ImageLoadError) as caught:
        searcher.by_image(tmp_path / "absent.png")
    assert caught.value.reason == "not_found"


def test_searcher_refuses_another_models_collection(clip_folder, lite0_embedder):
    _, collection, _ = clip_folder
    with pytest.raises(ModelMismatchError, match=r"(?i)reindex"):
        Searcher(collection, lite0_embedder).by_text("x")


def test_searcher_builds_embedder_lazily(clip_folder, clip_random_embedder):
    _, collection, _ = clip_folder
    calls = []

    def factory():
        calls.append(1)
        return clip_random_embedder

    searcher = Searcher(collection, factory)
    some_id = int(collection.ids()[0])
    searcher.by_id(some_id)  # id queries need no model
    assert calls == []
    searcher.by_text("a dog")
    searcher.by_text("a cat")
    assert calls == [1]


# --------------------------------------------------------------------------- folder indexing
def make_folder(root: Path, photos: dict[str, Image.Image]) -> dict[str, Path]:
    """Good images in nested folders, bad files beside them. Returns name -> path."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    files = {
        "chelsea": root / "chelsea.jpg",
        "coffee": root / "a" / "coffee.png",
        "rocket": root / "a" / "b" / "rocket.jpeg",
        "camera": root / "c" / "camera.PNG",
    }
    for name, path in files.items():
        image = photos[name].resize((photos[name].width // 2, photos[name].height // 2))
        image.save(path, "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    good_jpeg = (root / "chelsea.jpg").read_bytes()
    (root / "empty.jpg").write_bytes(b"")
    (root / "a" / "notes.png").write_text("this is not a picture")
    (root / "c" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "readme.txt").write_text("ignored: not an image suffix")
    (root / ".hidden.jpg").write_bytes(good_jpeg)  # dotfiles are skipped
    return files


BAD_REASONS = {"empty.jpg": "empty", "notes.png": "not_an_image", "truncated.jpg": "corrupt"}


def indexed_paths(collection: Collection) -> set[str]:
    return {collection.payloads[i]["path"] for i in collection.ids().tolist()}


def test_iter_image_files(tmp_path: Path, photos):
    make_folder(tmp_path, photos)
    found = list(iter_image_files([tmp_path]))
    root = tmp_path.resolve()
    assert found == [
        root / "chelsea.jpg",
        root / "empty.jpg",
        root / "a" / "coffee.png",
        root / "a" / "notes.png",
        root / "a" / "b" / "rocket.jpeg",
        root / "c" / "camera.PNG",
        root / "c" / "truncated.jpg",
    ]
    with pytest.raises(FileNotFoundError):
        list(iter_image_files([tmp_path / "missing"]))
    # a file named explicitly is taken whatever its suffix
    assert list(iter_image_files([tmp_path / "readme.txt"])) == [root / "readme.txt"]


def test_index_folder_good_and_bad(tmp_path: Path, photos, lite0_embedder):
    files = make_folder(tmp_path / "photos", photos)
    store = VectorStore(tmp_path / "store")
    collection = store.open("f", lite0_embedder.spec, lite0_embedder.dim)
    totals, steps = [], []
    report = index_folder(
        collection,
        lite0_embedder,
        [str(tmp_path / "photos")],
        progress=steps.append,
        on_total=totals.append,
    )

    assert report.embedded == 4 and report.scanned == 7 and report.removed == 0
    assert totals == [7] and sum(steps) == 7
    assert {Path(p).name: reason.split(":")[0] for p, reason in report.failed} == BAD_REASONS
    assert indexed_paths(collection) == {str(p.resolve()) for p in files.values()}
    # saved, and the payload is the fingerprint
    reloaded = VectorStore(store.root).open("f")
    assert len(reloaded) == 4
    payload = next(iter(reloaded.payloads.values()))
    assert set(payload) == {"path", "size", "mtime_ns"}
    # each file's vector is that image's embedding
    rocket_id = next(i for i, p in reloaded.payloads.items() if p["path"].endswith("rocket.jpeg"))
    hit = Searcher(reloaded, lite0_embedder).by_image(files["rocket"], SearchOptions(k=1))[0]
    assert hit.id == rocket_id and hit.score == pytest.approx(1.0, abs=1e-3)


def test_index_folder_incremental(tmp_path: Path, photos, lite0_embedder):
    files = make_folder(tmp_path / "photos", photos)
    collection = VectorStore(tmp_path / "store").open("f", lite0_embedder.spec, lite0_embedder.dim)
    index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    ids_before = {p["path"]: i for i, p in collection.payloads.items()}

    again = index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    assert (again.embedded, again.unchanged, again.removed) == (0, 4, 0)
    assert len(again.failed) == 3  # bad files are reported every time

    # modify one file: only it is re-embedded, under the same id, with a new vector
    coffee = files["coffee"]
    coffee_id = ids_before[str(coffee.resolve())]
    old_vector = collection.get(coffee_id).copy()
    ImageOps.mirror(photos["chelsea"]).save(coffee, "PNG")
    changed = index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    assert (changed.embedded, changed.unchanged, changed.removed) == (1, 3, 0)
    assert {p["path"]: i for i, p in collection.payloads.items()} == ids_before
    assert float(old_vector @ collection.get(coffee_id)) < 0.9

    # delete one file: its vector goes
    rocket_id = ids_before[str(files["rocket"].resolve())]
    files["rocket"].unlink()
    pruned = index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    assert (pruned.embedded, pruned.unchanged, pruned.removed) == (0, 3, 1)
    assert rocket_id not in collection and rocket_id not in collection.payloads
    assert len(VectorStore(tmp_path / "store").open("f")) == 3

    # a new file is added beside the others
    photos["coins"].save(tmp_path / "photos" / "coins.png")
    added = index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    assert (added.embedded, added.unchanged, added.removed) == (1, 3, 0)
    assert len(collection) == 4


def test_file_that_breaks_loses_its_vector(tmp_path: Path, photos, lite0_embedder):
    files = make_folder(tmp_path / "photos", photos)
    collection = VectorStore(tmp_path / "store").open("f", lite0_embedder.spec, lite0_embedder.dim)
    index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    files["camera"].write_bytes(b"")
    report = index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    assert str(files["camera"].resolve()) not in indexed_paths(collection)
    assert (str(files["camera"].resolve()), "empty") in {
        (p, r.split(":")[0]) for p, r in report.failed
    }


def test_pruning_only_touches_the_folders_given(tmp_path: Path, photos, lite0_embedder):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    photos["chelsea"].save(first / "chelsea.png")
    photos["coffee"].save(second / "coffee.png")
    collection = VectorStore(tmp_path / "store").open("f", lite0_embedder.spec, lite0_embedder.dim)
    index_folder(collection, lite0_embedder, [first])
    report = index_folder(collection, lite0_embedder, [second])
    assert report.removed == 0 and len(collection) == 2


def test_overlapping_paths_index_each_file_once(tmp_path: Path, photos, lite0_embedder):
    make_folder(tmp_path / "photos", photos)
    collection = VectorStore(tmp_path / "store").open("f", lite0_embedder.spec, lite0_embedder.dim)
    paths = (p for p in [tmp_path / "photos", tmp_path / "photos" / "a"])  # a generator, too
    report = index_folder(collection, lite0_embedder, paths)
    assert report.embedded == 4 and len(collection) == 4
    assert len(report.failed) == 3
    again = index_folder(collection, lite0_embedder, [tmp_path / "photos", tmp_path / "photos"])
    assert (again.embedded, again.unchanged, again.removed) == (0, 4, 0)


def test_index_folder_keeps_payload_free_ids(tmp_path: Path, photos, lite0_embedder):
    collection = VectorStore(tmp_path / "store").open("f", lite0_embedder.spec, lite0_embedder.dim)
    collection.upsert([0, 1], lite0_embedder.embed_images([photos["moon"], photos["page"]]))
    (tmp_path / "photos").mkdir()
    photos["chelsea"].save(tmp_path / "photos" / "chelsea.png")
    index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    assert len(collection) == 3
    assert sorted(collection.payloads) == [2]


def test_mtime_change_alone_reembeds(tmp_path: Path, photos, lite0_embedder):
    make_folder(tmp_path / "photos", photos)
    collection = VectorStore(tmp_path / "store").open("f", lite0_embedder.spec, lite0_embedder.dim)
    index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    target = tmp_path / "photos" / "chelsea.jpg"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    report = index_folder(collection, lite0_embedder, [tmp_path / "photos"])
    assert (report.embedded, report.unchanged) == (1, 3)
