"""Indexing a folder of image files into a collection (the CLI's embedded mode).

Each file gets a stable integer id, kept with its path, size and mtime as the vector's payload;
a rerun embeds only files that are new or changed and removes vectors of files that are gone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lookalike.embedding import Embedder
from lookalike.images import (
    DEFAULT_LIMITS,
    IMAGE_SUFFIXES,
    ImageLimits,
    ImageLoadError,
    load_image,
)
from lookalike.store import Collection

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
    paths = list(paths)  # walked once for files and again for the prune roots
    report = FolderIndexReport()
    by_path = {
        payload["path"]: (item_id, payload)
        for item_id, payload in collection.payloads.items()
        if isinstance(payload, dict) and "path" in payload
    }
    # New ids go above every id in use, including any vector stored without a payload.
    next_id = max(int(collection.ids().max(initial=-1)), max(collection.payloads, default=-1)) + 1
    todo: list[tuple[int, Path, dict]] = []
    seen: set[str] = set()
    for path in iter_image_files(paths):
        if str(path) in seen:  # reached twice, e.g. `index photos photos/2024`
            continue
        seen.add(str(path))
        report.scanned += 1
        try:
            fingerprint = _fingerprint(path)
        except OSError as exc:
            report.failed.append((str(path), f"unreadable: {exc}"))
            continue
        known = by_path.get(fingerprint["path"])
        if known and known[1] == fingerprint and known[0] in collection:
            report.unchanged += 1
            continue
        if known:
            item_id = known[0]
        else:
            item_id, next_id = next_id, next_id + 1
        todo.append((item_id, path, fingerprint))

    if prune:
        # Only files under the folders indexed now count as gone, not other folders' files.
        roots = [str(Path(p).expanduser().resolve()) for p in paths]
        gone = [
            item_id
            for path_str, (item_id, _) in by_path.items()
            if path_str not in seen and any(_is_under(path_str, root) for root in roots)
        ]
        report.removed = collection.remove(gone)

    if on_total:
        on_total(len(todo))
    batch_size = max(8, embedder.batch_size)
    since_save = 0

    def load(entry: tuple[int, Path, dict]) -> Image.Image | ImageLoadError:
        try:
            return load_image(entry[1], limits, draft_size=embedder.input_size)
        except ImageLoadError as exc:
            return exc

    # Decoding is I/O and C code that releases the GIL: overlap it with the model's work.
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            good_ids, good_images, good_payloads = [], [], []
            for entry, result in zip(chunk, pool.map(load, chunk), strict=True):
                if isinstance(result, ImageLoadError):
                    report.failed.append((str(entry[1]), str(result)))
                    collection.remove([entry[0]])  # a changed file that broke: drop stale vector
                else:
                    good_ids.append(entry[0])
                    good_images.append(result)
                    good_payloads.append(entry[2])
            if good_images:
                collection.upsert(good_ids, embedder.embed_images(good_images), good_payloads)
                report.embedded += len(good_images)
                since_save += len(good_images)
            if progress:
                progress(len(chunk))
            if since_save >= SAVE_EVERY:
                collection.save()
                since_save = 0
    collection.save()
    return report


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
