"""Settings: one object, read from the environment (12-factor).

Every setting is documented in the README's settings table; keep the two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from lookalike.errors import LookalikeError

DEFAULT_MODEL = "open_clip:ViT-B-32/laion2b_s34b_b79k"


class ConfigError(LookalikeError, ValueError):
    """A setting has a value that cannot be used."""


def _env_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(f"expected a boolean (true/false), got {value!r}")


@dataclass(frozen=True)
class Settings:
    """Lookalike's configuration. `Settings.from_env()` builds it from `LOOKALIKE_*` etc."""

    data_dir: Path = field(default=Path(".lookalike"), metadata={"env": "LOOKALIKE_DATA_DIR"})
    model: str = field(default=DEFAULT_MODEL, metadata={"env": "LOOKALIKE_MODEL"})
    weights: str = field(default="", metadata={"env": "LOOKALIKE_WEIGHTS"})
    device: str = field(default="auto", metadata={"env": "LOOKALIKE_DEVICE"})
    batch_size: int = field(default=0, metadata={"env": "LOOKALIKE_BATCH_SIZE"})
    torch_threads: int = field(default=0, metadata={"env": "LOOKALIKE_TORCH_THREADS"})
    precision: str = field(default="auto", metadata={"env": "LOOKALIKE_PRECISION"})
    max_image_pixels: int = field(
        default=89_478_485, metadata={"env": "LOOKALIKE_MAX_IMAGE_PIXELS"}
    )
    max_download_bytes: int = field(
        default=50 * 1024 * 1024, metadata={"env": "LOOKALIKE_MAX_DOWNLOAD_BYTES"}
    )
    download_timeout: float = field(default=20.0, metadata={"env": "LOOKALIKE_DOWNLOAD_TIMEOUT"})
    task_cache_mb: int = field(default=512, metadata={"env": "LOOKALIKE_TASK_CACHE_MB"})
    redis_url: str = field(default="redis://localhost:6379/0", metadata={"env": "REDIS_URL"})
    label_studio_url: str = field(
        default="http://localhost:8080", metadata={"env": "LABEL_STUDIO_URL"}
    )
    label_studio_public_url: str = field(default="", metadata={"env": "LABEL_STUDIO_PUBLIC_URL"})
    label_studio_api_key: str = field(
        default="", repr=False, metadata={"env": "LABEL_STUDIO_API_KEY"}
    )
    queue_name: str = field(default="lookalike", metadata={"env": "LOOKALIKE_QUEUE"})
    index_batch_size: int = field(default=64, metadata={"env": "LOOKALIKE_INDEX_BATCH"})
    max_attempts: int = field(default=3, metadata={"env": "LOOKALIKE_MAX_ATTEMPTS"})
    similar_k: int = field(default=20, metadata={"env": "LOOKALIKE_SIMILAR_K"})
    max_searches: int = field(default=8, metadata={"env": "LOOKALIKE_MAX_SEARCHES"})
    exact_limit: int = field(default=100_000, metadata={"env": "LOOKALIKE_EXACT_LIMIT"})
    index_codes: str = field(default="SQ8", metadata={"env": "LOOKALIKE_INDEX_CODES"})
    vector_db: str = field(default="", metadata={"env": "LOOKALIKE_VECTOR_DB"})
    vector_db_token: str = field(
        default="", repr=False, metadata={"env": "LOOKALIKE_VECTOR_DB_TOKEN"}
    )
    set_sampling: bool = field(default=True, metadata={"env": "LOOKALIKE_SET_SAMPLING"})
    auto_prioritize: bool = field(default=True, metadata={"env": "LOOKALIKE_AUTO_PRIORITIZE"})
    auto_k: int = field(default=10, metadata={"env": "LOOKALIKE_AUTO_K"})
    rare_share: float = field(default=0.2, metadata={"env": "LOOKALIKE_RARE_SHARE"})
    suggestions: bool = field(default=True, metadata={"env": "LOOKALIKE_SUGGESTIONS"})
    suggest_k: int = field(default=10, metadata={"env": "LOOKALIKE_SUGGEST_K"})
    diverse: bool = field(default=True, metadata={"env": "LOOKALIKE_DIVERSE"})
    duplicate_threshold: float = field(
        default=0.0, metadata={"env": "LOOKALIKE_DUPLICATE_THRESHOLD"}
    )
    model_version: str = field(default="lookalike", metadata={"env": "LOOKALIKE_MODEL_VERSION"})
    # Security (see the README's "Security"): Label Studio's credentials for the ML-backend
    # protocol; people sign in to the page and the API with their own Label Studio token.
    basic_auth_user: str = field(default="", metadata={"env": "BASIC_AUTH_USER"})
    basic_auth_pass: str = field(default="", repr=False, metadata={"env": "BASIC_AUTH_PASS"})
    metrics_token: str = field(default="", repr=False, metadata={"env": "LOOKALIKE_METRICS_TOKEN"})
    url_allow: str = field(default="", metadata={"env": "LOOKALIKE_URL_ALLOW"})
    session_hours: float = field(default=12.0, metadata={"env": "LOOKALIKE_SESSION_HOURS"})
    rate_limit: int = field(default=120, metadata={"env": "LOOKALIKE_RATE_LIMIT"})
    thumbnail_rate_limit: int = field(
        default=1200, metadata={"env": "LOOKALIKE_THUMBNAIL_RATE_LIMIT"}
    )
    max_request_bytes: int = field(
        default=16 * 1024 * 1024, metadata={"env": "LOOKALIKE_MAX_REQUEST_BYTES"}
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f.metadata["env"]
            if name not in environ:
                continue
            raw = environ[name]
            try:
                if f.type in ("bool", bool):
                    values[f.name] = _env_bool(raw)
                elif f.type in ("int", int):
                    values[f.name] = int(raw)
                elif f.type in ("float", float):
                    values[f.name] = float(raw)
                elif f.type in ("Path", Path):
                    values[f.name] = Path(raw).expanduser()
                else:
                    values[f.name] = raw
            except (ValueError, ConfigError) as exc:
                raise ConfigError(f"{name}={raw!r}: {exc}") from exc
        return cls(**values)  # type: ignore[arg-type]

    @property
    def auth_enabled(self) -> bool:
        """Whether Label Studio's basic-auth credentials are set: then the protocol needs them
        and people sign in; without them, only loopback clients are served."""
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def public_label_studio_url(self) -> str:
        """Label Studio as browsers reach it (may differ from the URL this service uses)."""
        return (self.label_studio_public_url or self.label_studio_url).rstrip("/")

    @property
    def model_cache_dir(self) -> Path:
        """Where hub weights are downloaded to (kept under the data directory)."""
        return self.data_dir / "models"

    @property
    def collections_dir(self) -> Path:
        return self.data_dir / "collections"

    @property
    def snapshots_dir(self) -> Path:
        """Each web process's snapshots of project indexes (a cache: safe to delete)."""
        return self.data_dir / "snapshots"

    @staticmethod
    def env_names() -> dict[str, str]:
        """Field name -> environment variable, for docs and error messages."""
        return {f.name: f.metadata["env"] for f in fields(Settings)}
