"""The device half of the input pipeline: a whole `ClipBatch` of uint8 crops becomes the float
model input in a few batched ops on the training device (GPU, or the CPU without one).

    frames uint8 (B, n, H, W, 3) + per-clip (h, w, flip, brightness, contrast)
      -> resize each clip's h x w crop to size x size (antialiased), mirrored where flip
      -> brightness, contrast -> (x / 255 - mean) / std   ->   float32 (B, 3, n, size, size)

Definitions, and how they differ from the torchvision uint8 ops the CPU transform used before:
- Resize: the antialiased bilinear filter of `torch.nn.functional.interpolate(...,
  antialias=True)` and PIL (a triangle filter widened by the downscale factor, weights
  renormalised at the borders), written as two weight matrices per clip (`resize_weights`), so
  clips with different crop boxes and frame sizes share one batched matrix product, zero
  padding never contributes, and a flip is the same matrix mirrored. On float input it equals
  `interpolate(antialias=True)` to float rounding (tested); a box already of the output size
  passes unchanged.
- Brightness: torchvision's `adjust_brightness`, `clamp(x * b, 0, 255)`.
- Contrast: torchvision's `adjust_contrast`, `clamp(c * x + (1 - c) * m, 0, 255)` with `m` the
  mean grey level (0.2989 R + 0.587 G + 0.114 B) of each frame.
- What differs: every step stays float32. torchvision's uint8 path rounded the resize to
  integers, truncated after brightness and after contrast, and floored the grey levels before
  their mean; the two results differ by about one grey level (1/255), at most a few where the
  rounding steps compound (measured bound in tests/test_augment.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .data import AUG_FIELDS, ClipBatch

GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
_H, _W, _FLIP, _BRIGHTNESS, _CONTRAST = (AUG_FIELDS.index(f) for f in
                                        ("height", "width", "flip", "brightness", "contrast"))


def resize_weights(lengths: torch.Tensor, out_size: int, padded: int,
                   flip: torch.Tensor | None = None) -> torch.Tensor:
    """`(B, out_size, padded)` weights that resample each row's first `lengths[b]` pixels to
    `out_size` pixels with antialiased bilinear interpolation (half-pixel centres, as
    `interpolate(align_corners=False, antialias=True)`); rows of `flip` come out mirrored."""
    lengths = lengths.to(torch.float64)  # small matrices; float32 put the filter centres 1e-5 px off
    scale = lengths / out_size                         # input pixels per output pixel
    support = scale.clamp(min=1.0)                     # triangle half-width: wider when shrinking
    centres = (torch.arange(out_size, device=lengths.device, dtype=torch.float64) + 0.5)[None, :] * scale[:, None]
    pixels = torch.arange(padded, device=lengths.device, dtype=torch.float64) + 0.5
    distance = (pixels[None, None, :] - centres[:, :, None]) / support[:, None, None]
    weights = (1 - distance.abs()).clamp(min=0) * (pixels[None, None, :] < lengths[:, None, None])
    weights = weights / weights.sum(-1, keepdim=True)
    if flip is not None:
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
    return weights.to(torch.float32)


def resize_crops(x: torch.Tensor, aug: torch.Tensor, size: int) -> torch.Tensor:
    """float `(B, 3, n, H, W)` whose clip b holds its crop in `[:h_b, :w_b]` -> `(B, 3, n, size,
    size)`, flipped horizontally where `aug` says so."""
    wy = resize_weights(aug[:, _H], size, x.shape[-2])
    wx = resize_weights(aug[:, _W], size, x.shape[-1], flip=aug[:, _FLIP] > 0.5)
    x = torch.einsum("bcthw,bvw->bcthv", x, wx)
    return torch.einsum("bcthv,buh->bctuv", x, wy)


def jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Brightness then contrast, per clip, on float pixels in [0, 255] `(B, 3, n, H, W)`."""
    shape = (-1, 1, 1, 1, 1)
    x = (x * brightness.view(shape)).clamp_(0, 255)
    grey_weights = torch.tensor(GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1, 1)
    grey_mean = (x * grey_weights).sum(1, keepdim=True).mean(dim=(-2, -1), keepdim=True)
    contrast = contrast.view(shape)
    return (x * contrast + grey_mean * (1 - contrast)).clamp_(0, 255)


@dataclass(frozen=True)
class DeviceTransform:
    """`ClipBatch` -> normalised float32 model input `(B, 3, n, size, size)` on `device`."""

    size: int
    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, batch: ClipBatch, device: torch.device) -> torch.Tensor:
        aug = batch.aug  # still on the CPU: deciding what to skip costs no device sync
        frames = batch.frames.to(device, non_blocking=True)
        x = frames.permute(0, 4, 1, 2, 3).to(torch.float32, memory_format=torch.contiguous_format)
        same_size = bool((aug[:, [_H, _W]] == self.size).all()) and x.shape[-1] == x.shape[-2] == self.size
        if not same_size or bool(aug[:, _FLIP].any()):
            x = resize_crops(x, aug.to(device, non_blocking=True), self.size)
        if bool((aug[:, [_BRIGHTNESS, _CONTRAST]] != 1).any()):
            factors = aug[:, [_BRIGHTNESS, _CONTRAST]].to(device, non_blocking=True)
            x = jitter(x, factors[:, 0], factors[:, 1])
        return normalize_float(x, self.mean, self.std)


def normalize_float(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float pixels in [0, 255] `(..., 3, T, H, W)` -> `(x/255 - mean) / std` per channel, in place."""
    channels = x.shape[-4]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values, got {list(mean)} and {list(std)}")
    shape = (channels, 1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(shape)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    return x.div_(255).sub_(mean_t).div_(std_t)


def normalize(clips: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 clips `(..., 3, T, H, W)` already at the input size -> float32 `(x/255 - mean) / std`."""
    if clips.dtype != torch.uint8:  # a float input would be normalised twice
        raise ValueError(f"normalize expects uint8 clips, got {clips.dtype}")
    return normalize_float(clips.to(torch.float32), mean, std)


class ClipLoader:
    """What the training loop iterates: `ClipBatch`es (a data.BatchLoader) plus the device half
    of the transform (`to_device`), so the loop reads the same for clips and cached features."""

    def __init__(self, loader, transform: DeviceTransform) -> None:
        self.loader, self.transform = loader, transform

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def to_device(self, batch: ClipBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(batch, device), batch.labels.to(device, non_blocking=True)
