"""Lookalike: image similarity search and task prioritization for Label Studio."""

__version__ = "0.1.0"
