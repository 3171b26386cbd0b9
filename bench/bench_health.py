"""Protocol responsiveness under search load: /health while many image queries run at once.

Starts a real Redis and `lookalike serve` (open_clip ViT-B-32 with random weights: the forward
pass costs the same as with real ones), seeds a 10,000-task project, then fires N parallel
image-upload searches (each embeds a photo in the web process) for a while and probes /health,
/setup-like cheap calls meanwhile. Label Studio waits 1 s for /health.

    .venv/bin/python bench/bench_health.py [--clients 20] [--seconds 30] [--max-searches 8]

Prints a table and writes bench/results/health.json.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis
import requests
from PIL import Image
from skimage import data as skdata

from lookalike.core.embedding import ModelSpec
from lookalike.service.state import ProjectState
from lookalike_dev.devstack import free_port, lookalike_process, redis_server, wait_http

MODEL = "open_clip:ViT-B-32/random"
PROJECT = 1
TASKS = 10_000


def photo_payload() -> str:
    buffer = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buffer, "JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode()


def seed(url: str) -> None:
    state = ProjectState(redis.Redis.from_url(url), PROJECT)
    state.replace_tasks(range(1, TASKS + 1), labeled=[])
    state.meta.claim_model(str(ModelSpec.parse(MODEL)), 512)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((TASKS, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for start in range(0, TASKS, 2000):
        state.put_vectors(range(start + 1, start + 2001), x[start : start + 2000])


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-searches", type=int, default=8,
                        help="LOOKALIKE_MAX_SEARCHES of the server (64: no admission limit)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/health.json")
    args = parser.parse_args()
    payload = {"image": photo_payload(), "k": 20}
    with tempfile.TemporaryDirectory() as tmp, redis_server(tmp) as redis_url:
        seed(redis_url)
        port = free_port()
        env = {"REDIS_URL": redis_url, "LOOKALIKE_MODEL": MODEL,
               "LOOKALIKE_DATA_DIR": str(Path(tmp) / "data"), "LABEL_STUDIO_API_KEY": "unused",
               "LOOKALIKE_MAX_SEARCHES": str(args.max_searches)}
        log = Path(tmp) / "serve.log"
        with lookalike_process(["serve", "--host", "127.0.0.1", "--port", str(port)], env,
                               log) as proc:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health", 180, proc=proc, log_path=log)
            first = requests.post(f"{base}/api/projects/{PROJECT}/similar", json=payload,
                                  timeout=120)
            first.raise_for_status()  # also builds the project's index
            stop = time.monotonic() + args.seconds
            searches: list[float] = []
            statuses: dict[int, int] = {}
            health: list[float] = []
            lock = threading.Lock()

            def client() -> None:
                session = requests.Session()
                while time.monotonic() < stop:
                    start = time.perf_counter()
                    reply = session.post(f"{base}/api/projects/{PROJECT}/similar",
                                         json=payload, timeout=120)
                    took = time.perf_counter() - start
                    with lock:
                        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
                        if reply.status_code == 200:
                            searches.append(took)
                    if reply.status_code == 503:
                        time.sleep(float(reply.headers.get("Retry-After", 1)))

            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            time.sleep(2)  # let the load build up
            while time.monotonic() < stop:
                start = time.perf_counter()
                requests.get(f"{base}/health", timeout=30).raise_for_status()
                health.append(time.perf_counter() - start)
                time.sleep(0.5)
            for thread in threads:
                thread.join()
    row = {
        "max_searches": args.max_searches,
        "clients": args.clients,
        "seconds": args.seconds,
        "searches_ok": statuses.get(200, 0),
        "searches_busy_503": statuses.get(503, 0),
        "other_statuses": {k: v for k, v in statuses.items() if k not in (200, 503)},
        "search_p50_s": pct(searches, 50),
        "search_p99_s": pct(searches, 99),
        "health_probes": len(health),
        "health_p50_s": pct(health, 50),
        "health_max_s": max(health) if health else float("nan"),
        "health_over_1s": sum(1 for h in health if h > 1.0),
        "health_mean_s": statistics.fmean(health) if health else float("nan"),
    }
    for key, value in row.items():
        print(f"{key:20} {value:.3f}" if isinstance(value, float) else f"{key:20} {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
