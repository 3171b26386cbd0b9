"""Embedders: images (and text, where the model has a text tower) to L2-normalised vectors.

A model is named by one spec string, `family:name[/pretrained]`:

- `open_clip:ViT-B-32/laion2b_s34b_b79k`  open_clip model with hub weights (the default)
- `timm:vit_small_patch14_dinov2.lvd142m` timm image-only model with hub weights
- `open_clip:ViT-B-32/random`             random weights, seeded; only for tests and plumbing

`LOOKALIKE_WEIGHTS=/path/file` loads a local weights file instead of the hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from lookalike.core.images import to_rgb
from lookalike.core.inference import InferencePlan
from lookalike.errors import ModelError

log = logging.getLogger(__name__)

RANDOM = "random"
RANDOM_SEED = 20240229  # fixed, so every process builds the same random model


class EmbedderError(ModelError):
    """The model cannot be built or cannot do what was asked."""


class WeightsUnavailableError(EmbedderError):
    """Pretrained weights could not be loaded (offline, missing file, wrong file)."""


class TextNotSupportedError(EmbedderError):
    """The model is image-only: text queries need a model with a text tower (open_clip)."""

    http_status = 400  # the caller asked for something this project's model cannot do


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "open_clip" or "timm"
    name: str
    pretrained: str  # hub tag, "" for the model's default, or "random"

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        family, sep, rest = spec.partition(":")
        if not sep or family not in {"open_clip", "timm"} or not rest:
            raise EmbedderError(
                f"model spec {spec!r} is not 'open_clip:NAME/PRETRAINED' or 'timm:NAME'"
                " (LOOKALIKE_MODEL)"
            )
        name, _, pretrained = rest.partition("/")
        return cls(family, name, pretrained)

    @property
    def has_text_tower(self) -> bool:
        """Whether the model can embed text queries (CLIP models can, timm models cannot)."""
        return self.family == "open_clip"

    @property
    def is_random(self) -> bool:
        return self.pretrained == RANDOM

    def __str__(self) -> str:
        return f"{self.family}:{self.name}" + (f"/{self.pretrained}" if self.pretrained else "")


class Embedder(Protocol):
    spec: str
    dim: int
    input_size: int
    device: str
    batch_size: int
    load_workers: int
    supports_text: bool

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One image as the model's input tensor (thread-safe: the pipeline's loaders call it)."""
        ...

    def embed_prepared(self, inputs: Sequence[torch.Tensor]) -> np.ndarray: ...

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def embed_text(self, texts: Sequence[str]) -> np.ndarray: ...


def pick_device(requested: str = "auto") -> str:
    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _normalise(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy().astype(np.float32, copy=False)


@contextlib.contextmanager
def _seeded(enabled: bool) -> Iterator[None]:
    """Seed torch's CPU RNG for a random-weights model, restoring the caller's RNG state after."""
    if not enabled:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def _brief(cause: BaseException, limit: int = 300) -> str:
    """One line from a library's error: state-dict mismatches list every key, over many lines."""
    text = " ".join(str(cause).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _weights_help(spec: ModelSpec, cause: BaseException, weights: str = "") -> str:
    cause = _brief(cause)
    if weights:  # the user pointed at a file and it did not fit: hub advice would mislead
        return (
            f"LOOKALIKE_WEIGHTS={weights} could not be loaded into {spec}: {cause}. "
            f"Check that the file holds weights for this model (LOOKALIKE_MODEL)."
        )
    return (
        f"could not load weights for {spec}: {cause}. Either allow this machine to download "
        f"them once (they are cached under LOOKALIKE_DATA_DIR/models), or download the weights "
        f"file elsewhere and point LOOKALIKE_WEIGHTS at it (see the README, 'Weights offline')."
    )


class _TorchEmbedder:
    """Shared batching for torch image models; subclasses supply the forward passes."""

    spec: str
    dim: int
    input_size: int
    device: str
    supports_text: bool = False

    def __init__(
        self, model: torch.nn.Module, preprocess, plan: InferencePlan, input_size: int
    ) -> None:
        self.input_size = input_size
        probe = torch.zeros(1, 3, input_size, input_size, device=plan.device)
        self.model, self.plan = plan.prepare_model(
            model, lambda candidate: self._features_of(candidate, probe)
        )
        self.preprocess = preprocess
        self.device = self.plan.device
        self.batch_size = self.plan.batch_size
        self.load_workers = self.plan.load_workers

    def _image_features(self, batch: torch.Tensor) -> torch.Tensor:
        return self._features_of(self.model, batch)

    def _features_of(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, image: Image.Image) -> torch.Tensor:
        # to_rgb: timm's transforms keep the input's mode, and an L image has 1 channel.
        return self.preprocess(to_rgb(image))

    def embed_prepared(self, inputs: Sequence[torch.Tensor]) -> np.ndarray:
        out = np.empty((len(inputs), self.dim), dtype=np.float32)
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start : start + self.batch_size]
            batch = self.plan.to_device(torch.stack(list(chunk)))
            with self.plan.running():
                out[start : start + len(chunk)] = _normalise(self._image_features(batch))
        return out

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_prepared([self.prepare(image) for image in images])

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        raise TextNotSupportedError(
            f"{self.spec} is an image-only model and cannot embed text; use an open_clip model "
            f"(LOOKALIKE_MODEL=open_clip:ViT-B-32/laion2b_s34b_b79k) for text search"
        )


class OpenClipEmbedder(_TorchEmbedder):
    supports_text = True

    def __init__(
        self, spec: ModelSpec, weights: str, cache_dir: Path, plan: InferencePlan
    ) -> None:
        import open_clip

        pretrained: str | None
        if spec.is_random:
            pretrained = None
        elif weights:
            if not Path(weights).is_file():
                raise WeightsUnavailableError(
                    f"LOOKALIKE_WEIGHTS={weights} does not exist or is not a file"
                )
            pretrained = weights
        else:
            pretrained = spec.pretrained or None
            if pretrained is None:
                raise WeightsUnavailableError(
                    f"{spec} names no pretrained tag; use e.g. "
                    f"open_clip:{spec.name}/laion2b_s34b_b79k, set LOOKALIKE_WEIGHTS, or "
                    f"ask for random weights explicitly with open_clip:{spec.name}/random"
                )
        try:
            with _seeded(spec.is_random):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.name, pretrained=pretrained, cache_dir=str(cache_dir), device="cpu"
                )
        except RuntimeError as exc:
            if "Unknown model" in str(exc) or "Model config" in str(exc):
                raise EmbedderError(
                    f"open_clip has no model {spec.name!r}: {_brief(exc, 120)}"
                ) from exc
            raise WeightsUnavailableError(_weights_help(spec, exc, weights)) from exc
        except Exception as exc:  # hub/network/file errors come in many types
            raise WeightsUnavailableError(_weights_help(spec, exc, weights)) from exc
        size = model.visual.image_size
        size = int(size[0] if isinstance(size, tuple | list) else size)
        super().__init__(model, preprocess, plan, size)
        self.spec = str(spec)
        self.tokenizer = open_clip.get_tokenizer(spec.name)
        with self.plan.running():
            probe = self.tokenizer(["probe"]).to(self.device)
            self.dim = int(model.encode_text(probe).shape[-1])

    def _features_of(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model.encode_image(batch)

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts or any(not t or not t.strip() for t in texts):
            raise EmbedderError("text queries must be non-empty strings")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device)
            with self.plan.running():
                out[start : start + len(tokens)] = _normalise(self.model.encode_text(tokens))
        return out


class TimmEmbedder(_TorchEmbedder):
    def __init__(
        self, spec: ModelSpec, weights: str, cache_dir: Path, plan: InferencePlan
    ) -> None:
        import timm
        from timm.data import create_transform, resolve_data_config

        name = spec.name + (f".{spec.pretrained}" if spec.pretrained and not spec.is_random else "")
        kwargs: dict = {"num_classes": 0}
        if spec.is_random:
            kwargs["pretrained"] = False
        elif weights:
            if not Path(weights).is_file():
                raise WeightsUnavailableError(
                    f"LOOKALIKE_WEIGHTS={weights} does not exist or is not a file"
                )
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": weights})
        else:
            kwargs.update(pretrained=True, cache_dir=str(cache_dir))
        try:
            with _seeded(spec.is_random):
                model = timm.create_model(name, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise EmbedderError(f"timm has no model {name!r}: {_brief(exc, 120)}") from exc
            raise WeightsUnavailableError(_weights_help(spec, exc, weights)) from exc
        except Exception as exc:
            raise WeightsUnavailableError(_weights_help(spec, exc, weights)) from exc
        config = resolve_data_config({}, model=model)
        super().__init__(model, create_transform(**config), plan, int(config["input_size"][-1]))
        self.spec = str(spec)
        self.dim = int(model.num_features)

    def _features_of(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch)


def load_embedder(
    spec: str,
    weights: str = "",
    cache_dir: Path | str = Path(".lookalike/models"),
    device: str = "auto",
    batch_size: int = 0,
    precision: str = "auto",
) -> Embedder:
    """Build the embedder a spec names. Raises `WeightsUnavailableError` with how to fix it."""
    parsed = ModelSpec.parse(spec)
    device = pick_device(device)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Hub libraries read these; point them into our cache so nothing lands in $HOME unasked.
    os.environ.setdefault("HF_HOME", str(cache_dir / "huggingface"))
    os.environ.setdefault("TORCH_HOME", str(cache_dir / "torch"))
    cls = OpenClipEmbedder if parsed.family == "open_clip" else TimmEmbedder
    if parsed.is_random:
        log.warning("using RANDOM weights for %s (asked for explicitly): results are noise", spec)
    plan = InferencePlan.choose(device, precision, batch_size)
    embedder = cls(parsed, weights, cache_dir, plan)
    log.info("loaded %s (dim %d) on %s, %s", embedder.spec, embedder.dim, device, plan.precision)
    return embedder


def embedder_from_settings(settings) -> Embedder:
    if settings.torch_threads > 0:
        # Several workers on one machine would each use every core: let the operator split them.
        torch.set_num_threads(settings.torch_threads)
    return load_embedder(
        settings.model,
        weights=settings.weights,
        cache_dir=settings.model_cache_dir,
        device=settings.device,
        batch_size=settings.batch_size,
        precision=settings.precision,
    )
