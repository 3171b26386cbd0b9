"""The one object per process that holds its wiring: settings, Redis, the job queue, the Label
Studio client and the embedder. The web app, the workers and the CLI build it the same way
(`Runtime(Settings.from_env())`, at the top of the process) and pass it down; nothing below it
reads the environment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import cached_property

import redis

from lookalike.config import Settings
from lookalike.core.embedding import Embedder, embedder_from_settings
from lookalike.core.images import ImageLimits
from lookalike.service.jobqueue import JobQueue
from lookalike.service.ls_client import LabelStudioClient
from lookalike.service.state import ProjectState
from lookalike.service.vector_db import VectorDB

log = logging.getLogger(__name__)


class Runtime:
    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis | None = None,
        label_studio: LabelStudioClient | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.settings = settings
        self.redis = connection or redis.Redis.from_url(settings.redis_url)
        self.jobs = JobQueue(self.redis, settings)
        self.limits = ImageLimits.from_settings(settings)
        # Milvus when LOOKALIKE_VECTOR_DB is set (connected on first use), else None: Redis.
        self.vector_db = VectorDB.from_settings(settings)
        self._label_studio = label_studio
        self._embedder = embedder
        self._embedder_lock = threading.Lock()
        # Hooks for the web process's histograms: seconds per query embedding, and per search
        # by where it came from ("interactive", "api", "page").
        self.observe_query_embed: Callable[[float], None] | None = None
        self.observe_search: Callable[[str, float], None] | None = None

    @property
    def ls(self) -> LabelStudioClient:
        """Built on first use: a process that never calls Label Studio needs no API key."""
        if self._label_studio is None:
            self._label_studio = LabelStudioClient(
                self.settings.label_studio_url, self.settings.label_studio_api_key
            )
        return self._label_studio

    def embedder(self) -> Embedder:
        """The model, loaded once per process (thread-safe)."""
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = embedder_from_settings(self.settings)
            return self._embedder

    def warm_up(self) -> None:
        """Load the model in the background, so the first crop or text query is fast while
        /health and /setup answer at once; a failure is logged and retried on first use."""

        def load() -> None:
            try:
                self.embedder()
            except Exception as exc:  # reported again, to the user, on the first query
                log.error("could not load the model %s: %s", self.settings.model, exc)

        threading.Thread(target=load, name="model-warm-up", daemon=True).start()

    def state(self, project: int) -> ProjectState:
        return ProjectState(self.redis, project, self.vector_db)

    @cached_property
    def task_files_dir(self):
        return self.settings.data_dir / "task-files"
