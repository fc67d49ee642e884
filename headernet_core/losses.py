"""Training losses: plain cross-entropy or the 2-class focal loss upstream trains with.

Headers are rare (often 1 positive in tens of negatives), so the default is focal loss: it
down-weights the many easy negatives ((1 - p_t)^gamma) and weights the positive class by alpha.

Label smoothing (`--label_smoothing E`) replaces the one-hot target by q = (1 - E) one-hot + E/2,
as `F.cross_entropy(label_smoothing=E)` does. Focal loss is defined for any such soft target q
as the q-weighted sum of its per-class terms, -sum_c alpha_c q_c (1 - p_c)^gamma log p_c, which
is the usual focal loss for a one-hot q (and half the smoothed CE for gamma 0, alpha 0.5).
Both losses also accept soft targets `(B, 2)` directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSS_NAMES: tuple[str, ...] = ("ce", "focal")


class FocalLoss(nn.Module):
    """alpha_t * (1 - p_t)^gamma * CE on a 2-class softmax, mean over the batch.

    alpha_t is `alpha` for label 1 (header) and 1 - alpha for label 0. Computed in float32 with
    autocast off, from log_softmax, so fp16/bf16 logits and large logit gaps stay finite.

    Soft targets (float `(B, 2)` rows of class weights, as mixup/cutmix make them) give
    `sum_c y_c * alpha_c * (1 - p_c)^gamma * -log p_c`: the hard-label loss where a row is
    one-hot, and linear in the targets, so a mixed target's loss is λ·loss(y_i) +
    (1-λ)·loss(y_j), the mixup loss of the official recipe with focal in place of CE.
    """

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"focal alpha must be in [0, 1], got {alpha}")
        if gamma < 0.0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, label_smoothing={self.label_smoothing}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise ValueError(f"FocalLoss expects logits of shape (B, 2), got {tuple(logits.shape)}")
        if target.shape not in (logits.shape[:1], logits.shape):
            raise ValueError(f"target shape {tuple(target.shape)} does not match batch size "
                             f"{logits.shape[0]}")
        # Labels are their one-hot rows (then smoothed): one formula serves labels and soft
        # targets (see the module text). Low-precision exp/log lose the small (1 - p) of
        # confident clips: compute in fp32.
        with torch.autocast(device_type=logits.device.type, enabled=False):
            log_p = F.log_softmax(logits.float(), dim=1)
            q = target.float() if target.ndim == 2 else F.one_hot(target.long(), 2).float()
            q = q * (1.0 - self.label_smoothing) + self.label_smoothing / 2
            loss = -log_p
            if self.gamma != 0.0:
                # 1 - p via expm1 keeps precision when p is close to 1. The clamp keeps the
                # gradient of x^gamma (gamma < 1) finite at x = 0, where the loss is 0 anyway.
                one_minus_p = (-torch.expm1(log_p)).clamp_min(torch.finfo(torch.float32).tiny)
                loss = one_minus_p.pow(self.gamma) * loss
            # alpha_c as Python floats: no tensor copied to the device at every batch
            weighted = torch.stack((q[:, 0] * (1.0 - self.alpha), q[:, 1] * self.alpha), dim=1)
            return (weighted * loss).sum(dim=1).mean()


def build_loss(name: str, *, focal_alpha: float, focal_gamma: float,
               label_smoothing: float = 0.0) -> nn.Module:
    """The loss named by `--loss`: "ce" (unweighted cross-entropy) or "focal", with
    `label_smoothing` E (targets (1 - E) one-hot + E/2)."""
    if name == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if name == "focal":
        return FocalLoss(alpha=focal_alpha, gamma=focal_gamma, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSS_NAMES)}")
