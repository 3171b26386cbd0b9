"""The `lookalike` console script, run for real in a subprocess with real weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lookalike.cli.main import build_parser

SCRIPT = shutil.which("lookalike", path=str(Path(sys.executable).parent))
COMMAND = [SCRIPT] if SCRIPT else [sys.executable, "-m", "lookalike.cli"]


def run(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*COMMAND, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2 and exactly one line on stderr, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lookalike: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def cli_env(data_dir: Path, weights: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env.update(
        LOOKALIKE_DATA_DIR=str(data_dir),
        LOOKALIKE_MODEL="timm:efficientnet_lite0",
        LOOKALIKE_WEIGHTS=str(weights),
        HF_HUB_OFFLINE="1",  # nothing here may need the network
    )
    return env


@pytest.fixture(scope="module", params=["files", "milvus"])
def indexed(request, tmp_path_factory, lite0_weights, photos):
    """A folder of photos (nested, plus a bad file) indexed once by `lookalike index`, into a
    collection file, then into a Milvus collection (LOOKALIKE_VECTOR_DB)."""
    root = tmp_path_factory.mktemp("cli")
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    paths = {
        "chelsea": folder / "chelsea.jpg",
        "coffee": folder / "coffee.png",
        "rocket": folder / "sub" / "rocket.jpg",
        "astronaut": folder / "sub" / "astronaut.png",
    }
    for name, path in paths.items():
        photos[name].save(path)
    (folder / "broken.jpg").write_bytes(b"")
    env = cli_env(root / "data", lite0_weights)
    if request.param == "milvus":
        env["LOOKALIKE_VECTOR_DB"] = request.getfixturevalue("milvus").uri
    first = run("index", str(folder), env=env)
    return folder, paths, env, first


def test_index_first_run(indexed):
    *_, first = indexed
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("4 embedded, 0 unchanged, 0 removed, 1 failed")
    assert "holds 4 images" in first.stdout
    assert "broken.jpg: empty" in first.stderr
    assert "Traceback" not in first.stderr


def test_index_second_run_embeds_nothing(indexed):
    folder, _, env, _ = indexed
    again = run("index", "--quiet", str(folder), env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("0 embedded, 4 unchanged, 0 removed")


def test_search_by_image_finds_the_file_first(indexed):
    _, paths, env, _ = indexed
    result = run("search", "--image", str(paths["rocket"]), "-k", "3", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    rank, score, path = lines[0].split(maxsplit=2)
    assert (rank, path) == ("1", str(paths["rocket"].resolve()))
    assert float(score) == pytest.approx(1.0, abs=1e-3)
    scores = [float(line.split()[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)


def test_search_like_json_excludes_itself(indexed):
    _, paths, env, _ = indexed
    result = run("search", "--like", str(paths["coffee"]), "--json", env=env)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["model"] == "timm:efficientnet_lite0"
    results = output["results"]
    assert len(results) == 3
    found = {row["path"] for row in results}
    assert str(paths["coffee"].resolve()) not in found
    assert found == {str(p.resolve()) for n, p in paths.items() if n != "coffee"}
    assert [row["rank"] for row in results] == [1, 2, 3]
    assert all(isinstance(row["score"], float) and -1 <= row["score"] <= 1 for row in results)


def test_text_search_with_image_only_model_fails_cleanly(indexed):
    _, _, env, _ = indexed
    result = run("search", "--text", "a cat", env=env)
    assert_clean_error(result, "image-only", "open_clip")


def test_search_missing_collection_fails_cleanly(indexed):
    _, paths, env, _ = indexed
    result = run("search", "-c", "nothing-here", "--image", str(paths["rocket"]), env=env)
    assert_clean_error(result, "nothing-here")


def test_search_like_unindexed_file_fails_cleanly(indexed, tmp_path: Path):
    _, _, env, _ = indexed
    result = run("search", "--like", str(tmp_path / "elsewhere.jpg"), env=env)
    assert_clean_error(result, "not in collection")


def test_bad_box_fails_cleanly(indexed):
    _, paths, env, _ = indexed
    result = run("search", "--image", str(paths["rocket"]), "--box", "1,2,3", env=env)
    assert_clean_error(result, "--box")


def test_index_missing_folder_fails_cleanly(indexed, tmp_path: Path):
    _, _, env, _ = indexed
    assert_clean_error(run("index", str(tmp_path / "nope"), env=env), "does not exist")


def test_collections_json(indexed):
    _, _, env, _ = indexed
    result = run("collections", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"name": "default", "model": "timm:efficientnet_lite0", "dim": 1280, "count": 4}
    ]


def test_bad_setting_fails_cleanly(indexed):
    _, _, env, _ = indexed
    result = run("collections", env={**env, "LOOKALIKE_BATCH_SIZE": "many"})
    assert_clean_error(result, "LOOKALIKE_BATCH_SIZE")


def _subcommands() -> list[str]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return sorted(action.choices)


def test_core_subcommands_registered():
    assert {"index", "search", "collections", "weights"} <= set(_subcommands())


@pytest.mark.parametrize("args", [[], *([name] for name in _subcommands())])
def test_help_exits_zero(args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    result = run(*args, "--help", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lookalike")
    assert result.stderr == ""


def test_no_command_is_a_usage_error():
    result = run(env=dict(os.environ), timeout=60)
    assert result.returncode == 2
    assert "usage: lookalike" in result.stderr
