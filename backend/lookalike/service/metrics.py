"""Structured logs (JSON lines, API key redacted) and Prometheus metrics.

Workers run in other processes, maybe on other machines, so what they measure (tasks indexed,
failures, embedding time) is accumulated in Redis and exported by the web process's /metrics
through a collector that reads it at scrape time. The web process's own latencies (searches,
query embeddings) are ordinary in-process histograms.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from lookalike.config import Settings

METRICS_KEY = "lookalike:metrics"
EMBED_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SEARCH_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# ----------------------------------------------------------------------------- logging
class RedactingFilter(logging.Filter):
    """Replaces secrets in every record's message and arguments with '***'."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            for secret in self.secrets:
                message = message.replace(secret, "***")
            record.msg, record.args = message, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: Settings, level: int = logging.INFO) -> None:
    """JSON lines on stderr for every logger (ours, RQ's, gunicorn's), API key redacted."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter([settings.label_studio_api_key]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("rq.worker", "rq.scheduler", "gunicorn.error", "gunicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def gunicorn_logconfig(settings: Settings) -> dict:
    """Gunicorn's own loggers (errors, access) in the same JSON lines, key redacted."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactingFilter, "secrets": [settings.label_studio_api_key]}},
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "json": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["redact"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["json"], "level": "INFO"},
        "loggers": {
            "gunicorn.error": {"handlers": ["json"], "level": "INFO", "propagate": False},
            "gunicorn.access": {"handlers": ["json"], "level": "INFO", "propagate": False},
        },
    }


# ----------------------------------------------------------------------------- worker side
def record_indexing(
    redis_client: redis.Redis, indexed: int, failed: int, embed_seconds: float | None
) -> None:
    """Accumulate a worker's counts and one embedding-batch duration in Redis."""
    pipe = redis_client.pipeline(transaction=False)
    if indexed:
        pipe.hincrby(METRICS_KEY, "indexed_total", indexed)
    if failed:
        pipe.hincrby(METRICS_KEY, "failed_total", failed)
    if embed_seconds is not None:
        for bound in EMBED_BUCKETS:
            if embed_seconds <= bound:
                pipe.hincrby(METRICS_KEY, f"embed_bucket:{bound}", 1)
        pipe.hincrby(METRICS_KEY, "embed_count", 1)
        pipe.hincrbyfloat(METRICS_KEY, "embed_sum", embed_seconds)
    pipe.execute()


# ----------------------------------------------------------------------------- web side
class RedisCollector:
    """Exports what workers accumulated in Redis, plus per-project index sizes and queue depth."""

    def __init__(self, redis_client: redis.Redis, queue_name: str,
                 state: Callable[[int], Any] | None = None) -> None:
        self.redis = redis_client
        self.queue_name = queue_name
        self.state = state  # project -> ProjectState (the runtime's: it knows the engine)

    def collect(self) -> Iterator:
        from rq import Queue

        from lookalike.service.state import ProjectState, known_projects

        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(METRICS_KEY).items()}
        yield CounterMetricFamily(
            "lookalike_tasks_indexed",
            "Tasks embedded and stored by workers",
            value=int(raw.get("indexed_total", 0)),
        )
        yield CounterMetricFamily(
            "lookalike_task_failures",
            "Task indexing attempts that failed",
            value=int(raw.get("failed_total", 0)),
        )
        buckets = [(str(b), float(raw.get(f"embed_bucket:{b}", 0))) for b in EMBED_BUCKETS]
        buckets.append(("+Inf", float(raw.get("embed_count", 0))))
        yield HistogramMetricFamily(
            "lookalike_worker_embed_seconds",
            "Time to embed one batch of task images",
            buckets=buckets,
            sum_value=float(raw.get("embed_sum", 0.0)),
        )
        queue_depth = GaugeMetricFamily("lookalike_queue_depth", "Jobs waiting in the RQ queue")
        queue_depth.add_metric([], Queue(self.queue_name, connection=self.redis).count)
        yield queue_depth
        sizes = GaugeMetricFamily(
            "lookalike_project_tasks",
            "Tasks per project by indexing state",
            labels=["project", "state"],
        )
        for project in known_projects(self.redis):
            project_state = (self.state(project) if self.state is not None
                             else ProjectState(self.redis, project))
            status = project_state.status()
            for state in ("total", "indexed", "pending", "failed"):
                if status[state] is not None:  # None: the vector database is unreachable
                    sizes.add_metric([str(project), state], status[state])
        yield sizes


class WebMetrics:
    """The web process's registry: its own latencies plus the Redis collector."""

    def __init__(self, redis_client: redis.Redis, queue_name: str,
                 state: Callable[[int], Any] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.search_seconds = Histogram(
            "lookalike_search_seconds",
            "Time to answer a similarity search, end to end",
            ["source"],
            buckets=SEARCH_BUCKETS,
            registry=self.registry,
        )
        self.query_embed_seconds = Histogram(
            "lookalike_query_embed_seconds",
            "Time to embed a query (crop, image or text)",
            buckets=SEARCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(RedisCollector(redis_client, queue_name, state))

    def observe_search(self, source: str, seconds: float) -> None:
        self.search_seconds.labels(source=source).observe(seconds)
