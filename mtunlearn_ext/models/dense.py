"""A small encoder-decoder for dense multi-task prediction (segmentation, depth, normals).

Shared backbone: a U-Net-style encoder (stride-2 stem and three stride-2 stages) and decoder
(bilinear upsampling plus skip connections) back to half resolution; each task head is a 3x3 conv
block and a 1x1 projection at half resolution, a bilinear x2 upsampling, and the task's output
activation (softplus for depth, L2 normalisation for normals). Inputs need even ``H`` and ``W``.

GroupNorm, not BatchNorm, throughout, because unlearning needs two things BatchNorm breaks:
per-sample gradients (``torch.func.vmap`` over single samples, where batch statistics are
undefined) and a model whose only state is its parameters (running statistics are buffers that
remember the training data and that no gradient step can edit).
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mtunlearn_ext._functional import unit_normalize
from mtunlearn_ext.data.base import TaskSpec
from mtunlearn_ext.models.base import MultiTaskModel

__all__ = ["DenseBackbone", "DenseMultiTaskNet", "PositiveDepth", "UnitNormals"]


def _groups(channels: int) -> int:
    """The largest of 8, 4, 2, 1 groups dividing ``channels`` (GroupNorm needs a divisor)."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ConvBlock(nn.Sequential):
    """3x3 convolution (no bias: the norm's shift replaces it), GroupNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(_groups(out_channels), out_channels),
            nn.ReLU(),
        )


class DenseBackbone(nn.Module):
    """Encoder-decoder ``[B, C_in, H, W] -> [B, widths[0], H/2, W/2]`` (``H, W`` even).

    Stride-2 stem, three more stride-2 stages (down to ``H/16``), and a decoder back to ``H/2``
    with skip connections. Nothing runs at full resolution: at ``H/2`` a layer costs a quarter,
    and full-resolution 1x1 layers are memory-bound on CPU; the heads upsample their outputs.
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (16, 32, 48, 64)) -> None:
        super().__init__()
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"DenseBackbone: `widths` must be 4 positive ints, got {widths}")
        c1, c2, c3, c4 = widths
        self.out_channels = c1
        self.enc1 = nn.Sequential(ConvBlock(in_channels, c1, stride=2), ConvBlock(c1, c1))
        self.enc2 = nn.Sequential(ConvBlock(c1, c2, stride=2), ConvBlock(c2, c2))
        self.enc3 = nn.Sequential(ConvBlock(c2, c3, stride=2), ConvBlock(c3, c3))
        self.enc4 = nn.Sequential(ConvBlock(c3, c4, stride=2), ConvBlock(c4, c4))
        self.dec3 = ConvBlock(c4 + c3, c3)
        self.dec2 = ConvBlock(c3 + c2, c2)
        self.dec1 = ConvBlock(c2 + c1, c1)

    @staticmethod
    def _up_cat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Upsampling to the skip's exact size keeps any even input size working.
        up = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([up, skip], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"DenseBackbone: input must be [B, C, H, W] with even H and W "
                             f"(the heads upsample x2), got {tuple(x.shape)}")
        s1 = self.enc1(x)
        s2 = self.enc2(s1)
        s3 = self.enc3(s2)
        z = self.enc4(s3)
        z = self.dec3(self._up_cat(z, s3))
        z = self.dec2(self._up_cat(z, s2))
        return self.dec1(self._up_cat(z, s1))

    if TYPE_CHECKING:  # typed call (``nn.Module.__call__`` returns ``Any``), for checkers only
        def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class PositiveDepth(nn.Module):
    """``softplus``: depth is positive, and unlike ``exp`` its gradient does not explode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)

    if TYPE_CHECKING:  # typed call (``nn.Module.__call__`` returns ``Any``), for checkers only
        def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class UnitNormals(nn.Module):
    """Per-pixel L2 normalisation of a ``[B, 3, H, W]`` normal map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unit_normalize(x, dim=1, eps=1e-6)

    if TYPE_CHECKING:  # typed call (``nn.Module.__call__`` returns ``Any``), for checkers only
        def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def dense_head(spec: TaskSpec, in_channels: int, hidden: int,
               depth_init: float | None = None) -> nn.Sequential:
    """The head of one dense task, on half-resolution features: ConvBlock -> 1x1 conv ->
    bilinear x2 upsampling to the input size -> output activation (after the upsampling, so
    depth stays positive and normals unit).

    ``depth_init`` (metres) sets the depth head's output bias to ``softplus^-1(depth_init)``, so
    training starts at a sensible depth; it should be a constant of the benchmark, not a
    statistic of the training set, so a model retrained without the forget set starts identically.
    """
    def upsample() -> nn.Upsample:
        return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

    if spec.kind == "segmentation":
        assert spec.num_classes is not None
        return nn.Sequential(ConvBlock(in_channels, hidden),
                             nn.Conv2d(hidden, spec.num_classes, 1), upsample())
    if spec.kind == "depth":
        out = nn.Conv2d(hidden, 1, 1)
        if depth_init is not None:
            if depth_init <= 0:
                raise ValueError(f"dense_head: `depth_init` must be > 0, got {depth_init}")
            assert out.bias is not None  # Conv2d's default bias=True
            with torch.no_grad():
                # softplus^-1(y) = y + log(1 - exp(-y)), stable for large y.
                out.bias.fill_(depth_init + math.log(-math.expm1(-depth_init)))
        return nn.Sequential(ConvBlock(in_channels, hidden), out, upsample(), PositiveDepth())
    if spec.kind == "normals":
        return nn.Sequential(ConvBlock(in_channels, hidden), nn.Conv2d(hidden, 3, 1), upsample(),
                             UnitNormals())
    raise ValueError(f"dense_head: task {spec.name!r} of kind {spec.kind} is not a dense task")


class DenseMultiTaskNet(MultiTaskModel):
    """:class:`DenseBackbone` shared by one :func:`dense_head` per task.

    Outputs: segmentation logits ``[B, C, H, W]``; depth ``[B, 1, H, W]`` (positive); normals
    ``[B, 3, H, W]`` (unit length).

    Args:
        tasks: dense task specs (segmentation, depth, normals).
        in_channels: input channels (3 for RGB).
        widths: the four encoder widths; the shared features have ``widths[0]`` channels.
        head_hidden: hidden channels of each head (default ``widths[0]``).
        depth_init: initial depth prediction in metres (see :func:`dense_head`).
    """

    def __init__(self, tasks: Sequence[TaskSpec], in_channels: int = 3,
                 widths: Sequence[int] = (16, 32, 48, 64), head_hidden: int | None = None,
                 depth_init: float | None = None) -> None:
        backbone = DenseBackbone(in_channels, widths)
        hidden = head_hidden or backbone.out_channels
        heads = {t.name: dense_head(t, backbone.out_channels, hidden, depth_init) for t in tasks}
        super().__init__(backbone, heads, tasks)
