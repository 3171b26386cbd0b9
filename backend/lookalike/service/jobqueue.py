"""Enqueueing background work: one method per kind of job, with its timeout and retry policy.

Jobs are named by their dotted path (RQ imports them in the worker), so the web process can
enqueue without importing the worker-side code, and the modules that run jobs can enqueue
follow-ups (a sync enqueues index batches) without an import cycle.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import redis
from rq import Queue, Retry
from rq.job import Job

from lookalike.config import Settings
from lookalike.timeouts import (
    INDEX_BATCH_RETRY_DELAYS,
    INDEX_BATCH_TIMEOUT,
    LABEL_STUDIO_OUTAGE_RETRY_DELAYS,
    SYNC_TIMEOUT,
)

_JOBS = "lookalike.service.jobs"
SYNC = f"{_JOBS}.sync_project"
REINDEX = f"{_JOBS}.reindex_project"
INDEX = f"{_JOBS}.index_tasks"
REMOVE = f"{_JOBS}.remove_tasks"
PRIORITIZE = f"{_JOBS}.auto_prioritize"
DROP = f"{_JOBS}.drop_project"
CLEAN = f"{_JOBS}.clean_annotation"
DUPLICATES = f"{_JOBS}.find_duplicates"
COVERAGE = f"{_JOBS}.apply_coverage"


def _outage_retry() -> Retry:
    """For jobs that fail whole while Label Studio or the vector database is away (about an
    hour): they are tried again until it is back."""
    return Retry(
        max=len(LABEL_STUDIO_OUTAGE_RETRY_DELAYS), interval=list(LABEL_STUDIO_OUTAGE_RETRY_DELAYS)
    )


def _batch_retry() -> Retry:
    """RQ retries a batch that failed as a whole (Redis, the model); per-task failures are
    recorded and retried by the job itself."""
    return Retry(max=len(INDEX_BATCH_RETRY_DELAYS), interval=list(INDEX_BATCH_RETRY_DELAYS))


class JobQueue:
    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.queue = Queue(settings.queue_name, connection=connection)
        self.batch_size = settings.index_batch_size

    @property
    def count(self) -> int:
        return self.queue.count

    @staticmethod
    def _job_id(project: int) -> str:
        # The project in the id lets index-status count a project's waiting jobs from the
        # queue's list alone (RQ keeps the id across retries).
        return f"{_project_prefix(project)}{uuid.uuid4().hex}"

    def queued_for(self, project: int) -> int:
        """Jobs of `project` waiting in the queue (not running, not scheduled for later)."""
        prefix = _project_prefix(project)
        return sum(1 for job_id in self.queue.get_job_ids() if job_id.startswith(prefix))

    def sync(self, project: int, retry_failed: bool = False) -> Job:
        """List the project's tasks, index the missing, drop the deleted (retry_failed: a
        person asked, so tasks that failed for good are tried again)."""
        return self.queue.enqueue(
            SYNC, project, retry_failed, job_timeout=SYNC_TIMEOUT, retry=_outage_retry(),
            job_id=self._job_id(project),
        )

    def reindex(self, project: int) -> Job:
        return self.queue.enqueue(
            REINDEX, project, job_timeout=SYNC_TIMEOUT, job_id=self._job_id(project)
        )

    def index(self, project: int, tasks: list[dict[str, Any]]) -> int:
        """Queue `tasks` in batches, in one round trip; returns the number of jobs."""
        batches = [
            tasks[start : start + self.batch_size]
            for start in range(0, len(tasks), self.batch_size)
        ]
        if not batches:
            return 0
        jobs = [
            Queue.prepare_data(
                INDEX,
                (project, batch, 1),
                timeout=INDEX_BATCH_TIMEOUT,
                retry=_batch_retry(),
                description=f"index {len(batch)} tasks of project {project}",
                job_id=self._job_id(project),
            )
            for batch in batches
        ]
        with self.queue.connection.pipeline() as pipe:
            self.queue.enqueue_many(jobs, pipeline=pipe)
            pipe.execute()
        return len(batches)

    def retry_index(
        self, project: int, tasks: list[dict[str, Any]], attempt: int, delay: float
    ) -> Job:
        """Tasks whose download failed, tried again after `delay` seconds."""
        return self.queue.enqueue_in(
            timedelta(seconds=delay),
            INDEX,
            project,
            tasks,
            attempt,
            job_timeout=INDEX_BATCH_TIMEOUT,
            description=f"retry {len(tasks)} tasks of project {project} (attempt {attempt})",
            job_id=self._job_id(project),
        )

    def remove(self, project: int, task_ids: list[int]) -> Job:
        # Retried like a batch: the vector database may be down for a while.
        return self.queue.enqueue(
            REMOVE, project, task_ids, retry=_batch_retry(), job_id=self._job_id(project)
        )

    def auto_prioritize(self, project: int, task_id: int, annotation: dict[str, Any]) -> Job:
        return self.queue.enqueue(
            PRIORITIZE, project, task_id, annotation, job_id=self._job_id(project)
        )

    def drop(self, project: int) -> Job:
        # Dropping is idempotent: tried again if the vector database is away, not left behind.
        return self.queue.enqueue(
            DROP, project, retry=_outage_retry(), job_id=self._job_id(project)
        )

    def duplicates(self, project: int, threshold: float) -> Job:
        """Group the project's near-duplicates at `threshold` (and refresh its tab)."""
        return self.queue.enqueue(
            DUPLICATES, project, threshold, job_timeout=SYNC_TIMEOUT,
            job_id=self._job_id(project),
        )

    def coverage(self, project: int) -> Job:
        """Cluster the project (or assign new tasks) and write coverage predictions."""
        return self.queue.enqueue(
            COVERAGE, project, job_timeout=SYNC_TIMEOUT, retry=_batch_retry(),
            job_id=self._job_id(project),
        )

    def clean_annotation(self, project: int, annotation_id: int) -> Job:
        """Take Lookalike's query regions out of a submitted annotation."""
        return self.queue.enqueue(
            CLEAN, project, annotation_id, retry=Retry(max=3, interval=[5, 30, 120]),
            job_id=self._job_id(project),
        )


def _project_prefix(project: int) -> str:
    return f"lookalike-p{int(project)}-"
