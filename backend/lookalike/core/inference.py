"""How a model runs on its device: numeric precision, batch size, host-to-device copies.

Chosen with bench/bench_embed.py (2-core AVX-512 CPU; ratios in the README):

- CPU, `int8` (the default there): Linear layers and self-attention projections in 8-bit
  integers (`lookalike.core.int8`: weights per output channel, activations per token). A ViT
  spends most of its time in those products; convolutional models keep fp32 convolutions, so
  for them little changes. Activations are scaled per token, so a vector never depends on its
  batch-mates; vectors stay within ~1e-4 in cosine of fp32. A model whose quantized form does
  not run stays fp32 (with a warning).
- CUDA, `fp16` (the default there): autocast to half precision, batches of 128, batches copied
  from pinned host memory without blocking, and more loader threads, since a GPU is fed by
  decoding, not limited by inference.
- `fp32` forces plain float32 everywhere; `bf16` autocasts to bfloat16 (CPUs with bf16 units).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from lookalike.core import int8
from lookalike.errors import ModelError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "int8", "bf16", "fp16")


class PrecisionError(ModelError):
    """A precision the device cannot run."""


@dataclass(frozen=True)
class InferencePlan:
    device: str
    precision: str  # fp32, int8, bf16 or fp16 (never "auto")
    batch_size: int
    pin_memory: bool  # copy batches to the device from page-locked memory, without blocking
    load_workers: int  # threads fetching, decoding and preprocessing ahead of inference

    @classmethod
    def choose(
        cls,
        device: str,
        precision: str = "auto",
        batch_size: int = 0,
        cpus: int | None = None,
        machine: str | None = None,
    ) -> InferencePlan:
        cuda = device.startswith("cuda")
        cpus = cpus or os.cpu_count() or 1
        machine = (machine or platform.machine()).lower()
        if precision not in PRECISIONS:
            raise PrecisionError(
                f"LOOKALIKE_PRECISION={precision!r}: use one of {', '.join(PRECISIONS)}"
            )
        if precision == "auto":
            # int8 products run on oneDNN's x86 kernels (VNNI / AVX2); elsewhere PyTorch may
            # fall back to a plain loop, slower than fp32, so other CPUs default to fp32.
            x86 = machine in ("x86_64", "amd64")
            precision = "fp16" if cuda else "int8" if x86 else "fp32"
        if precision == "int8" and cuda:
            raise PrecisionError("int8 runs on the CPU only; use fp16 or fp32 on a GPU")
        if precision == "fp16" and not cuda:
            raise PrecisionError("fp16 is slow on a CPU; use int8, bf16 or fp32 there")
        return cls(
            device=device,
            precision=precision,
            # Measured on a 2-core CPU (bench/bench_core.py): 8 is the fastest for
            # EfficientNet-Lite0 and as fast as any for ViT-B-32. A GPU wants large batches.
            batch_size=batch_size or (128 if cuda else 8),
            pin_memory=cuda,
            # On a CPU, loading shares the cores with inference (I/O waits and GIL-free
            # decoding overlap it); a GPU is limited by decoding, so every core decodes.
            load_workers=min(32, 2 * cpus if cuda else cpus + 4),
        )

    def prepare_model(
        self, model: torch.nn.Module, probe: Callable[[torch.nn.Module], object]
    ) -> tuple[torch.nn.Module, InferencePlan]:
        """The model on the device at this precision, and the plan it really runs: int8 falls
        back to fp32 (with a warning) for a model whose quantized form does not run, e.g. a
        layer that reads a Linear's weights directly (CLIP's ResNet attention pool).
        `probe(model)` runs one forward pass."""
        model = model.to(self.device).eval()
        if self.precision != "int8":
            return model, self
        # The image tower only (CLIP's `visual`): it is what indexing runs millions of times,
        # and open_clip's text tower reads its Linear weights' dtype, which quantized layers
        # no longer have. A text query is one short pass in fp32.
        tower = getattr(model, "visual", None)
        quantized = int8.quantize(tower if isinstance(tower, torch.nn.Module) else model)
        candidate = model
        if isinstance(tower, torch.nn.Module):
            model.visual = quantized
        else:
            candidate = quantized
        try:
            with self.running():
                probe(candidate)
        except Exception as exc:  # the quantized graph does not run: this model stays fp32
            log.warning("int8 does not run on this model (%s: %s); using fp32",
                        type(exc).__name__, exc)
            if isinstance(tower, torch.nn.Module):
                model.visual = tower
            return model, replace(self, precision="fp32")
        return candidate, self

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around every forward pass: no autograd, and autocast for bf16 / fp16."""
        with torch.inference_mode():
            if self.precision in ("bf16", "fp16"):
                dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
                with torch.autocast(self.device.split(":")[0], dtype=dtype):
                    yield
            else:
                yield

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.pin_memory:
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)
