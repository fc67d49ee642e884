"""`--model_ema`: an exponential moving average of the model's weights (timm's `ModelEmaV3`),
updated after every optimizer step; validation and the best checkpoint use it.

Decay at optimizer step k (1-based) is timm's warm-up `min(D, 1 - k^-p)` with p = 3/4, so the
average is `e_1 = w_1`, `e_k = d_k·e_{k-1} + (1-d_k)·w_k` over every float tensor of the state
dict (integer buffers are copied). Why the warm-up, with p = 3/4 and D = 0.999 by default: a
run here has a few hundred optimizer steps, and a fixed decay of 0.999 (or the official
0.9999) would leave the EMA at 0.999^300 ≈ 74% the initial weights after 300 steps. With the
warm-up the EMA averages about the last k^0.75 steps (72 of 300, 178 of 1000: the tail of the
run); p = 3/4 is timm's suggestion for shorter training than its default 2/3. D only caps the
decay once 1 - k^-0.75 exceeds it (step 10,000 for 0.999), in long runs.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from .config import TrainConfig

EMA_WARMUP_POWER = 0.75


def ema_decay(step: int, cap: float) -> float:
    """The decay of optimizer step `step` (1-based): 0 at step 1, then `min(cap, 1 - step^-p)`."""
    return min(cap, 1.0 - step ** -EMA_WARMUP_POWER) if step > 1 else 0.0


class WeightEma:
    """The EMA of `model`'s state dict; `module` is a copy of the model holding it (eval mode)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.source = model
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=EMA_WARMUP_POWER)

    @classmethod
    def from_config(cls, model: nn.Module, config: TrainConfig) -> WeightEma | None:
        return cls(model, config.model_ema_decay) if config.model_ema else None

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def update(self, step: int) -> None:
        """Fold in the model's weights after optimizer step `step` (1-based, the run's count)."""
        self.ema.update(self.source, step=step)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.module.load_state_dict(state)
