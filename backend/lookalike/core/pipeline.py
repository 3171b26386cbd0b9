"""The one indexing pipeline: a reader's items, loaded in threads, embedded in batches, written.

Indexing a folder (the CLI) and indexing Label Studio tasks (the worker) differ only in where
items come from, how an image is fetched and where vectors go, so each supplies a `Reader` and a
`Writer` and both run `run_pipeline` (modelled on clip-retrieval's `clip_inference/runner.py`).
Loading (I/O, GIL-free decoding, and the model's preprocessing into an input tensor) runs ahead
of inference in a thread pool, within a bounded window so memory stays flat over millions of
items: only the small input tensors wait, never a full-resolution image. One item that cannot
be loaded fails alone; a model or storage error fails the run.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from lookalike.core.embedding import Embedder
from lookalike.core.images import ImageLoadError

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 3  # default window: the batch being embedded and two more loading


@dataclass(frozen=True)
class Item:
    key: int  # the id the vector is stored under
    source: Any  # whatever the reader's load() needs (a Path, a task dict, ...)
    payload: Any = None  # handed back to the writer with the vector (CLI: file fingerprint)


class Reader(Protocol):
    def items(self) -> Iterable[Item]:
        """The items to index; consumed lazily, once."""
        ...

    def load(self, item: Item, draft_size: int | None) -> Image.Image:
        """Fetch and decode one item (called from several threads at once); raises on failure."""
        ...


class Writer(Protocol):
    def write(self, items: list[Item], vectors: np.ndarray) -> None:
        """One batch; row i of `vectors` is the vector of `items[i]`."""
        ...

    def fail(self, item: Item, error: Exception) -> None:
        """That item alone failed to load."""
        ...

    def flush(self) -> None:
        """The run is over (called once, after the last write or fail)."""
        ...


@dataclass
class PipelineReport:
    embedded: int = 0
    failed: int = 0
    embed_seconds: float = 0.0  # wall time spent in the embedder, over all batches


def run_pipeline(
    reader: Reader,
    embedder: Embedder,
    writer: Writer,
    *,
    batch_size: int | None = None,
    load_workers: int | None = None,
    prefetch: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> PipelineReport:
    """Load, embed and write every item of `reader`, in order.

    At most `prefetch` items (at least one batch) are loaded or loading but not yet embedded.
    Any exception from `reader.load` or the embedder's `prepare` goes to `writer.fail` for that
    item; exceptions from embedding or `writer.write` propagate, and then `writer.flush` is not
    called. `progress` gets the number of items finished (embedded or failed) since its last
    call.
    """
    batch_size = max(1, batch_size or embedder.batch_size)
    workers = max(1, load_workers or embedder.load_workers)
    window = max(batch_size, prefetch or max(PREFETCH_BATCHES * batch_size, workers))
    draft_size = embedder.input_size
    report = PipelineReport()
    items: Iterator[Item] = iter(reader.items())
    pending: deque[tuple[Item, Future[torch.Tensor]]] = deque()
    batch_items: list[Item] = []
    batch_inputs: list[torch.Tensor] = []
    failed_unreported = 0  # failures not yet counted in a progress call

    def finished(count: int) -> None:
        nonlocal failed_unreported
        if progress and count:
            progress(count)
        failed_unreported = 0

    def embed_batch() -> None:
        started = time.perf_counter()
        vectors = embedder.embed_prepared(batch_inputs)
        report.embed_seconds += time.perf_counter() - started
        writer.write(list(batch_items), vectors)
        report.embedded += len(batch_items)
        finished(len(batch_items) + failed_unreported)
        batch_items.clear()
        batch_inputs.clear()

    def load(item: Item) -> torch.Tensor:
        return embedder.prepare(reader.load(item, draft_size))

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lookalike-load")
    try:
        exhausted = False
        while True:
            # Back-pressure: nothing more is taken from the reader while the window is full.
            while not exhausted and len(pending) + len(batch_items) < window:
                item = next(items, None)
                if item is None:
                    exhausted = True
                else:
                    pending.append((item, pool.submit(load, item)))
            if not pending:
                break
            item, future = pending.popleft()
            try:
                prepared = future.result()
            except Exception as exc:  # one item's failure, whatever it is
                if not isinstance(exc, ImageLoadError):
                    log.warning(
                        "loading item %s failed unexpectedly: %s: %s",
                        item.key,
                        type(exc).__name__,
                        exc,
                    )
                writer.fail(item, exc)
                report.failed += 1
                failed_unreported += 1
                if failed_unreported >= batch_size:  # a long run of failures: still show it
                    finished(failed_unreported)
                continue
            batch_items.append(item)
            batch_inputs.append(prepared)
            if len(batch_items) >= batch_size:
                embed_batch()
        if batch_items:
            embed_batch()
        finished(failed_unreported)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(items, "close", None)
        if close is not None:
            close()
        raise
    pool.shutdown(wait=True)
    writer.flush()
    return report
