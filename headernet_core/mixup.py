"""Mixup and cutmix of whole clips, with the semantics of timm's `Mixup` (the VideoMAE v2
fine-tuning recipe) in its default "batch" mode, and soft targets for the loss.

Per batch, with probability `mixup_prob`, one weight λ is drawn: from Beta(cutmix, cutmix)
for cutmix (chosen with probability `mixup_switch_prob` when both alphas are on) else from
Beta(mixup, mixup). Clip i is mixed with clip B-1-i (the batch flipped, as timm pairs them):
- mixup: `λ·x_i + (1-λ)·x_{B-1-i}`;
- cutmix: one box of area ≈ (1-λ)·H·W, at a uniform centre and clipped to the frame, is copied
  from clip B-1-i onto clip i on every frame and channel (timm on a 5-D clip would paste it
  over T×H); λ is then corrected to 1 - box area / (H·W), timm's `correct_lam`.
Targets become `λ·onehot(y_i) + (1-λ)·onehot(y_{B-1-i})`; accuracy stays on the hard labels.

Why not timm's class: it asserts an even batch and draws from numpy's global RNG. Here the
draws come from a generator seeded by (seed, epoch, batch index), so a resumed run mixes
exactly like an uninterrupted one, and an odd batch is allowed: its middle clip is paired with
itself, so it and its target stay unmixed (the epoch's last, shorter batch is often odd).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import TrainConfig

# Distinguishes the mixing draws from the other (seed, epoch, ...) streams of a run.
MIX_STREAM = 0x6D6978
NUM_CLASSES = 2


@dataclass(frozen=True)
class MixDraw:
    """One batch's draw: `lam` is the weight of each clip's own content and label (after the
    cutmix box correction); `box` = (y0, y1, x0, x1) for cutmix, None for mixup or no mixing."""
    lam: float
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ClipMix:
    """Mixup/cutmix of a training batch `(B, C, T, H, W)` (see the module docstring)."""
    mixup: float
    cutmix: float
    prob: float
    switch_prob: float
    seed: int

    @classmethod
    def from_config(cls, config: TrainConfig) -> ClipMix | None:
        if not config.mixes:
            return None
        return cls(config.mixup, config.cutmix, config.mixup_prob, config.mixup_switch_prob, config.seed)

    def draw(self, epoch: int, batch: int, height: int, width: int) -> MixDraw:
        """The draw of batch `batch` (0-based) of epoch `epoch`, the same in every process."""
        rng = np.random.default_rng([self.seed, MIX_STREAM, epoch, batch])
        if not rng.random() < self.prob:
            return MixDraw(1.0)
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return MixDraw(lam)
        box = cutmix_box(rng, lam, height, width)
        y0, y1, x0, x1 = box
        return MixDraw(1.0 - (y1 - y0) * (x1 - x0) / (height * width), box)

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor, epoch: int, batch: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed clips and soft targets `(B, 2)` for batch `batch` of `epoch`."""
        draw = self.draw(epoch, batch, inputs.shape[-2], inputs.shape[-1])
        return mix_clips(inputs, draw), mix_targets(labels, draw.lam)


def cutmix_box(rng: np.random.Generator, lam: float, height: int, width: int
               ) -> tuple[int, int, int, int]:
    """timm's `rand_bbox`: sides sqrt(1-λ)·(H, W), a uniform centre, clipped to the frame."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = (int(np.clip(v, 0, height)) for v in (cy - cut_h // 2, cy + cut_h // 2))
    x0, x1 = (int(np.clip(v, 0, width)) for v in (cx - cut_w // 2, cx + cut_w // 2))
    return y0, y1, x0, x1


def mix_clips(inputs: torch.Tensor, draw: MixDraw) -> torch.Tensor:
    """Clip i mixed with clip B-1-i: by λ, or the box pasted on every frame and channel."""
    if draw.box is not None:
        y0, y1, x0, x1 = draw.box
        mixed = inputs.clone()
        mixed[..., y0:y1, x0:x1] = inputs.flip(0)[..., y0:y1, x0:x1]
        return mixed
    if draw.lam == 1.0:
        return inputs
    return inputs * draw.lam + inputs.flip(0) * (1.0 - draw.lam)


def mix_targets(labels: torch.Tensor, lam: float) -> torch.Tensor:
    """`λ·onehot(y_i) + (1-λ)·onehot(y_{B-1-i})`, float32 `(B, 2)`."""
    one_hot = F.one_hot(labels.long(), NUM_CLASSES).to(torch.float32)
    return one_hot * lam + one_hot.flip(0) * (1.0 - lam)
