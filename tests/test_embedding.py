"""Embedders: shapes, normalisation, determinism, text, and weights errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.config import Settings
from lookalike.core.embedding import (
    EmbedderError,
    ModelSpec,
    TextNotSupportedError,
    WeightsUnavailableError,
    embedder_from_settings,
    load_embedder,
)
from lookalike.core.weights import (
    EFFICIENTNET_LITE0_SPEC as LITE0_SPEC,
)
from lookalike.core.weights import (
    WeightsConversionError,
    convert_efficientnet_lite0,
)

CLIP_RANDOM_SPEC = "open_clip:ViT-B-32/random"


def assert_unit_rows(vectors: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- model specs
@pytest.mark.parametrize(
    ("spec", "family", "name", "pretrained"),
    [
        ("open_clip:ViT-B-32/laion2b_s34b_b79k", "open_clip", "ViT-B-32", "laion2b_s34b_b79k"),
        ("open_clip:ViT-B-32/random", "open_clip", "ViT-B-32", "random"),
        ("timm:efficientnet_lite0", "timm", "efficientnet_lite0", ""),
    ],
)
def test_model_spec_parse_round_trip(spec, family, name, pretrained):
    parsed = ModelSpec.parse(spec)
    assert (parsed.family, parsed.name, parsed.pretrained) == (family, name, pretrained)
    assert str(parsed) == spec
    assert parsed.is_random == (pretrained == "random")


@pytest.mark.parametrize("spec", ["", "ViT-B-32", "clip:ViT-B-32", "timm:", "open_clip"])
def test_model_spec_rejects_garbage(spec):
    with pytest.raises(EmbedderError, match="LOOKALIKE_MODEL"):
        ModelSpec.parse(spec)


def test_unknown_model_is_not_a_weights_problem(model_cache_dir):
    with pytest.raises(EmbedderError) as caught:
        load_embedder("timm:no_such_model_xyz", cache_dir=model_cache_dir)
    assert type(caught.value) is EmbedderError
    assert "no_such_model_xyz" in str(caught.value)


def test_unknown_open_clip_model_message_is_short(model_cache_dir):
    with pytest.raises(EmbedderError) as caught:
        load_embedder("open_clip:NoSuchNet/random", cache_dir=model_cache_dir)
    assert "NoSuchNet" in str(caught.value) and len(str(caught.value)) < 400


# --------------------------------------------------------------------------- open_clip (random)
def test_clip_embed_images_shape_dtype_norm(clip_random_embedder, photos):
    embedder = clip_random_embedder
    images = [photos["chelsea"], photos["coffee"], photos["camera"]]
    vectors = embedder.embed_images(images)
    assert vectors.shape == (3, 512)
    assert vectors.dtype == np.float32
    assert embedder.dim == 512 and embedder.input_size == 224
    assert embedder.spec == CLIP_RANDOM_SPEC and embedder.supports_text
    assert_unit_rows(vectors)
    assert np.isfinite(vectors).all()


def test_clip_embed_no_images(clip_random_embedder):
    assert clip_random_embedder.embed_images([]).shape == (0, 512)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_clip_batching_does_not_change_vectors(precision, model_cache_dir, photos):
    embedder = load_embedder(CLIP_RANDOM_SPEC, cache_dir=model_cache_dir, precision=precision)
    images = [photos[name] for name in ("astronaut", "rocket", "coins")]
    together = embedder.embed_images(images)
    embedder.batch_size = 2  # 2 batches, the last one short
    in_batches = embedder.embed_images(images)
    # int8 too: each image's activations are quantized on their own, not per batch
    np.testing.assert_allclose(in_batches, together, atol=1e-5)


def test_clip_different_images_differ(clip_random_embedder, photos):
    vectors = clip_random_embedder.embed_images([photos["chelsea"], photos["rocket"]])
    assert float(vectors[0] @ vectors[1]) < 0.99


def test_clip_random_weights_are_deterministic_across_loads(
    clip_random_embedder, model_cache_dir, photos
):
    # The web process and each worker load the model separately; their vectors must agree.
    torch.manual_seed(12345)
    other = load_embedder(CLIP_RANDOM_SPEC, cache_dir=model_cache_dir)
    images = [photos["chelsea"], photos["hubble_deep_field"]]
    np.testing.assert_allclose(
        other.embed_images(images), clip_random_embedder.embed_images(images), atol=1e-6
    )
    np.testing.assert_allclose(
        other.embed_text(["a cat"]), clip_random_embedder.embed_text(["a cat"]), atol=1e-6
    )


def test_loading_random_model_leaves_global_rng_alone(model_cache_dir):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    load_embedder("timm:efficientnet_lite0/random", cache_dir=model_cache_dir)
    assert torch.equal(torch.rand(3), expected)


def test_clip_embed_text(clip_random_embedder):
    vectors = clip_random_embedder.embed_text(["a photo of a cat", "a rocket", "coffee"])
    assert vectors.shape == (3, 512) and vectors.dtype == np.float32
    assert_unit_rows(vectors)
    assert float(vectors[0] @ vectors[1]) < 0.999  # different texts, different vectors


def test_clip_text_batching_does_not_change_vectors(clip_random_embedder):
    texts = [f"picture number {i}" for i in range(5)]
    together = clip_random_embedder.embed_text(texts)
    saved = clip_random_embedder.batch_size
    try:
        clip_random_embedder.batch_size = 2
        in_batches = clip_random_embedder.embed_text(texts)
    finally:
        clip_random_embedder.batch_size = saved
    np.testing.assert_allclose(in_batches, together, atol=1e-5)


@pytest.mark.parametrize("texts", [[], [""], ["   "], ["fine", ""]])
def test_clip_empty_text_raises(clip_random_embedder, texts):
    with pytest.raises(EmbedderError):
        clip_random_embedder.embed_text(texts)


# --------------------------------------------------------------------------- timm, real weights
def test_lite0_embed_images(lite0_embedder, photos):
    vectors = lite0_embedder.embed_images([photos["coffee"], photos["rocket"]])
    assert vectors.shape == (2, 1280) and vectors.dtype == np.float32
    assert lite0_embedder.dim == 1280 and lite0_embedder.spec == LITE0_SPEC
    assert not lite0_embedder.supports_text
    assert_unit_rows(vectors)


def test_lite0_accepts_non_rgb_images(lite0_embedder, photos):
    grey = photos["camera"].convert("L")
    rgba = photos["coffee"].convert("RGBA")
    vectors = lite0_embedder.embed_images([grey, rgba])
    np.testing.assert_allclose(
        vectors, lite0_embedder.embed_images([grey.convert("RGB"), rgba.convert("RGB")]), atol=1e-5
    )


def test_lite0_weights_are_real(lite0_weights, lite0_embedder, photos):
    """The converted file carries ImageNet weights: the classifier recognises the photos."""
    import timm

    model = timm.create_model(
        "efficientnet_lite0", pretrained=True, pretrained_cfg_overlay={"file": str(lite0_weights)}
    ).eval()
    batch = torch.stack(
        [lite0_embedder.preprocess(photos[n]) for n in ("chelsea", "coffee", "rocket")]
    )
    with torch.inference_mode():
        top5 = model(batch).topk(5).indices.tolist()
    cats, cup_or_espresso, missile_or_projectile = set(range(281, 286)), {967, 968}, {657, 744}
    assert cats & set(top5[0])
    assert cup_or_espresso & set(top5[1])
    assert missile_or_projectile & set(top5[2])


def test_image_only_model_refuses_text(lite0_embedder):
    with pytest.raises(TextNotSupportedError) as caught:
        lite0_embedder.embed_text(["a cat"])
    assert "open_clip" in str(caught.value)
    assert isinstance(caught.value, EmbedderError)


def test_convert_refuses_a_wrong_checkpoint(tmp_path: Path):
    source = tmp_path / "small.pth"
    torch.save({"weight": torch.zeros(3)}, source)
    with pytest.raises(WeightsConversionError):
        convert_efficientnet_lite0(tmp_path / "out.pth", source=source)
    assert not (tmp_path / "out.pth").exists()


# --------------------------------------------------------------------------- weights errors
@pytest.mark.parametrize("spec", [LITE0_SPEC, "open_clip:ViT-B-32/laion2b_s34b_b79k"])
def test_missing_weights_file(spec, tmp_path: Path, model_cache_dir):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsUnavailableError) as caught:
        load_embedder(spec, weights=str(missing), cache_dir=model_cache_dir)
    assert "LOOKALIKE_WEIGHTS" in str(caught.value)
    assert str(missing) in str(caught.value)


def test_missing_weights_file_from_settings(tmp_path: Path):
    settings = Settings.from_env(
        {
            "LOOKALIKE_DATA_DIR": str(tmp_path),
            "LOOKALIKE_MODEL": LITE0_SPEC,
            "LOOKALIKE_WEIGHTS": str(tmp_path / "gone.pth"),
        }
    )
    with pytest.raises(WeightsUnavailableError, match="LOOKALIKE_WEIGHTS"):
        embedder_from_settings(settings)


def test_weights_file_that_is_not_weights(tmp_path: Path, model_cache_dir):
    bogus = tmp_path / "bogus.pth"
    bogus.write_text("not a checkpoint")
    with pytest.raises(WeightsUnavailableError) as caught:
        load_embedder(LITE0_SPEC, weights=str(bogus), cache_dir=model_cache_dir)
    assert "LOOKALIKE_WEIGHTS" in str(caught.value) and str(bogus) in str(caught.value)


def test_weights_file_for_another_model(lite0_weights, model_cache_dir):
    with pytest.raises(WeightsUnavailableError) as caught:
        load_embedder("timm:resnet18", weights=str(lite0_weights), cache_dir=model_cache_dir)
    message = str(caught.value)
    assert "LOOKALIKE_WEIGHTS" in message and "LOOKALIKE_MODEL" in message
    # torch lists every mismatched key over hundreds of lines; the CLI prints one line
    assert "\n" not in message and len(message) < 1000


def test_hub_model_offline_says_how_to_provide_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    # huggingface_hub reads HF_HUB_OFFLINE at import, so patch its constant as well.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError) as caught:
        load_embedder("timm:resnet18.a1_in1k", cache_dir=tmp_path / "empty-cache")
    message = str(caught.value)
    assert "LOOKALIKE_WEIGHTS" in message
    assert "download" in message


def test_open_clip_without_pretrained_tag(model_cache_dir):
    with pytest.raises(WeightsUnavailableError) as caught:
        load_embedder("open_clip:ViT-B-32", cache_dir=model_cache_dir)
    assert "LOOKALIKE_WEIGHTS" in str(caught.value) and "/random" in str(caught.value)


def test_weights_from_settings_load(lite0_weights, tmp_path: Path, photos):
    settings = Settings.from_env(
        {
            "LOOKALIKE_DATA_DIR": str(tmp_path),
            "LOOKALIKE_MODEL": LITE0_SPEC,
            "LOOKALIKE_WEIGHTS": str(lite0_weights),
            "LOOKALIKE_BATCH_SIZE": "3",
        }
    )
    embedder = embedder_from_settings(settings)
    assert embedder.batch_size == 3
    assert embedder.embed_images([Image.new("RGB", (50, 40), (10, 20, 30))]).shape == (1, 1280)


@pytest.mark.parametrize(
    ("spec", "text"),
    [("open_clip:ViT-B-32/laion2b_s34b_b79k", True), ("timm:efficientnet_lite0", False)],
)
def test_a_spec_tells_whether_the_model_can_search_by_text(spec: str, text: bool) -> None:
    assert ModelSpec.parse(spec).has_text_tower is text
