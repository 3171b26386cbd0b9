"""Scale benchmark: the vector engine at 100k, 1M and (with --n) 20M vectors.

Synthetic 512-d unit vectors drawn around 2,000 cluster centres (seeded, regenerated chunk by
chunk, so 20M vectors never sit in memory at once). Half of the ids are excluded in every search
(the labeled tasks) plus the query's own id, k=20. For each size it reports the index type,
build/train time, bytes per vector (engine RSS growth, snapshot size, and Redis's compact copy),
search p50/p99, recall@20 against an exact search over the same unexcluded vectors, the extra
cost of adding or removing one vector before a search, and the cold start of a new process
(snapshot loaded, first search answered). Then the backend's own path: the vectors written to a
real Redis (started here) as workers write them, a web process's index built from Redis, one
task added or deleted through Redis and the change log before the next search, and a restarted
web process that loads its snapshot.

    .venv/bin/python bench/bench_scale.py                 # 100k and 1M
    .venv/bin/python bench/bench_scale.py --n 20000000    # one size
    .venv/bin/python bench/bench_scale.py --n 20000000 --no-web --codes SQ4 --train-per-list 20
    .venv/bin/python bench/bench_scale.py --engine milvus --n 100000   # Milvus as the engine

Prints a table and writes bench/results/scale.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from lookalike.core.vector_index import IdBitmap, IndexPlan, VectorIndex

DIM = 512
CLUSTERS = 2000
NOISE = 0.8  # cosine to the cluster centre about 0.78: CLIP-like near neighbours
CHUNK = 100_000
K = 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def centres() -> np.ndarray:
    rng = np.random.default_rng(12345)
    c = rng.standard_normal((CLUSTERS, DIM)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def chunk_vectors(start: int, stop: int, seed: int = 1) -> np.ndarray:
    """Vectors start..stop-1 (the same numbers on every call)."""
    rng = np.random.default_rng([seed, start])
    noise = rng.standard_normal((stop - start, DIM)).astype(np.float32) * (NOISE / DIM**0.5)
    x = CENTRES[rng.integers(0, CLUSTERS, stop - start)] + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunks(n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        yield np.arange(start, stop, dtype=np.int64), chunk_vectors(start, stop)


def excluded_mask(n: int) -> IdBitmap:
    """Half of the ids, at random: the labeled tasks."""
    mask = IdBitmap()
    rng = np.random.default_rng(7)
    mask.add(np.flatnonzero(rng.random(n) < 0.5))
    return mask


def exact_truth(n: int, queries: np.ndarray, query_ids: np.ndarray, mask: IdBitmap) -> np.ndarray:
    """Exact top-k ids over the unexcluded vectors, merged chunk by chunk."""
    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    for ids, vectors in chunks(n):
        keep = ~mask.contains(ids)
        flat = faiss.IndexFlatIP(DIM)
        flat.add(vectors[keep])
        scores, labels = flat.search(queries, K + 1)
        labels = np.where(labels >= 0, ids[keep][labels], -1)
        # the query's own id is excluded too
        scores[labels == query_ids[:, None]] = -np.inf
        heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(labels))
    heap.finalize()
    return heap.I


def build(n: int, plan: IndexPlan) -> tuple[VectorIndex, float]:
    start = time.perf_counter()
    index = VectorIndex(DIM, plan)
    if n > plan.exact_limit:
        # Bulk load: train on a sample first, then add straight into the compressed index.
        # (the vectors are drawn independently, so the first ones are a random sample)
        index.train(chunk_vectors(0, plan.training_size(n)), n)
    for ids, vectors in chunks(n):
        index.upsert(ids, vectors)
    return index, time.perf_counter() - start


def timed_searches(index: VectorIndex, queries, query_ids, mask) -> tuple[list[float], np.ndarray]:
    times, found = [], []
    for query, query_id in zip(queries, query_ids, strict=True):
        start = time.perf_counter()
        _, labels = index.search(query, K, mask, [int(query_id)])
        times.append(time.perf_counter() - start)
        found.append(labels)
    return times, np.stack(found)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def update_cost(index: VectorIndex, n: int, query: np.ndarray) -> dict:
    """Median ms to add (or remove) one vector: what it adds before the next search."""
    add, remove = [], []
    new_ids = np.arange(n + 10, n + 60, dtype=np.int64)
    new_vectors = chunk_vectors(n + 10, n + 60, seed=9)
    for item, vector in zip(new_ids, new_vectors, strict=True):
        start = time.perf_counter()
        index.upsert(np.array([item]), vector[None, :])
        add.append(time.perf_counter() - start)
        index.search(query, K)
    for item in new_ids:
        start = time.perf_counter()
        index.remove(np.array([item]))
        remove.append(time.perf_counter() - start)
        index.search(query, K)
    return {
        "add_one_ms": statistics.median(add) * 1000,
        "remove_one_ms": statistics.median(remove) * 1000,
    }


def cold_start(path: Path) -> tuple[float, int]:
    """A new process: load the snapshot, answer one search. Seconds, and its RSS growth."""
    code = (
        "import json, time, numpy as np\n"
        "t = time.perf_counter()\n"
        "from lookalike.core.vector_index import VectorIndex\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "before = rss()\n"
        f"index = VectorIndex.read({str(path)!r})\n"
        f"index.search(np.ones({DIM}, np.float32) / {DIM ** 0.5}, {K})\n"
        "print(json.dumps([time.perf_counter() - t, rss() - before]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    took, grown = json.loads(out.stdout.strip().splitlines()[-1])
    return float(took), int(grown)


def web_path(n: int, plan: IndexPlan, query: np.ndarray) -> dict:
    """The backend's own path: vectors put into a real Redis the way workers write them, a web
    process's ProjectIndexes built from it, webhook-style updates, and a restart."""
    import redis

    from lookalike.service.project_index import ProjectIndexes
    from lookalike.service.state import ProjectState
    from lookalike_dev.devstack import redis_server

    with tempfile.TemporaryDirectory() as tmp, redis_server(tmp) as url:
        client = redis.Redis.from_url(url)
        state = ProjectState(client, 1)
        state.meta.claim_model("bench", DIM)
        before = int(client.info("memory")["used_memory"])
        start = time.perf_counter()
        for ids, vectors in chunks(n):
            for s in range(0, len(ids), 2000):
                state.put_vectors(ids[s : s + 2000].tolist(), vectors[s : s + 2000])
        put_s = time.perf_counter() - start
        client.xtrim("lookalike:project:1:changes", maxlen=0)
        redis_bytes = int(client.info("memory")["used_memory"]) - before
        state.replace_tasks(range(n), labeled=np.flatnonzero(
            np.random.default_rng(7).random(n) < 0.5).tolist())
        snapshots = Path(tmp) / "snapshots"
        gc.collect()
        rss0 = rss_bytes()
        indexes = ProjectIndexes(client, snapshots, plan)
        start = time.perf_counter()
        indexes.get(1).search(query, K)
        cold_build_s = time.perf_counter() - start
        indexes.wait_for_upkeep()
        gc.collect()
        web_rss = rss_bytes() - rss0
        add, remove = [], []
        vectors = chunk_vectors(n + 10, n + 60, seed=9)
        for offset, vector in enumerate(vectors):
            # The write (a worker's batch of one, then a TASKS_DELETED webhook's removal) and
            # the web's replay of it before its next search: the cost added to that search.
            task = n + 10 + offset
            t0 = time.perf_counter()
            state.put_vectors([task], vector[None, :])
            collection = indexes.get(1)
            t1 = time.perf_counter()
            collection.search(query, K)
            t2 = time.perf_counter()
            state.remove_tasks([task])
            collection = indexes.get(1)
            t3 = time.perf_counter()
            collection.search(query, K)
            add.append(t1 - t0)
            remove.append(t3 - t2)
        code = (
            "import json, sys, time\n"
            "t = time.perf_counter()\n"
            "import numpy as np, redis\n"
            "from lookalike.core.vector_index import IndexPlan\n"
            "from lookalike.service.project_index import ProjectIndexes\n"
            f"statm = open('/proc/self/statm').read().split()\n"
            f"rss0 = int(statm[1])\n"
            f"ix = ProjectIndexes(redis.Redis.from_url({url!r}), __import__('pathlib').Path("
            f"{str(snapshots)!r}), IndexPlan(exact_limit={plan.exact_limit}))\n"
            f"ix.get(1).search(np.ones({DIM}, np.float32) / {DIM ** 0.5}, {K})\n"
            "took = time.perf_counter() - t\n"
            "rss = (int(open('/proc/self/statm').read().split()[1]) - rss0) * 4096\n"
            "print(json.dumps([took, rss]))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                             text=True)
        restart_s, restart_rss = json.loads(out.stdout.strip().splitlines()[-1])
        return {
            "redis_bytes_per_vector": redis_bytes / n,
            "redis_put_s": put_s,
            "web_cold_build_s": cold_build_s,
            "web_rss_bytes_per_vector": web_rss / n,
            "web_add_one_ms": statistics.median(add) * 1000,
            "web_remove_one_ms": statistics.median(remove) * 1000,
            "web_restart_s": restart_s,
            "web_restart_rss_bytes_per_vector": restart_rss / n,
        }


def milvus_run(n: int, queries_n: int, uri: str | None) -> dict:
    """The same measurements with Milvus as the engine (`LOOKALIKE_VECTOR_DB`): a real Redis and
    a `milvus-lite server` started here, vectors written through `ProjectState.put_vectors` as
    workers write them, searches through the web's `MilvusIndexes` (filter inside Milvus plus
    the labeled check against Redis). The web process holds no vectors; memory is the Milvus
    server's RSS growth. With `uri`, an existing Milvus instead (memory not measured)."""
    import redis

    from lookalike.config import Settings
    from lookalike.service.runtime import Runtime
    from lookalike.service.vector_db import MilvusIndexes
    from lookalike_dev.devstack import milvus_server, redis_server

    with (tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp) / "redis") as url,
          (contextlib.nullcontext() if uri else milvus_server(Path(tmp) / "milvus")) as server):
        server_rss0 = _process_rss(server)
        rt = Runtime(Settings(redis_url=url, vector_db=uri or server.uri, data_dir=Path(tmp)))
        state = rt.state(1)
        state.vectors.collection.drop()  # an earlier run's
        mask = excluded_mask(n)
        labeled = np.flatnonzero(mask.contains(np.arange(n, dtype=np.int64))).tolist()
        state.replace_tasks(range(n + 100), labeled=labeled)
        state.meta.claim_model("bench", DIM)
        start = time.perf_counter()
        for ids, vectors in chunks(n):
            for s in range(0, len(ids), 2000):
                state.put_vectors(ids[s : s + 2000].tolist(), vectors[s : s + 2000])
        build_s = time.perf_counter() - start
        redis.Redis.from_url(url).xtrim("lookalike:project:1:changes", maxlen=0)
        indexes = MilvusIndexes(rt.state)
        query_ids = np.arange(queries_n, dtype=np.int64) * (n // queries_n)
        queries = chunk_vectors(n + 1000, n + 1000 + queries_n, seed=5)
        truth = exact_truth(n, queries, query_ids, mask)
        project = indexes.get(1)
        first = time.perf_counter()
        project.search(queries[0], K, {int(query_ids[0])})  # the first search loads segments
        first_s = time.perf_counter() - first
        times, found = [], []
        for query, query_id in zip(queries, query_ids, strict=True):
            t0 = time.perf_counter()
            hits = indexes.get(1).search(query, K, {int(query_id)})
            times.append(time.perf_counter() - t0)
            found.append([h.id for h in hits])
        recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth,
                                                                          strict=True)]))
        add, remove = [], []
        for offset, vector in enumerate(chunk_vectors(n + 10, n + 60, seed=9)):
            task = n + 10 + offset
            t0 = time.perf_counter()
            state.put_vectors([task], vector[None, :])
            t1 = time.perf_counter()
            indexes.get(1).search(queries[0], K)
            t2 = time.perf_counter()
            state.remove_tasks([task])
            t3 = time.perf_counter()
            indexes.get(1).search(queries[0], K)
            add.append(t1 - t0)
            remove.append(t3 - t2)
        return {
            "n": n,
            "index": "Milvus HNSW M=16 ef=max(128,4k), Strong",
            "build_s": build_s,
            "engine_rss_bytes_per_vector": (
                (_process_rss(server) - server_rss0) / n if server else float("nan")),
            "search_p50_ms": pct(times, 50),
            "search_p99_ms": pct(times, 99),
            "recall_at_20": recall,
            "add_one_ms": statistics.median(add) * 1000,
            "remove_one_ms": statistics.median(remove) * 1000,
            "cold_start_s": first_s,
            "web_rss_bytes_per_vector": 0.0,  # the web process queries Milvus, holds nothing
            "redis_bytes_per_vector": 0.0,  # only tasks, labels and the change log
        }


def _process_rss(server) -> int:
    """RSS of the Milvus server's process group leader, in bytes (0: not ours)."""
    if server is None:
        return 0
    pid = server._proc.pid
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(n: int, plan: IndexPlan, web: bool, queries_n: int) -> dict:
    gc.collect()
    rss0 = rss_bytes()
    index, build_s = build(n, plan)
    gc.collect()
    rss_growth = rss_bytes() - rss0
    mask = excluded_mask(n)
    query_ids = np.arange(queries_n, dtype=np.int64) * (n // queries_n)
    queries = chunk_vectors(n + 1000, n + 1000 + queries_n, seed=5)
    truth = exact_truth(n, queries, query_ids, mask)
    timed_searches(index, queries[:20], query_ids[:20], mask)  # warm-up
    times, found = timed_searches(index, queries, query_ids, mask)
    recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)]))
    updates = update_cost(index, n, queries[0])
    kind = index.kind
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snapshot.faiss"
        index.write(str(path))
        snapshot_bytes = path.stat().st_size
        del index  # the new process needs the memory at 20M
        gc.collect()
        cold, restart_rss = cold_start(path)
    result = {
        "n": n,
        "index": kind,
        "build_s": build_s,
        "engine_rss_bytes_per_vector": rss_growth / n,
        "snapshot_bytes_per_vector": snapshot_bytes / n,
        "search_p50_ms": pct(times, 50),
        "search_p99_ms": pct(times, 99),
        "recall_at_20": recall,
        **updates,
        "cold_start_s": cold,
        "restart_rss_bytes_per_vector": restart_rss / n,
    }
    if web:
        result.update(web_path(n, plan, queries[0]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, action="append", help="sizes (default 100k and 1M)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--codes", default=IndexPlan.codes)
    parser.add_argument("--train-per-list", type=int, default=IndexPlan.train_per_list,
                        help="training vectors per list (fewer: faster training at 20M)")
    parser.add_argument("--no-web", action="store_true",
                        help="skip the Redis + web-process path (engine only, e.g. for 20M)")
    parser.add_argument("--engine", choices=["embedded", "milvus"], default="embedded",
                        help="milvus: the same table with a milvus-lite server as the engine")
    parser.add_argument("--milvus-uri", help="with --engine milvus: an existing Milvus "
                        "(milvus://host:19530) instead of a milvus-lite server started here")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON report (default bench/results/scale[-milvus].json)")
    args = parser.parse_args()
    suffix = "" if args.engine == "embedded" else f"-{args.engine}"
    args.out = args.out or Path(__file__).parent / f"results/scale{suffix}.json"
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    plan = IndexPlan(codes=args.codes, train_per_list=args.train_per_list)
    sizes = args.n or [100_000, 1_000_000]
    if args.engine == "milvus":
        rows = [milvus_run(n, args.queries, args.milvus_uri) for n in sizes]
    else:
        rows = [run(n, plan, not args.no_web, args.queries) for n in sizes]
    columns = [
        ("n", "{:,}"), ("index", "{}"), ("build_s", "{:.1f}"),
        ("engine_rss_bytes_per_vector", "{:.0f}"), ("snapshot_bytes_per_vector", "{:.0f}"),
        ("search_p50_ms", "{:.2f}"), ("search_p99_ms", "{:.2f}"), ("recall_at_20", "{:.3f}"),
        ("add_one_ms", "{:.2f}"), ("remove_one_ms", "{:.2f}"), ("cold_start_s", "{:.2f}"),
        ("restart_rss_bytes_per_vector", "{:.0f}"),
        ("redis_bytes_per_vector", "{:.0f}"), ("web_cold_build_s", "{:.1f}"),
        ("web_rss_bytes_per_vector", "{:.0f}"), ("web_add_one_ms", "{:.2f}"),
        ("web_remove_one_ms", "{:.2f}"), ("web_restart_s", "{:.2f}"),
        ("web_restart_rss_bytes_per_vector", "{:.0f}"),
    ]
    print(" | ".join(name for name, _ in columns))
    for row in rows:
        print(" | ".join(fmt.format(row[name]) if name in row else "-" for name, fmt in columns))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"engine": args.engine,
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "dim": DIM, "clusters": CLUSTERS, "k": K, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


CENTRES = centres()

if __name__ == "__main__":
    main()
