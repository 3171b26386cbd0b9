"""The search page (`/`) and the JSON endpoints only it uses (projects, thumbnails, jobs)."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("web", __name__)
