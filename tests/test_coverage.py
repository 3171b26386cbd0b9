"""Coverage mode's core: clusters of real photos, and the serving order the clusters and
scores give in Label Studio's Uncertainty sampling (the end-to-end test checks Label Studio's
own next-task against a real server)."""

from __future__ import annotations

import numpy as np
import pytest
from tests.test_duplicates import photo_vectors  # noqa: F401  (fixture)

from lookalike.core.coverage import MAX_K, auto_k, cluster, coverage_order, coverage_score
from lookalike.service.queueing import request_cluster


def test_each_photo_and_its_copy_share_a_cluster(photo_vectors) -> None:  # noqa: F811
    _, vectors, names = photo_vectors
    grouping = cluster(vectors, k=len(names) // 2)
    pairs = {names[i].removesuffix("_copy") for i in range(len(names))}
    assert grouping.k == len(pairs)
    by_name = dict(zip(names, grouping.labels.tolist(), strict=True))
    assert {by_name[n] for n in pairs} == set(range(grouping.k))  # one photo per cluster
    assert all(by_name[n] == by_name[f"{n}_copy"] for n in pairs)
    assert np.all(grouping.typicality > 0.8)


def test_every_cluster_is_served_once_before_any_twice() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 5 + [1] * 3 + [2] * 1 + [3] * 4)
    typicality = rng.uniform(0.5, 1.0, len(labels))
    order = coverage_order(labels, typicality)
    first = labels[order[:4]].tolist()
    assert sorted(first) == [0, 1, 2, 3]
    assert first == [0, 3, 1, 2]  # largest cluster first, an outlier alone last
    second = labels[order[4:7]].tolist()
    assert sorted(second) == [0, 1, 3]
    for value in range(4):  # within a cluster, the most typical first
        served = typicality[order[labels[order] == value]]
        assert list(served) == sorted(served, reverse=True)
    scores = coverage_score(labels, typicality)
    assert np.all((scores >= 0) & (scores < 1))  # above every request band (negative)
    assert request_cluster(7) < 0  # a request's match never shares a coverage cluster


@pytest.mark.parametrize(("n", "k"), [(1, 1), (3, 3), (14, 7), (100, 20), (10**6, MAX_K)])
def test_k_from_the_size(n: int, k: int) -> None:
    assert auto_k(n) == k


def test_the_cli_turns_coverage_on_and_off(tmp_path) -> None:
    import os
    import subprocess
    import sys

    import redis
    from rq import Queue
    from tests.services import redis_server

    from lookalike.service.state import ProjectState

    with redis_server(tmp_path / "redis") as url:
        env = {**os.environ, "REDIS_URL": url, "LOOKALIKE_DATA_DIR": str(tmp_path)}
        command = [sys.executable, "-m", "lookalike.cli", "coverage", "9", "on", "--k", "12"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "coverage mode on (k: 12)" in done.stdout
        connection = redis.Redis.from_url(url)
        meta = ProjectState(connection, 9).meta.get()
        assert (meta["coverage"], meta["coverage_k"]) == ("on", "12")
        [job] = Queue("lookalike", connection=connection).jobs
        assert job.func_name.endswith("apply_coverage") and job.args == (9,)
        command[-3:] = ["off"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and ProjectState(connection, 9).meta.get()["coverage"] == "off"
        bad = subprocess.run([*command[:-1], "on", "--k", "1"], env=env, capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode == 2 and "k is an integer from 2 to 1000" in bad.stderr
