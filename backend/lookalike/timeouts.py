"""Timeouts and retry policies, named once (seconds unless the name says otherwise)."""

from __future__ import annotations

# Jobs (RQ job_timeout): a sync lists every task of a project; a batch fetches and embeds.
SYNC_TIMEOUT = 3600
INDEX_BATCH_TIMEOUT = 1800
# A task whose index job was queued longer ago than this is presumed lost (its worker died),
# so a resync queues it again.
QUEUED_MARK_MAX_AGE = 3600
# Whole-batch failures (Redis, the model) are retried by RQ after these delays.
INDEX_BATCH_RETRY_DELAYS = (10, 60, 300)
# Per-task download failures are retried by a new job after these delays.
DOWNLOAD_RETRY_DELAYS = (5, 30, 120)
# The first /setup of a project starts a sync; the flag expires so a failed one is retried.
FIRST_SYNC_RETRY_SECONDS = 600
# Writing a query's priorities: lock expiry, and how long a second writer waits for it.
PRIORITY_LOCK_SECONDS = 120
PRIORITY_LOCK_WAIT = 60
# Label Studio API calls.
LABEL_STUDIO_TIMEOUT = 30.0
# Workers: a running job's heartbeat is renewed every WORKER_HEARTBEAT_SECONDS and expires after
# WORKER_HEARTBEAT_TTL; abandoned jobs are looked for every WORKER_MAINTENANCE_SECONDS. So a
# killed worker's job is retried (RQ Retry) by another worker within about 90 s.
WORKER_HEARTBEAT_SECONDS = 15
WORKER_HEARTBEAT_TTL = 60
WORKER_MAINTENANCE_SECONDS = 30
# Redis unreachable: a worker waits this long (doubling up to the cap) and starts again.
REDIS_RECONNECT_DELAYS = (1, 2, 5, 10, 30)
# Label Studio unreachable (or 5xx) during indexing or a sync: retried for about an hour.
LABEL_STUDIO_OUTAGE_RETRY_DELAYS = (15, 30, 60, 120, 300, 600, 600, 600, 600, 600)
