"""The `lookalike` command line: embedded-mode commands and the backend's process commands."""

from lookalike.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
