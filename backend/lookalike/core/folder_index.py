"""Indexing a folder of image files into a collection (the CLI's embedded mode).

Each file gets a stable integer id, kept with its path, size and mtime as the vector's payload;
a rerun embeds only files that are new or changed and removes vectors of files that are gone.
The embedding itself is `lookalike.core.pipeline`: a `FolderReader` and a `CollectionWriter`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.core.embedding import Embedder
from lookalike.core.images import DEFAULT_LIMITS, IMAGE_SUFFIXES, ImageLimits, load_image
from lookalike.core.pipeline import Item, run_pipeline
from lookalike.core.store import Collection

SAVE_EVERY = 2048  # vectors between checkpoints, so an interrupted run keeps its progress


@dataclass
class FolderIndexReport:
    scanned: int = 0
    embedded: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def iter_image_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """Image files under each path (recursively, sorted), or the path itself if a file."""
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                        yield Path(root, name).resolve()
        elif path.exists():
            yield path.resolve()  # named explicitly: try it whatever its suffix
        else:
            raise FileNotFoundError(f"{path} does not exist")


def _fingerprint(path: Path) -> dict[str, int | str]:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class FolderReader:
    """Pipeline reader: the image files under some paths that are new or changed.

    `scan()` walks the files once (the total is needed before embedding starts, and files that
    are gone are known only after the walk); `items()` then yields one item per file to embed,
    keyed by the file's existing id or a new one, with its fingerprint as the payload.
    """

    def __init__(
        self,
        collection: Collection,
        paths: Iterable[Path | str],
        limits: ImageLimits,
        report: FolderIndexReport,
    ) -> None:
        self.collection, self.limits, self.report = collection, limits, report
        self.paths = list(paths)  # walked once for files and again for the prune roots
        self.by_path: dict[str, tuple[int, dict]] = {
            payload["path"]: (item_id, payload)
            for item_id, payload in collection.payloads.items()
            if isinstance(payload, dict) and "path" in payload
        }
        self.seen: set[str] = set()
        self.todo: list[Item] = []

    def scan(self) -> int:
        """Walk the files; returns how many need embedding."""
        collection, report = self.collection, self.report
        # New ids go above every id in use, including any vector stored without a payload.
        next_id = max(int(collection.ids().max(initial=-1)), max(collection.payloads, default=-1))
        next_id += 1
        for path in iter_image_files(self.paths):
            if str(path) in self.seen:  # reached twice, e.g. `index photos photos/2024`
                continue
            self.seen.add(str(path))
            report.scanned += 1
            try:
                fingerprint = _fingerprint(path)
            except OSError as exc:
                report.failed.append((str(path), f"unreadable: {exc}"))
                continue
            known = self.by_path.get(fingerprint["path"])
            if known and known[1] == fingerprint and known[0] in collection:
                report.unchanged += 1
                continue
            if known:
                item_id = known[0]
            else:
                item_id, next_id = next_id, next_id + 1
            self.todo.append(Item(item_id, path, fingerprint))
        return len(self.todo)

    def gone(self) -> list[int]:
        """Ids of indexed files under the scanned paths that no longer exist (after `scan`)."""
        # Only files under the folders indexed now count as gone, not other folders' files.
        roots = [str(Path(p).expanduser().resolve()) for p in self.paths]
        return [
            item_id
            for path_str, (item_id, _) in self.by_path.items()
            if path_str not in self.seen and any(_is_under(path_str, root) for root in roots)
        ]

    def items(self) -> Iterator[Item]:
        todo, self.todo = self.todo, []
        yield from todo

    def load(self, item: Item, draft_size: int | None) -> Image.Image:
        return load_image(item.source, self.limits, draft_size=draft_size)


class CollectionWriter:
    """Pipeline writer: vectors into a collection, saved every SAVE_EVERY vectors and at the end."""

    def __init__(self, collection: Collection, report: FolderIndexReport) -> None:
        self.collection, self.report = collection, report
        self.since_save = 0

    def write(self, items: list[Item], vectors: np.ndarray) -> None:
        self.collection.upsert(
            [item.key for item in items], vectors, [item.payload for item in items]
        )
        self.report.embedded += len(items)
        self.since_save += len(items)
        if self.since_save >= SAVE_EVERY:
            self.flush()

    def fail(self, item: Item, error: Exception) -> None:
        self.report.failed.append((str(item.source), str(error)))
        self.collection.remove([item.key])  # a changed file that broke: drop its stale vector

    def flush(self) -> None:
        # Past the exact limit (or after 4x growth) train the compressed index before saving.
        if self.collection.needs_rebuild():
            self.collection.rebuild()
        self.collection.save()
        self.since_save = 0


def index_folder(
    collection: Collection,
    embedder: Embedder,
    paths: Iterable[Path | str],
    limits: ImageLimits = DEFAULT_LIMITS,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    prune: bool = True,
) -> FolderIndexReport:
    """Embed new or changed image files under `paths` into `collection` and save it."""
    report = FolderIndexReport()
    reader = FolderReader(collection, paths, limits, report)
    total = reader.scan()
    if prune:
        report.removed = collection.remove(reader.gone())
    if on_total:
        on_total(total)
    run_pipeline(reader, embedder, CollectionWriter(collection, report), progress=progress)
    return report


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
