"""The indexing pipeline (core/pipeline.py) and the query-embedding path (core/query.py).

Real images, real embedders; the readers and writers are small real implementations that
record what the pipeline did with them.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.core.images import ImageLoadError, crop, decode_image, load_image
from lookalike.core.pipeline import Item, PipelineReport, run_pipeline
from lookalike.core.query import (
    QueryError,
    Searcher,
    image_query_vector,
    query_draft_size,
    text_query_vector,
)
from lookalike.core.store import VectorStore

NAMES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "page")


class FileReader:
    """Items are files; records how far its generator was consumed and what it loaded."""

    def __init__(self, paths: list[Path], delays: dict[int, float] | None = None) -> None:
        self.paths = paths
        self.delays = delays or {}
        self.consumed = 0
        self.closed = False
        self.fail_with: dict[int, Exception] = {}
        self.drafts: set[int | None] = set()
        self.lock = threading.Lock()

    def items(self) -> Iterator[Item]:
        try:
            for key, path in enumerate(self.paths):
                self.consumed += 1
                yield Item(key, path, payload={"name": path.name})
        finally:
            self.closed = True

    def load(self, item: Item, draft_size: int | None) -> Image.Image:
        with self.lock:
            self.drafts.add(draft_size)
        time.sleep(self.delays.get(item.key, 0.0))
        if item.key in self.fail_with:
            raise self.fail_with[item.key]
        return load_image(item.source, draft_size=draft_size)


class RecordingWriter:
    def __init__(self, reader: FileReader | None = None, fail_after: int | None = None) -> None:
        self.reader = reader
        self.fail_after = fail_after
        self.keys: list[int] = []
        self.payloads: list[object] = []
        self.vectors: list[np.ndarray] = []
        self.failures: list[tuple[int, Exception]] = []
        self.flushes = 0
        self.ahead: list[int] = []  # at each write: items taken from the reader, not finished

    def finished(self) -> int:
        return len(self.keys) + len(self.failures)

    def write(self, items: list[Item], vectors: np.ndarray) -> None:
        assert len(items) == len(vectors)
        if self.reader is not None:
            self.ahead.append(self.reader.consumed - self.finished())
        if self.fail_after is not None and len(self.keys) >= self.fail_after:
            raise RuntimeError("storage is down")
        self.keys += [item.key for item in items]
        self.payloads += [item.payload for item in items]
        self.vectors += list(vectors)

    def fail(self, item: Item, error: Exception) -> None:
        self.failures.append((item.key, error))

    def flush(self) -> None:
        self.flushes += 1


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory, photos) -> list[Path]:
    """Eight distinct photos, small, as JPEG and PNG files."""
    root = tmp_path_factory.mktemp("small")
    paths = []
    for i, name in enumerate(NAMES):
        image = photos[name].copy()
        image.thumbnail((160, 160))
        path = root / f"{i}-{name}.{'jpg' if i % 2 else 'png'}"
        image.save(path)
        paths.append(path)
    return paths


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def reference_vectors(embedder, paths: list[Path]) -> dict[str, np.ndarray]:
    images = [load_image(p, draft_size=embedder.input_size) for p in paths]
    return {p.name: v for p, v in zip(paths, embedder.embed_images(images), strict=True)}


# --------------------------------------------------------------------------- the pipeline
def test_broken_file_fails_alone_and_rest_of_batch_is_embedded(
    tmp_path: Path, small_files, lite0_embedder
):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(small_files[1].read_bytes()[:300])  # truncated JPEG
    paths = [*small_files[:2], broken, *small_files[2:4]]
    reader = FileReader(paths)
    writer = RecordingWriter()
    steps: list[int] = []
    report = run_pipeline(reader, lite0_embedder, writer, batch_size=8, progress=steps.append)

    assert report.embedded == 4 and report.failed == 1
    assert writer.keys == [0, 1, 3, 4]  # the broken one's batch-mates are all there
    assert [(key, type(exc)) for key, exc in writer.failures] == [(2, ImageLoadError)]
    assert writer.failures[0][1].reason == "corrupt"
    assert writer.flushes == 1 and sum(steps) == 5
    assert reader.drafts == {lite0_embedder.input_size}
    refs = reference_vectors(lite0_embedder, [paths[i] for i in writer.keys])
    for payload, vector in zip(writer.payloads, writer.vectors, strict=True):
        assert cosine(vector, refs[payload["name"]]) > 0.999


def test_unexpected_load_error_fails_that_item_only(small_files, lite0_embedder, caplog):
    reader = FileReader(small_files[:6])
    reader.fail_with[3] = KeyError("a bug in a reader")
    reader.fail_with[4] = OSError("disk went away")
    writer = RecordingWriter()
    with caplog.at_level(logging.WARNING, logger="lookalike.core.pipeline"):
        report = run_pipeline(reader, lite0_embedder, writer, batch_size=4)

    assert (report.embedded, report.failed) == (4, 2)
    assert writer.keys == [0, 1, 2, 5]
    assert [(key, type(exc).__name__) for key, exc in writer.failures] == [
        (3, "KeyError"),
        (4, "OSError"),
    ]
    assert "KeyError" in caplog.text and "OSError" in caplog.text
    assert writer.flushes == 1


def test_rows_are_written_in_item_order(small_files, lite0_embedder):
    # Earlier items load slowest, so loads finish in reverse order.
    n = len(small_files)
    reader = FileReader(list(small_files), delays={k: 0.03 * (n - k) for k in range(n)})
    writer = RecordingWriter()
    run_pipeline(reader, lite0_embedder, writer, batch_size=3, load_workers=n, prefetch=n)

    assert writer.keys == list(range(n))
    refs = reference_vectors(lite0_embedder, small_files)
    for key, vector in zip(writer.keys, writer.vectors, strict=True):
        matches = {name: cosine(vector, ref) for name, ref in refs.items()}
        assert max(matches, key=matches.get) == small_files[key].name
        assert matches[small_files[key].name] > 0.999


def test_prefetch_is_bounded_and_items_are_read_lazily(small_files, lite0_embedder):
    paths = [small_files[i % len(small_files)] for i in range(60)]
    reader = FileReader(paths)
    for key in range(20, 31):  # a run of failures longer than a batch
        reader.fail_with[key] = ImageLoadError("corrupt", f"item {key}")
    writer = RecordingWriter(reader)
    steps: list[int] = []
    batch_size, prefetch = 4, 10
    report = run_pipeline(
        reader,
        lite0_embedder,
        writer,
        batch_size=batch_size,
        load_workers=4,
        prefetch=prefetch,
        progress=steps.append,
    )

    assert (report.embedded, report.failed) == (49, 11)
    assert writer.keys == [k for k in range(60) if not 20 <= k <= 30]
    # never more than `prefetch` items taken from the reader and not yet written or failed...
    assert max(writer.ahead) <= prefetch
    # ...but it does read ahead of the batch being embedded
    assert max(writer.ahead) > batch_size
    assert sum(steps) == 60 and max(steps) <= batch_size + 11
    assert len(steps) >= 60 // (batch_size + 11)
    assert writer.flushes == 1


def test_writer_error_propagates_and_stops_reading(small_files, lite0_embedder):
    def endless() -> Iterator[Path]:
        while True:
            yield from small_files

    class EndlessReader(FileReader):
        def items(self) -> Iterator[Item]:
            try:
                for key, path in enumerate(endless()):
                    self.consumed += 1
                    yield Item(key, path)
            finally:
                self.closed = True

    reader = EndlessReader([])
    writer = RecordingWriter(reader, fail_after=8)
    with pytest.raises(RuntimeError, match="storage is down"):
        run_pipeline(reader, lite0_embedder, writer, batch_size=4, prefetch=8)
    assert writer.keys == list(range(8))
    assert reader.consumed <= 8 + 8 + 4  # an endless reader is never materialised
    assert reader.closed
    assert writer.flushes == 0  # an aborted run is not flushed as if complete


def test_no_items_still_flushes(lite0_embedder):
    reader = FileReader([])
    writer = RecordingWriter()
    steps: list[int] = []
    report = run_pipeline(reader, lite0_embedder, writer, progress=steps.append)
    assert report == PipelineReport() and writer.flushes == 1 and sum(steps) == 0


def test_only_failures_report_progress_and_flush(tmp_path: Path, lite0_embedder):
    paths = []
    for i in range(5):
        (tmp_path / f"{i}.png").write_text("not a picture")
        paths.append(tmp_path / f"{i}.png")
    writer = RecordingWriter()
    steps: list[int] = []
    report = run_pipeline(FileReader(paths), lite0_embedder, writer, progress=steps.append)
    assert (report.embedded, report.failed) == (0, 5)
    assert sum(steps) == 5 and writer.flushes == 1 and writer.keys == []


# --------------------------------------------------------------------------- query vectors
class RecordingEmbedder:
    """A real embedder underneath; records the size of every image it is given."""

    def __init__(self, embedder) -> None:
        self.inner = embedder
        self.spec, self.dim, self.input_size = embedder.spec, embedder.dim, embedder.input_size
        self.device, self.batch_size = embedder.device, embedder.batch_size
        self.supports_text = embedder.supports_text
        self.sizes: list[tuple[int, int]] = []

    def embed_images(self, images):
        self.sizes += [image.size for image in images]
        return self.inner.embed_images(images)

    def embed_text(self, texts):
        return self.inner.embed_text(texts)


@pytest.fixture(scope="module")
def large_jpeg(photos) -> bytes:
    """A 2000x1500 JPEG with detail everywhere: a mosaic of photos at about native size."""
    mosaic = Image.new("RGB", (2000, 1500))
    names = ("astronaut", "coffee", "rocket", "chelsea", "camera", "coins", "moon", "page")
    for i, name in enumerate(names):
        tile = photos[name].resize((500, 750))
        mosaic.paste(tile, ((i % 4) * 500, (i // 4) * 750))
    buffer = io.BytesIO()
    mosaic.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_small_percent_box_keeps_enough_pixels(large_jpeg, lite0_embedder):
    embedder = RecordingEmbedder(lite0_embedder)
    box = (40.0, 30.0, 20.0, 20.0)  # 400x300 pixels of the full image
    vector = image_query_vector(embedder, large_jpeg, box=box, box_unit="%")
    assert min(embedder.sizes[-1]) >= lite0_embedder.input_size

    full_crop = crop(load_image(large_jpeg), box, "%")
    expected = lite0_embedder.embed_images([full_crop])[0]
    assert cosine(vector, expected) > 0.999


def test_query_still_drafts_when_it_cannot_hurt(large_jpeg, lite0_embedder):
    embedder = RecordingEmbedder(lite0_embedder)
    size = lite0_embedder.input_size
    image_query_vector(embedder, large_jpeg)
    assert size <= min(embedder.sizes[-1]) < 1500  # no box: drafted
    image_query_vector(embedder, large_jpeg, box=(0, 0, 80, 90), box_unit="%")
    assert size <= min(embedder.sizes[-1]) and embedder.sizes[-1][0] < 1600  # big box: drafted
    image_query_vector(embedder, large_jpeg, box=(100, 200, 300, 150), box_unit="px")
    assert embedder.sizes[-1] == (300, 150)  # pixel box: full resolution, coordinates line up


def test_percent_box_on_exif_rotated_jpeg(photos, lite0_embedder):
    # Stored 2400x1200, displayed 1200x2400 (EXIF orientation 6): the draft request must be
    # turned with the image, or the narrow box below is cut from a half-size decode.
    stored = Image.new("RGB", (2400, 1200))
    for i, name in enumerate(("astronaut", "coffee", "rocket", "chelsea")):
        stored.paste(photos[name].resize((600, 1200)), (i * 600, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif)
    embedder = RecordingEmbedder(lite0_embedder)
    image_query_vector(embedder, buffer.getvalue(), box=(10, 10, 20, 50), box_unit="%")
    assert min(embedder.sizes[-1]) >= lite0_embedder.input_size


def test_decode_image_with_width_and_height_request(large_jpeg):
    assert decode_image(large_jpeg, draft_size=(600, 300)).size == (1000, 750)  # 1/2 scale
    assert decode_image(large_jpeg, draft_size=(250, 1000)).size == (2000, 1500)  # h needs all
    assert decode_image(large_jpeg, draft_size=(200, 150)).size == (250, 188)  # 1/8
    assert decode_image(large_jpeg, draft_size=224).size == (500, 375)  # int: short side


def test_query_draft_size():
    assert query_draft_size(224) == 224
    assert query_draft_size(224, (1, 2, 3, 4), "px") is None
    assert query_draft_size(224, (0, 0, 50, 25), "%") == (450, 900)
    assert query_draft_size(224, (90, 0, 20, 100), "%") == (2250, 225)  # only 10 % is inside
    assert query_draft_size(224, (120, 0, 10, 10), "%") is None  # outside: crop says so


def test_searcher_uses_the_query_functions(tmp_path: Path, large_jpeg, clip_random_embedder):
    collection = VectorStore(tmp_path).open(
        "q", clip_random_embedder.spec, clip_random_embedder.dim
    )
    searcher = Searcher(collection, clip_random_embedder)
    box = (40.0, 30.0, 20.0, 20.0)
    assert np.allclose(
        searcher.image_vector(large_jpeg, box, "%"),
        image_query_vector(clip_random_embedder, large_jpeg, box=box, box_unit="%"),
        atol=1e-5,
    )
    assert np.allclose(
        searcher.text_vector(" a dog "), text_query_vector(clip_random_embedder, "a dog")
    )
    with pytest.raises(QueryError):
        text_query_vector(clip_random_embedder, "  ")
