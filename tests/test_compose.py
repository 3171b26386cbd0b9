"""The Docker deployment agrees with the code, the README and itself.

docker-compose.yml is validated and resolved by `docker-compose config` (Debian's package
`docker-compose`), which needs no Docker engine; the Dockerfile is checked as text.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from lookalike.config import DEFAULT_MODEL, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
TEST_SCRIPT = ROOT / "scripts" / "test.sh"

# The commands the README documents; the compose services must run exactly these.
SERVE_COMMAND = "lookalike serve --host 0.0.0.0 --port 9090"
WORKER_COMMAND = "lookalike worker"

BACKEND_SERVICES = ("lookalike", "worker")
SETTINGS_ENV_NAMES = set(Settings.env_names().values())


# ---------------------------------------------------------------------------- helpers
def _compose_tool() -> list[str] | None:
    """`docker-compose` (v1, Debian) or the `docker compose` plugin, whichever runs here."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def _run_config(env_file: Path, *options: str) -> subprocess.CompletedProcess[str]:
    tool = _compose_tool()
    if tool is None:
        pytest.skip(
            "no compose tool: install Debian's `docker-compose` package "
            "(apt-get install --no-install-recommends docker-compose)"
        )
    # A clean environment: shell variables would override the env file's values.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env_file.parent)}
    return subprocess.run(
        [*tool, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *options, "config"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return command if isinstance(command, str) else shlex.join(command)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _port_targets(service: dict[str, Any]) -> set[int]:
    targets = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):  # long form (what `config` prints)
            targets.add(int(port["target"]))
        else:  # "8080", "8080:8080" or "127.0.0.1:8080:8080"
            targets.add(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return targets


def _named_volume_mounts(service: dict[str, Any], volumes: dict[str, Any]) -> dict[str, str]:
    """Container path -> named volume, for the service's mounts of top-level named volumes."""
    mounts = {}
    for mount in service.get("volumes") or []:
        if isinstance(mount, dict):
            if mount.get("type", "volume") == "volume":
                mounts[mount["target"]] = mount.get("source", "")
        else:
            source, _, rest = str(mount).partition(":")
            mounts[rest.split(":")[0]] = source
    return {target: source for target, source in mounts.items() if source in volumes}


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test", "")
    return test if isinstance(test, str) else " ".join(test)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, args = line.partition(" ")
            pairs.append((instruction.upper(), args.strip()))
    return pairs


def _exec_form(args: str) -> str:
    """A Dockerfile CMD/ENTRYPOINT as one command line (exec form is JSON, shell form is not)."""
    return shlex.join(json.loads(args)) if args.startswith("[") else args


def _dockerfile_args() -> dict[str, str]:
    args = {}
    for instruction, rest in _dockerfile_instructions():
        if instruction == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip("\"'")
    return args


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """docker-compose.yml resolved by the compose tool, with .env.example as the .env."""
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    shutil.copyfile(ENV_EXAMPLE, env_file)
    result = _run_config(env_file)
    assert result.returncode == 0, f"compose config rejected the file:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config["services"]


# ---------------------------------------------------------------------------- tests
def test_compose_file_needs_the_env_file(tmp_path: Path) -> None:
    """Without .env, compose stops with a pointer to .env.example instead of starting broken."""
    empty = tmp_path / ".env"
    empty.write_text("")
    result = _run_config(empty)
    assert result.returncode != 0
    assert ".env.example" in result.stderr


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert {"label-studio", "redis", *BACKEND_SERVICES} <= set(services)


def test_label_studio_image_is_pinned_to_the_tested_version(
    services: dict[str, dict[str, Any]],
) -> None:
    image = services["label-studio"]["image"]
    assert re.fullmatch(r"heartexlabs/label-studio:\d+\.\d+\.\d+", image), image
    match = re.search(r"^LABEL_STUDIO_VERSION=(\S+)", TEST_SCRIPT.read_text(), re.M)
    if match:  # the version the end-to-end tests run against
        assert image.endswith(":" + match.group(1))


def test_backend_env_names_are_real_settings(services: dict[str, dict[str, Any]]) -> None:
    for name in BACKEND_SERVICES:
        env = _environment(services[name])
        ours = {k for k in env if k.startswith(("LOOKALIKE_", "LABEL_STUDIO_")) or k == "REDIS_URL"}
        unknown = ours - SETTINGS_ENV_NAMES
        assert not unknown, f"{name} sets {sorted(unknown)}, which Settings does not read"
        needed = {
            "REDIS_URL",
            "LABEL_STUDIO_URL",
            "LABEL_STUDIO_API_KEY",
            "LOOKALIKE_MODEL",
            "LOOKALIKE_DATA_DIR",
        }
        assert needed <= set(env), f"{name} lacks {sorted(needed - set(env))}"
        Settings.from_env(env)  # every value parses


def test_web_and_workers_share_one_configuration(services: dict[str, dict[str, Any]]) -> None:
    assert _environment(services["lookalike"]) == _environment(services["worker"])


def test_redis_url_points_at_the_redis_service(services: dict[str, dict[str, Any]]) -> None:
    redis_command = _command(services["redis"])
    port_flag = re.search(r"--port\s+(\d+)", redis_command)
    redis_port = int(port_flag.group(1)) if port_flag else 6379
    assert "--appendonly yes" in redis_command
    for name in BACKEND_SERVICES:
        url = urlparse(_environment(services[name])["REDIS_URL"])
        assert url.scheme == "redis"
        assert url.hostname == "redis" and url.hostname in services
        assert (url.port or 6379) == redis_port


def test_label_studio_url_points_at_the_label_studio_service(
    services: dict[str, dict[str, Any]],
) -> None:
    assert 8080 in _port_targets(services["label-studio"])
    for name in BACKEND_SERVICES:
        env = _environment(services[name])
        url = urlparse(env["LABEL_STUDIO_URL"])
        assert url.hostname == "label-studio" and url.hostname in services
        assert url.port == 8080
        assert urlparse(env["LABEL_STUDIO_PUBLIC_URL"]).port == 8080


def test_label_studio_accepts_a_backend_on_the_docker_network(
    services: dict[str, dict[str, Any]],
) -> None:
    env = _environment(services["label-studio"])
    assert env["ML_BLOCK_LOCAL_IP"].lower() == "false"
    assert env["SSRF_PROTECTION_ENABLED"].lower() == "false"
    assert env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"].lower() == "true"
    assert env["LABEL_STUDIO_USERNAME"] and env["LABEL_STUDIO_PASSWORD"]


def test_one_key_for_label_studio_and_the_backend(services: dict[str, dict[str, Any]]) -> None:
    """The admin's legacy token is created from the same value the backend uses as its key."""
    token = _environment(services["label-studio"])["LABEL_STUDIO_USER_TOKEN"]
    assert re.fullmatch(r"[0-9a-f]{40}", token), "a legacy token is 40 hex characters"
    for name in BACKEND_SERVICES:
        assert _environment(services[name])["LABEL_STUDIO_API_KEY"] == token


def test_env_example_covers_every_variable_of_the_compose_file() -> None:
    example = _env_file(ENV_EXAMPLE)
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used <= set(example), f".env.example lacks {sorted(used - set(example))}"
    expected = {
        "LABEL_STUDIO_USERNAME",
        "LABEL_STUDIO_PASSWORD",
        "LABEL_STUDIO_API_KEY",
        "LOOKALIKE_MODEL",
        "LOOKALIKE_WEIGHTS",
    }
    assert expected <= set(example)
    assert example["LOOKALIKE_MODEL"] == DEFAULT_MODEL
    assert f"${{LOOKALIKE_MODEL:-{DEFAULT_MODEL}}}" in COMPOSE_FILE.read_text()


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    assert "localhost:8080/health" in _healthcheck_text(services["label-studio"])
    assert "redis-cli ping" in _healthcheck_text(services["redis"])
    port = re.search(r"--port\s+(\d+)", _command(services["lookalike"]))
    assert port, "lookalike serve needs an explicit --port"
    assert f"localhost:{port.group(1)}/health" in _healthcheck_text(services["lookalike"])
    for name in BACKEND_SERVICES:
        depends = services[name].get("depends_on") or {}
        assert isinstance(depends, dict) and depends.get("redis", {}).get("condition") == (
            "service_healthy"
        ), f"{name} must wait for a healthy Redis"


def test_backend_port_matches_its_command(services: dict[str, dict[str, Any]]) -> None:
    port = re.search(r"--port\s+(\d+)", _command(services["lookalike"]))
    assert port and int(port.group(1)) in _port_targets(services["lookalike"])


def test_worker_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a fixed host port would clash between worker replicas"


def test_named_volumes(config: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    volumes = config.get("volumes") or {}
    assert "/label-studio/data" in _named_volume_mounts(services["label-studio"], volumes)
    assert "/data" in _named_volume_mounts(services["redis"], volumes)
    for name in BACKEND_SERVICES:
        env = _environment(services[name])
        assert "LOOKALIKE_DATA_DIR" in env, f"{name} must set LOOKALIKE_DATA_DIR"
        data_dir = PurePosixPath(env["LOOKALIKE_DATA_DIR"])
        model_cache = {data_dir, data_dir / "models"}  # Settings.model_cache_dir is data/models
        mounts = _named_volume_mounts(services[name], volumes)
        assert model_cache & {PurePosixPath(t) for t in mounts}, (
            f"{name} needs a named volume for its model cache ({data_dir}/models)"
        )


def test_commands_are_the_documented_ones(services: dict[str, dict[str, Any]]) -> None:
    assert _command(services["lookalike"]) == SERVE_COMMAND
    assert _command(services["worker"]) == WORKER_COMMAND
    assert README.is_file(), "README.md is missing"
    readme = README.read_text()
    for command in (SERVE_COMMAND, WORKER_COMMAND):
        assert command in readme, f"README.md does not document `{command}`"


def test_dockerfile_runs_the_compose_commands_as_they_are() -> None:
    """No ENTRYPOINT to prefix them; the default CMD is the web server's documented command."""
    instructions = _dockerfile_instructions()
    entrypoints = [args for instruction, args in instructions if instruction == "ENTRYPOINT"]
    assert not entrypoints, "an ENTRYPOINT would be prepended to the compose commands"
    cmds = [args for instruction, args in instructions if instruction == "CMD"]
    assert cmds and _exec_form(cmds[-1]) == SERVE_COMMAND
    assert any(i == "USER" and args not in {"root", "0"} for i, args in instructions)


def test_dockerfile_python_fits_requires_python() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    bases = [args for instruction, args in _dockerfile_instructions() if instruction == "FROM"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)(?:\.\d+)?-slim\S*(?:\s+AS\s+\S+)?", bases[-1], re.I)
    assert match, f"expected a python:X.Y-slim base image, got {bases[-1]!r}"
    assert requires.contains(f"{match.group(1)}.{match.group(2)}.0"), (bases[-1], str(requires))


def test_dockerfile_torch_is_the_tested_torch() -> None:
    args = _dockerfile_args()
    assert args["TORCH_INDEX"].endswith("/cpu"), "CPU torch by default"
    script = TEST_SCRIPT.read_text()
    for arg in ("TORCH_VERSION", "TORCHVISION_VERSION"):
        match = re.search(rf"^{arg}=(\S+)", script, re.M)
        if match:
            assert args[arg] == match.group(1), f"Dockerfile {arg} differs from scripts/test.sh"


def test_the_backend_is_secured_by_default(services: dict[str, dict[str, Any]]) -> None:
    """Label Studio's basic-auth credentials are set for the web process, and its port is
    published on this machine only (Label Studio reaches it inside the docker network)."""
    env = _environment(services["lookalike"])
    assert env["BASIC_AUTH_USER"] and len(env["BASIC_AUTH_PASS"]) >= 16
    for port in services["lookalike"].get("ports") or []:
        host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
        assert host_ip == "127.0.0.1", port


# ---------------------------------------------------------------------------- Milvus profile
MILVUS_SERVICES = ("milvus", "milvus-etcd", "milvus-minio")


def test_milvus_profile_is_accepted_and_wired_to_the_backend(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    text = ENV_EXAMPLE.read_text()
    # What the README and .env.example tell people to set for the bundled Milvus.
    text = text.replace("# LOOKALIKE_VECTOR_DB=milvus://milvus:19530", "")
    text = text.replace("\nLOOKALIKE_VECTOR_DB=\n", "\nLOOKALIKE_VECTOR_DB=milvus://milvus:19530\n")
    env_file.write_text(text)
    result = _run_config(env_file, "--profile", "milvus")
    assert result.returncode == 0, f"compose config rejected the profile:\n{result.stderr}"
    services = yaml.safe_load(result.stdout)["services"]
    for name in MILVUS_SERVICES:
        assert services[name].get("profiles") == ["milvus"], name
    milvus = services["milvus"]
    assert "milvus-etcd:2379" in _environment(milvus)["ETCD_ENDPOINTS"]
    assert "milvus-minio:9000" in _environment(milvus)["MINIO_ADDRESS"]
    assert "9091/healthz" in _healthcheck_text(milvus)
    for name in BACKEND_SERVICES:
        target = urlparse(_environment(services[name])["LOOKALIKE_VECTOR_DB"])
        assert (target.scheme, target.hostname, target.port) == ("milvus", "milvus", 19530)


def test_without_the_profile_the_vectors_stay_in_redis(services: dict[str, dict[str, Any]]) -> None:
    for name in BACKEND_SERVICES:
        assert _environment(services[name])["LOOKALIKE_VECTOR_DB"] == ""
    for name in ("label-studio", "redis", *BACKEND_SERVICES):
        assert not services[name].get("profiles"), name  # always started
