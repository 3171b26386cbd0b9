"""How models run: precision and device plans, and what each precision does to the vectors.

No GPU here: the CUDA plan is checked as a plan (pinned memory cannot be allocated without a
device), and every precision that runs on a CPU is run for real.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from lookalike.config import Settings
from lookalike.core.embedding import embedder_from_settings, load_embedder
from lookalike.core.inference import InferencePlan, PrecisionError
from lookalike.core.int8 import Int8Linear, Int8SelfAttention
from lookalike.core.weights import EFFICIENTNET_LITE0_SPEC

INT8_LAYERS = (Int8Linear, Int8SelfAttention)


def test_cpu_plan_defaults_to_int8_and_small_batches() -> None:
    plan = InferencePlan.choose("cpu", cpus=2, machine="x86_64")
    assert (plan.precision, plan.batch_size, plan.pin_memory) == ("int8", 8, False)
    assert plan.load_workers == 6
    # int8 runs on oneDNN's x86 kernels; other CPUs stay in fp32 unless asked
    assert InferencePlan.choose("cpu", machine="aarch64").precision == "fp32"
    assert InferencePlan.choose("cpu", "int8", machine="aarch64").precision == "int8"


def test_cuda_plan_feeds_the_gpu() -> None:
    plan = InferencePlan.choose("cuda:0", cpus=8)
    assert (plan.precision, plan.batch_size, plan.pin_memory) == ("fp16", 128, True)
    assert plan.load_workers == 16  # decoding is what limits a GPU: every core decodes
    assert InferencePlan.choose("cuda", "fp32", batch_size=64, cpus=64).load_workers == 32


@pytest.mark.parametrize(
    ("device", "precision", "message"),
    [("cuda", "int8", "CPU only"), ("cpu", "fp16", "slow on a CPU"), ("cpu", "fp64", "one of")],
)
def test_precisions_a_device_cannot_run_are_refused(device, precision, message) -> None:
    with pytest.raises(PrecisionError, match=message):
        InferencePlan.choose(device, precision)


def test_precision_setting_reaches_the_embedder(lite0_weights, model_cache_dir) -> None:
    settings = Settings(
        model=EFFICIENTNET_LITE0_SPEC,
        weights=str(lite0_weights),
        data_dir=model_cache_dir.parent,
        precision="fp32",
    )
    assert embedder_from_settings(settings).plan.precision == "fp32"
    with pytest.raises(PrecisionError, match="LOOKALIKE_PRECISION"):
        embedder_from_settings(replace(settings, precision="double"))


@pytest.fixture(scope="module")
def clip_by_precision(model_cache_dir):
    return {
        precision: load_embedder(
            "open_clip:ViT-B-32/random", cache_dir=model_cache_dir, precision=precision
        )
        for precision in ("fp32", "int8", "bf16")
    }


def test_int8_quantizes_the_linear_layers_and_keeps_the_vectors(clip_by_precision, photos):
    images = [photos[name] for name in ("chelsea", "coffee", "rocket", "astronaut")]
    fp32 = clip_by_precision["fp32"].embed_images(images)
    int8 = clip_by_precision["int8"]
    quantized = [m for m in int8.model.modules() if isinstance(m, INT8_LAYERS)]
    assert quantized, "no layer was quantized"
    assert any(isinstance(m, Int8SelfAttention) for m in quantized)  # attention too
    cosine = (int8.embed_images(images) * fp32).sum(1)
    assert cosine.min() > 0.99
    assert not np.allclose(cosine, 1.0, atol=1e-6)  # it did run another arithmetic
    # text queries go through the same plan
    text = (int8.embed_text(["a cat"]) * clip_by_precision["fp32"].embed_text(["a cat"])).sum()
    assert text > 0.99


def test_bf16_autocast_runs_on_the_cpu(clip_by_precision, photos):
    images = [photos["chelsea"], photos["rocket"]]
    fp32 = clip_by_precision["fp32"].embed_images(images)
    bf16 = clip_by_precision["bf16"].embed_images(images)
    assert bf16.dtype == np.float32
    assert (bf16 * fp32).sum(1).min() > 0.99


def test_fp32_is_plain_float32(clip_by_precision) -> None:
    model = clip_by_precision["fp32"].model
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not [m for m in model.modules() if isinstance(m, INT8_LAYERS)]


def test_int8_falls_back_to_fp32_where_the_quantized_model_does_not_run(
    model_cache_dir, photos, caplog
) -> None:
    # CLIP's ResNet attention pool reads its Linear layers' weights directly.
    embedder = load_embedder("open_clip:RN50/random", cache_dir=model_cache_dir)
    assert embedder.plan.precision == "fp32"
    assert "int8 does not run on this model" in caplog.text
    assert not [m for m in embedder.model.modules() if isinstance(m, INT8_LAYERS)]
    vectors = embedder.embed_images([photos["chelsea"], photos["rocket"]])
    assert vectors.shape == (2, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
