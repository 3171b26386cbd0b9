"""Start real services on this machine: Redis, Label Studio, lookalike's own processes.

Used by `lookalike demo` and by the end-to-end tests. Every starter is a context manager that
cleans up even on failure: it stops the whole process group (SIGTERM, then SIGKILL after a
grace period) and removes any temporary directory it created itself. Directories passed in by
the caller are kept, so their logs can be read afterwards.

Usage::

    with redis_server(tmp / "redis") as redis_url, label_studio_server(tmp / "ls") as ls:
        port = free_port()
        with lookalike_process(["serve", "--host", "127.0.0.1", "--port", str(port)],
                               {"REDIS_URL": redis_url, "LABEL_STUDIO_URL": ls.url,
                                "LABEL_STUDIO_API_KEY": ls.api_key},
                               tmp / "serve.log") as proc:
            wait_http(f"http://127.0.0.1:{port}/health", 60, proc=proc, log_path=...)
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_LS_VENV = "~/.cache/lookalike-ls-venv"  # /root/.cache/lookalike-ls-venv for root
LS_START_TIMEOUT = 180.0
STOP_GRACE_SECONDS = 10.0

# Variables of the caller's environment that would change how Label Studio starts (database,
# host name, user, tokens). They are dropped before our own settings are applied.
_LS_ENV_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "POSTGRE_")
_LS_ENV_NAMES = {"HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN", "DJANGO_DB", "DATABASE_NAME"}


class ServiceError(RuntimeError):
    """A service did not start; the message carries the tail of its log."""


# --------------------------------------------------------------------------------------------
# small helpers


def ls_venv() -> Path:
    """The virtualenv holding Label Studio (env ``LOOKALIKE_LS_VENV``)."""
    return Path(os.environ.get("LOOKALIKE_LS_VENV") or DEFAULT_LS_VENV).expanduser()


def ls_executable() -> Path:
    return ls_venv() / "bin" / "label-studio"


def label_studio_available() -> bool:
    return os.access(ls_executable(), os.X_OK)


def redis_executable() -> str | None:
    return os.environ.get("LOOKALIKE_REDIS_SERVER") or shutil.which("redis-server")


def redis_available() -> bool:
    return redis_executable() is not None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: str | os.PathLike[str] | None, lines: int = 50) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_http(
    url: str,
    timeout: float,
    *,
    proc: subprocess.Popen[Any] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    headers: Mapping[str, str] | None = None,
    interval: float = 0.25,
) -> int:
    """Poll ``GET url`` until it answers with a 2xx status; return that status.

    Raises ServiceError on timeout, or at once if ``proc`` exits meanwhile; the message ends
    with the last 50 lines of ``log_path`` when given.
    """
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(
                f"process {proc.args!r} exited with code {proc.returncode} before {url} "
                f"answered\n--- log tail ---\n{log_tail(log_path)}"
            )
        request = urllib.request.Request(url, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if 200 <= response.status < 300:
                    return response.status
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:  # connection refused, reset, timeout...
            last_error = repr(exc)
        if time.monotonic() >= deadline:
            raise ServiceError(
                f"{url} not ready after {timeout:.0f} s (last: {last_error})\n"
                f"--- log tail ---\n{log_tail(log_path)}"
            )
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# process groups


def _parent_death_signal() -> Callable[[], None] | None:
    """preexec_fn asking Linux to SIGTERM the child if the test process dies (best effort).

    Only from the main thread: Linux sends the signal when the *thread* that forked exits, so
    a child started from a short-lived worker thread would be killed at once.
    """
    if (
        not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def _spawn(
    argv: list[str],
    env: Mapping[str, str],
    log_path: Path,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv in its own session/process group, stdout+stderr appended to log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )


def stop_process_group(proc: subprocess.Popen[Any], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the process group of ``proc``, wait ``grace`` s, then SIGKILL it."""
    pgid = proc.pid  # start_new_session=True makes the child a group leader

    def signal_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    if proc.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            proc.wait(timeout=30)
    # The leader is gone; kill anything it left behind in its group (forked workers...).
    signal_group(signal.SIGKILL)


@contextlib.contextmanager
def _work_dir(tmpdir: str | os.PathLike[str] | None, prefix: str) -> Iterator[Path]:
    """The caller's directory (created if needed, kept) or a fresh temp dir (removed)."""
    if tmpdir is not None:
        path = Path(tmpdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Redis


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(
    tmpdir: str | os.PathLike[str] | None = None, *, timeout: float = 20.0
) -> Iterator[str]:
    """Run a throw-away ``redis-server`` on 127.0.0.1; yield ``redis://127.0.0.1:PORT/0``.

    No persistence (``--save ''``, ``--appendonly no``); its log is ``tmpdir/redis.log``.
    """
    executable = redis_executable()
    if executable is None:
        raise ServiceError("redis-server not found on PATH (apt-get install redis-server)")
    with _work_dir(tmpdir, "lookalike-redis-") as workdir:
        log_path = workdir / "redis.log"
        for attempt in range(3):  # a free port can be taken between free_port() and bind
            port = free_port()
            argv = [
                executable,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
                "--daemonize", "no",
                "--protected-mode", "yes",
            ]  # fmt: skip
            proc = _spawn(argv, os.environ, log_path, cwd=workdir)
            try:
                deadline = time.monotonic() + timeout
                while not _redis_ping(port):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                else:
                    yield f"redis://127.0.0.1:{port}/0"
                    return
                if proc.poll() is None or attempt == 2:
                    raise ServiceError(
                        f"redis-server did not answer PING on port {port}\n"
                        f"--- log tail ---\n{log_tail(log_path)}"
                    )
            finally:
                stop_process_group(proc)


# --------------------------------------------------------------------------------------------
# Milvus (milvus-lite's gRPC server: the protocol pymilvus speaks to a real cluster)


def milvus_executable() -> str | None:
    beside = Path(sys.executable).parent / "milvus-lite"  # installed in this venv
    return str(beside) if beside.exists() else shutil.which("milvus-lite")


class MilvusServer:
    """A ``milvus-lite server`` on 127.0.0.1 that can be stopped and started again on the same
    port and data directory (outage tests); ``uri`` is what LOOKALIKE_VECTOR_DB takes."""

    def __init__(self, workdir: Path, timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.timeout = timeout
        self.log_path = workdir / "milvus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"milvus://127.0.0.1:{self.port}"

    def start(self) -> None:
        executable = milvus_executable()
        if executable is None:
            raise ServiceError("milvus-lite not found (pip install milvus-lite)")
        argv = [executable, "server", "--data-dir", str(self.workdir / "data"),
                "--host", "127.0.0.1", "--port", str(self.port)]
        self._proc = _spawn(argv, os.environ, self.log_path, cwd=self.workdir)
        deadline = time.monotonic() + self.timeout
        while not _accepts(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"milvus-lite did not listen on port {self.port}\n"
                    f"--- log tail ---\n{log_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_group(self._proc)
            self._proc = None


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def milvus_server(tmpdir: str | os.PathLike[str] | None = None) -> Iterator[MilvusServer]:
    """Run a throw-away Milvus-protocol server; yields it (``.uri``, ``.stop()``, ``.start()``)."""
    with _work_dir(tmpdir, "lookalike-milvus-") as workdir:
        server = MilvusServer(workdir)
        server.start()
        try:
            yield server
        finally:
            server.stop()


# --------------------------------------------------------------------------------------------
# Label Studio


@dataclass
class LabelStudioServer:
    """A running Label Studio; ``api_key`` is a legacy token (``Authorization: Token <key>``)."""

    url: str
    api_key: str
    username: str
    password: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    startup_seconds: float = 0.0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.api_key}"}

    def client(self) -> Any:
        """A ``label_studio_sdk.LabelStudio`` client for this server."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.api_key)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """``requests.request`` against ``url + path`` with the Token header; returns the
        response (not raised for status)."""
        import requests

        headers = {**self.headers, **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 30)
        return requests.request(method, self.url + path, headers=headers, **kwargs)

    def log(self, lines: int = 50) -> str:
        return log_tail(self.log_path, lines)


def label_studio_env(
    data_dir: Path,
    *,
    username: str,
    password: str,
    token: str,
    document_root: str | os.PathLike[str] | None = None,
    hostname: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for ``label-studio start`` (see shared/label-studio-facts.md)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_LS_ENV_PREFIXES) and key not in _LS_ENV_NAMES
    }
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": username,
            "LABEL_STUDIO_PASSWORD": password,
            "LABEL_STUDIO_USER_TOKEN": token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if document_root is not None:
        env["LOCAL_FILES_DOCUMENT_ROOT"] = str(Path(document_root).resolve())
    if hostname:
        env["LABEL_STUDIO_HOST"] = hostname
    env.update(extra or {})
    return env


@contextlib.contextmanager
def label_studio_server(
    tmpdir: str | os.PathLike[str] | None = None,
    *,
    document_root: str | os.PathLike[str] | None = None,
    timeout: float = LS_START_TIMEOUT,
    username: str = "admin@example.com",
    password: str | None = None,
    set_hostname: bool = False,
    extra_env: Mapping[str, str] | None = None,
    use_template: bool | None = None,
    port: int | None = None,
    token: str | None = None,
) -> Iterator[LabelStudioServer]:
    """Run a fresh Label Studio (SQLite under ``tmpdir/data``) on 127.0.0.1; yield its handle.

    - ``document_root``: LOCAL_FILES_DOCUMENT_ROOT for local-files storage / ``/data/local-files``.
    - ``set_hostname``: also set LS's HOST to ``http://127.0.0.1:PORT`` (absolute URLs in
      tasks and in ``/setup``'s ``hostname``); by default LS keeps relative URLs, like a stock
      install.
    - ``extra_env``: more environment variables for the LS process.
    - ``port``: listen on this port (fail if it is taken) instead of a free one.
    - ``token``, ``password``: the admin's; pass the first run's again to restart the same
      server on the same ``tmpdir`` and ``port`` (its database is kept).
    - ``use_template``: start from a cached, already migrated (user-less) SQLite database
      instead of running LS's ~35 s of migrations on every start. The cache is built once per
      LS install (under ``LOOKALIKE_LS_TEMPLATE_DIR``, default ``~/.cache/lookalike-ls-template``).
      Default: on, unless env ``LOOKALIKE_LS_TEMPLATE=0``.

    Log: ``tmpdir/label-studio.log``. The yielded handle's ``api_key`` (40 hex chars, new each
    run) has been checked against ``GET /api/projects/`` before yielding.
    """
    executable = ls_executable()
    if not os.access(executable, os.X_OK):
        raise ServiceError(
            f"{executable} not found: create it with `python3 -m venv {ls_venv()} && "
            f"{ls_venv()}/bin/pip install label-studio==1.23.2` (or run scripts/test.sh)"
        )
    token = token or secrets.token_hex(20)
    password = password or secrets.token_urlsafe(16)
    requested_port = port
    with _work_dir(tmpdir, "lookalike-ls-") as workdir:
        data_dir = workdir / "data"
        data_dir.mkdir(exist_ok=True)
        log_path = workdir / "label-studio.log"
        if use_template is None:
            use_template = os.environ.get("LOOKALIKE_LS_TEMPLATE", "1") not in ("0", "false", "")
        database = data_dir / "label_studio.sqlite3"
        if use_template and not database.exists():
            shutil.copyfile(migrated_database_template(timeout), database)
        last_error: ServiceError | None = None
        for _attempt in range(3):
            port = requested_port or free_port()
            url = f"http://127.0.0.1:{port}"
            env = label_studio_env(
                data_dir,
                username=username,
                password=password,
                token=token,
                document_root=document_root,
                hostname=url if set_hostname else None,
                extra=extra_env,
            )
            argv = [
                str(executable),
                "start",
                "--no-browser",
                "--internal-host", "127.0.0.1",  # --host is the public URL, not the bind address
                "--port", str(port),
                "--enable-legacy-api-token",
            ]  # fmt: skip
            started = time.monotonic()
            with open(log_path, "ab") as log:
                log.write(f"\n=== {' '.join(argv)} ===\n".encode())
            log_offset = log_path.stat().st_size
            proc = _spawn(argv, env, log_path, cwd=workdir)
            try:
                try:
                    _wait_label_studio(url, port, timeout, proc, log_path, log_offset)
                except _PortTaken as exc:
                    last_error = ServiceError(str(exc))
                    if requested_port:
                        break
                    continue  # LS would silently move to port+1; retry on a new free port
                response = _check_token(url, token)
                if response is not None:
                    raise ServiceError(
                        f"Label Studio is up but rejects `Token {token}` on /api/projects/: "
                        f"{response}\n--- log tail ---\n{log_tail(log_path)}"
                    )
                yield LabelStudioServer(
                    url=url,
                    api_key=token,
                    username=username,
                    password=password,
                    data_dir=data_dir,
                    log_path=log_path,
                    process=proc,
                    startup_seconds=time.monotonic() - started,
                )
                return
            finally:
                stop_process_group(proc)
        assert last_error is not None
        raise last_error


def migrated_database_template(timeout: float = LS_START_TIMEOUT) -> Path:
    """A cached SQLite database on which every Label Studio migration has run, with no user.

    Built once per LS install with ``label-studio version`` (which migrates, prints and exits);
    a file lock makes parallel test processes wait for one build.
    """
    executable = ls_executable()
    sites = sorted(ls_venv().glob("lib/python*/site-packages/label_studio-*.dist-info"))
    version = sites[-1].name.removesuffix(".dist-info") if sites else "label_studio"
    venv_hash = hashlib.sha1(str(ls_venv().resolve()).encode()).hexdigest()[:10]
    key = f"{version}-{venv_hash}"
    root = Path(
        os.environ.get("LOOKALIKE_LS_TEMPLATE_DIR") or "~/.cache/lookalike-ls-template"
    ).expanduser()
    template = root / key / "label_studio.sqlite3"
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with open(template.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if template.exists():
            return template
        build = Path(tempfile.mkdtemp(prefix="build-", dir=template.parent))
        try:
            env = label_studio_env(build / "data", username="", password="", token="")
            for key_name in (
                "LABEL_STUDIO_USERNAME",
                "LABEL_STUDIO_PASSWORD",
                "LABEL_STUDIO_USER_TOKEN",
            ):
                env.pop(key_name)
            log_path = build / "migrate.log"
            proc = _spawn([str(executable), "version"], env, log_path, cwd=build)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                stop_process_group(proc)
            built = build / "data" / "label_studio.sqlite3"
            if code != 0 or not built.exists():
                raise ServiceError(
                    f"`label-studio version` (migrating a template database) failed with "
                    f"exit code {code}\n--- log tail ---\n{log_tail(log_path)}"
                )
            os.replace(built, template)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return template


class _PortTaken(Exception):
    pass


def _wait_label_studio(
    url: str,
    port: int,
    timeout: float,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    log_offset: int,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            wait_http(f"{url}/health", min(5.0, max(remaining, 0.0)), proc=proc, log_path=log_path)
            return
        except ServiceError:
            if proc.poll() is not None or remaining <= 0:
                raise ServiceError(
                    f"Label Studio did not become ready at {url}/health within {timeout:.0f} s "
                    f"(exit code {proc.poll()})\n--- last 50 log lines ({log_path}) ---\n"
                    f"{log_tail(log_path)}"
                ) from None
        with open(log_path, "rb") as log:
            log.seek(log_offset)
            if f"Port {port} is in use".encode() in log.read():
                raise _PortTaken(f"port {port} was taken before Label Studio could bind it")


def _check_token(url: str, token: str) -> str | None:
    """None if ``Token <token>`` is accepted, else a description of the failure."""
    request = urllib.request.Request(
        f"{url}/api/projects/", headers={"Authorization": f"Token {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:300]!r}"
    except OSError as exc:
        return repr(exc)


# --------------------------------------------------------------------------------------------
# lookalike's own processes


@contextlib.contextmanager
def lookalike_process(
    args: list[str],
    env: Mapping[str, str | None],
    log_path: str | os.PathLike[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    grace: float = STOP_GRACE_SECONDS,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``<sys.executable> -m lookalike.cli *args`` in its own process group.

    ``env`` is merged over ``os.environ`` (a ``None`` value removes that variable, e.g.
    ``{"LABEL_STUDIO_API_KEY": None}``); stdout and stderr go to ``log_path``. On exit the group
    gets SIGTERM, then SIGKILL after ``grace`` seconds. The process is not waited for: use
    ``wait_http(..., proc=proc, log_path=log_path)`` for a server.
    """
    merged = dict(os.environ)
    merged.setdefault("PYTHONUNBUFFERED", "1")
    for key, value in env.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    argv = [sys.executable, "-m", "lookalike.cli", *args]
    proc = _spawn(argv, merged, Path(log_path), cwd=cwd)
    try:
        yield proc
    finally:
        stop_process_group(proc, grace)
