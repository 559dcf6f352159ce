"""Convolutional stems of the "ConvStem" robust models (Singh, Croce & Hein 2023, RobustBench).

Those checkpoints are timm ViTs / ConvNeXts whose patch embedding (ViT: ``patch_embed.proj``) or
stem (ConvNeXt: ``stem``) is replaced by a small stack of 3×3 stride-2 convolutions, each
followed by a channels-first LayerNorm and GELU. The module tree here reproduces the parameter
names of those checkpoints (``….stem.<i>.weight``) so that their state dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from timm.layers import LayerNorm2d
from torch import Tensor, nn


class ConvStem(nn.Module):
    """``stem = Sequential([conv3x3 → LayerNorm2d → GELU] × n, (conv1x1))``.

    ``widths[i]`` and ``strides[i]`` describe the i-th 3×3 convolution; ``out_dim`` adds a final
    1×1 projection (the ViT variants project to the embedding width).
    """

    def __init__(
        self,
        widths: Sequence[int],
        strides: Sequence[int],
        out_dim: int | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_chans
        for width, stride in zip(widths, strides, strict=True):
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, stride=stride, padding=1),
                LayerNorm2d(width, eps=1e-6),
                nn.GELU(),
            ]
            previous = width
        if out_dim is not None:
            layers.append(nn.Conv2d(previous, out_dim, kernel_size=1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.stem(x)


def vit_conv_stem(model: nn.Module, planes: int = 48) -> nn.Module:
    """Give a timm ViT the 4-stage (stride 16) conv stem: planes·(1, 2, 4, 8), then 1×1 to the
    embedding width."""
    embed_dim = model.patch_embed.proj.out_channels
    widths = [planes, planes * 2, planes * 4, planes * 8]
    model.patch_embed.proj = ConvStem(widths, [2, 2, 2, 2], out_dim=embed_dim)
    return model


def convnext_conv_stem(model: nn.Module, planes: int = 48, depth: int = 2) -> nn.Module:
    """Give a timm ConvNeXt a stride-4 conv stem ending at the first stage's width.

    ``depth=2``: planes → 2·planes (ConvNeXt-T/S, planes 48); ``depth=3``: planes → 1.5·planes →
    2·planes with the last convolution at stride 1 (ConvNeXt-B planes 64, ConvNeXt-L planes 96).
    """
    if depth == 2:
        widths, strides = [planes, planes * 2], [2, 2]
    elif depth == 3:
        widths, strides = [planes, int(planes * 1.5), planes * 2], [2, 2, 1]
    else:
        raise ValueError(f"depth = {depth}: 2 or 3")
    model.stem = ConvStem(widths, strides)
    return model


STEMS = {
    "vit_convstem": vit_conv_stem,
    "convnext_convstem": convnext_conv_stem,
}
