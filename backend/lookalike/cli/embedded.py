"""Embedded-mode commands: index a folder, search it, list collections, write weights.

Heavy imports (torch, faiss) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lookalike.config import Settings
from lookalike.errors import BadRequestError

if TYPE_CHECKING:
    from lookalike.core.milvus_store import MilvusStore
    from lookalike.core.store import VectorStore


class CliError(BadRequestError):
    """A user-facing error: printed as one line, exit code 2."""


def _store(settings: Settings) -> VectorStore | MilvusStore:
    """Collection files under LOOKALIKE_DATA_DIR, or Milvus collections (LOOKALIKE_VECTOR_DB)."""
    if settings.vector_db.strip():
        from lookalike.core.milvus_collection import MilvusTarget, lazy_client
        from lookalike.core.milvus_store import MilvusStore

        target = MilvusTarget.parse(settings.vector_db, settings.vector_db_token)
        return MilvusStore(lazy_client(target), target.shown)
    from lookalike.core.store import VectorStore
    from lookalike.core.vector_index import IndexPlan

    return VectorStore(settings.collections_dir, IndexPlan.from_settings(settings))


def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from lookalike.core.embedding import embedder_from_settings
    from lookalike.core.folder_index import index_folder
    from lookalike.core.images import ImageLimits
    for raw in args.paths:
        if not Path(raw).expanduser().exists():
            raise CliError(f"{raw} does not exist")
    embedder = embedder_from_settings(settings)
    store = _store(settings)
    collection = store.open(args.collection, embedder.spec, embedder.dim)
    bar = tqdm(total=0, unit="img", desc="embedding", disable=args.quiet, file=sys.stderr)

    def on_total(total: int) -> None:
        bar.total = total
        bar.refresh()

    try:
        report = index_folder(
            collection,
            embedder,
            args.paths,
            ImageLimits.from_settings(settings),
            progress=bar.update,
            on_total=on_total,
        )
    finally:
        bar.close()
    print(
        f"{report.embedded} embedded, {report.unchanged} unchanged, {report.removed} removed, "
        f"{len(report.failed)} failed; collection {args.collection!r} holds {len(collection)} "
        f"images ({embedder.spec})"
    )
    if report.failed:
        print(f"skipped {len(report.failed)} file(s):", file=sys.stderr)
        for path, reason in report.failed:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0


def _parse_box(raw: str | None) -> tuple[tuple[float, float, float, float] | None, str]:
    if raw is None:
        return None, "px"
    unit = "%" if "%" in raw else "px"
    try:
        values = tuple(float(v) for v in raw.replace("%", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise CliError(f"--box takes X,Y,W,H (e.g. 10,20,200,150 or 10,20,50,50%), not {raw!r}")
    return values, unit  # type: ignore[return-value]


def cmd_search(args: argparse.Namespace, settings: Settings) -> int:
    from lookalike.core.embedding import embedder_from_settings
    from lookalike.core.images import ImageLimits
    from lookalike.core.query import Searcher, SearchOptions
    store = _store(settings)
    collection = store.open(args.collection)
    searcher = Searcher(
        collection, lambda: embedder_from_settings(settings), ImageLimits.from_settings(settings)
    )
    options = SearchOptions(k=args.k, min_score=args.min_score)
    box, unit = _parse_box(args.box)
    if box is not None and not (args.image or args.url):
        raise CliError("--box goes with --image or --url")
    if args.image or args.url:
        source = args.url or str(Path(args.image).expanduser())
        hits = searcher.by_image(source, options, box=box, box_unit=unit)
    elif args.text is not None:
        hits = searcher.by_text(args.text, options)
    else:
        wanted = str(Path(args.like).expanduser().resolve())
        matches = [i for i, p in collection.payloads.items() if p.get("path") == wanted]
        if not matches:
            raise CliError(f"{args.like} is not in collection {args.collection!r}; index it first")
        hits = searcher.by_id(matches[0], options)
    rows = [
        {
            "rank": rank,
            "id": hit.id,
            "score": round(hit.score, 6),
            "path": collection.payloads.get(hit.id, {}).get("path"),
        }
        for rank, hit in enumerate(hits, 1)
    ]
    if args.json:
        print(
            json.dumps(
                {"collection": args.collection, "model": collection.model, "results": rows},
                indent=2,
            )
        )
    else:
        for row in rows:
            print(f"{row['rank']:>3}  {row['score']:.4f}  {row['path']}")
        if not rows:
            print("no results", file=sys.stderr)
    return 0


def cmd_collections(args: argparse.Namespace, settings: Settings) -> int:
    store = _store(settings)
    rows = []
    for name in store.names():
        collection = store.open(name)
        rows.append(
            {
                "name": name,
                "model": collection.model,
                "dim": collection.dim,
                "count": len(collection),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no collections under {store.root}")
    for row in rows if not args.json else []:
        print(f"{row['name']}: {row['count']} vectors, {row['model']} ({row['dim']}-d)")
    return 0


def cmd_weights(args: argparse.Namespace, settings: Settings) -> int:
    from lookalike.core.weights import EFFICIENTNET_LITE0_SPEC, convert_efficientnet_lite0

    path = convert_efficientnet_lite0(Path(args.output).expanduser())
    print(
        f"wrote {path}; use it with LOOKALIKE_MODEL={EFFICIENTNET_LITE0_SPEC} "
        f"LOOKALIKE_WEIGHTS={path}"
    )
    return 0
