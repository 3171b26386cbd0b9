"""The RQ worker `lookalike worker` runs: jobs in this process (the model is loaded once), with
heartbeats while a job runs, so a worker killed mid-batch is noticed in about a minute and its
job retried by another worker; and a worker that rides out a Redis restart."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time

import redis
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.worker import WorkerStatus

from lookalike.timeouts import (
    REDIS_RECONNECT_DELAYS,
    WORKER_HEARTBEAT_SECONDS,
    WORKER_HEARTBEAT_TTL,
    WORKER_MAINTENANCE_SECONDS,
)

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1  # prctl(2)


class HeartbeatWorker(SimpleWorker):
    """RQ's SimpleWorker registers a running job for its whole timeout (30 min for a batch), so
    a dead worker's job looks alive that long. Here the registration is short and renewed by a
    thread while the job runs (job timeouts are still enforced by RQ)."""

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return WORKER_HEARTBEAT_TTL

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(job, execution, done), name="heartbeat", daemon=True
        )
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join(timeout=5)
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Execution, done: threading.Event) -> None:
        while not done.wait(WORKER_HEARTBEAT_SECONDS):
            try:
                with self.connection.pipeline() as pipe:
                    self.heartbeat(WORKER_HEARTBEAT_TTL, pipeline=pipe)
                    execution.heartbeat(job.started_job_registry, WORKER_HEARTBEAT_TTL, pipe)
                    pipe.execute()
            except redis.RedisError as exc:  # Redis away: the job goes on, beats resume
                log.warning("heartbeat of job %s failed: %s", job.id, exc)


def _die_with_parent() -> None:
    """In a child this process forks (RQ's scheduler): Linux sends it SIGTERM when the worker
    dies, even by SIGKILL, instead of leaving it running as an orphan that holds the
    scheduler lock. RQ forks the scheduler from the worker's main thread, which lives as long
    as the worker (Linux signals when the forking thread exits)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_worker(
    queue_name: str, connection: redis.Redis, burst: bool = False, scheduler: bool = True
) -> int:
    """Work until stopped; when Redis goes away, wait and start again (nothing needs a restart
    by hand). Jobs that were running are found abandoned and retried after Redis is back."""
    if sys.platform.startswith("linux"):
        os.register_at_fork(after_in_child=_die_with_parent)
    attempt = 0
    while True:
        try:
            worker = HeartbeatWorker(
                [Queue(queue_name, connection=connection)],
                connection=connection,
                worker_ttl=WORKER_HEARTBEAT_TTL,
                maintenance_interval=WORKER_MAINTENANCE_SECONDS,
            )
            worker.work(burst=burst, with_scheduler=scheduler, logging_level="INFO")
            return 0
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            delay = REDIS_RECONNECT_DELAYS[min(attempt, len(REDIS_RECONNECT_DELAYS) - 1)]
            attempt += 1
            log.warning("Redis unreachable (%s); starting the worker again in %s s", exc, delay)
            time.sleep(delay)
