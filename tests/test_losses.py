"""Losses: focal loss against cross-entropy and a hand computation, stability, precision."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from headernet_core.config import TrainConfig
from headernet_core.losses import LOSS_NAMES, FocalLoss, build_loss


def _hand_focal(l0: float, l1: float, target: int, alpha: float, gamma: float) -> float:
    """alpha_t * (1 - p_t)^gamma * -log p_t, written out with the math module."""
    log_z = math.log(math.exp(l0) + math.exp(l1))
    log_p_t = (l1 if target == 1 else l0) - log_z
    alpha_t = alpha if target == 1 else 1 - alpha
    return alpha_t * (1 - math.exp(log_p_t)) ** gamma * -log_p_t


def test_gamma_zero_alpha_half_is_half_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(16, 2) * 3
    target = torch.randint(0, 2, (16,))
    loss = FocalLoss(alpha=0.5, gamma=0.0)(logits, target)
    assert loss.item() == pytest.approx(0.5 * F.cross_entropy(logits, target).item(), rel=1e-6)


def test_hand_computed_value():
    rows = [(2.0, 0.0, 0), (0.0, 1.0, 1), (-1.0, 0.5, 0)]
    logits = torch.tensor([[a, b] for a, b, _ in rows])
    target = torch.tensor([t for _, _, t in rows])
    expected = sum(_hand_focal(a, b, t, 0.75, 2.0) for a, b, t in rows) / len(rows)
    assert expected == pytest.approx(0.1005875042, rel=1e-8)  # the number itself, for the record
    assert FocalLoss()(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_alpha_weights_the_header_class():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    per_class = [FocalLoss(alpha=0.75)(logits[:1], torch.tensor([t])).item() for t in (0, 1)]
    assert per_class[1] == pytest.approx(3 * per_class[0])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_gradient_finite_for_extreme_logits(gamma):
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4], [1e4, -1e4], [-1e4, 1e4], [88.0, -88.0]],
                          requires_grad=True)
    target = torch.tensor([0, 1, 1, 0, 0])  # confident right, confident wrong, near-saturated
    loss = FocalLoss(alpha=0.75, gamma=gamma)(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()
    # The two confidently wrong clips dominate: CE = 2e4 each with (1 - p_t) = 1.
    assert loss.item() == pytest.approx((0.75 * 2e4 + 0.25 * 2e4) / 5, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_give_float32_loss(dtype):
    torch.manual_seed(1)
    logits = torch.randn(8, 2) * 4
    target = torch.randint(0, 2, (8,))
    loss = FocalLoss()(logits.to(dtype), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(FocalLoss()(logits.to(dtype).float(), target).item(), rel=1e-6)


def test_float32_under_cpu_autocast():
    torch.manual_seed(2)
    layer = nn.Linear(4, 2)
    x = torch.randn(6, 4)
    target = torch.randint(0, 2, (6,))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = FocalLoss()(logits, target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"gamma": -1.0}, "gamma"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FocalLoss(**kwargs)


@pytest.mark.parametrize("logits, target, match", [
    (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), r"\(B, 2\)"),
    (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), "batch size"),
])
def test_bad_shapes(logits, target, match):
    with pytest.raises(ValueError, match=match):
        FocalLoss()(logits, target)


def test_build_loss():
    assert isinstance(build_loss("ce", focal_alpha=0.75, focal_gamma=2.0), nn.CrossEntropyLoss)
    focal = build_loss("focal", focal_alpha=0.6, focal_gamma=1.5)
    assert isinstance(focal, FocalLoss) and (focal.alpha, focal.gamma) == (0.6, 1.5)
    with pytest.raises(ValueError, match="ce, focal"):
        build_loss("bce", focal_alpha=0.75, focal_gamma=2.0)


def test_loss_names_match_config_choices():
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["loss"]
    assert tuple(field.metadata["choices"]) == LOSS_NAMES


def test_a_batch_builds_no_tensor_from_host_values(monkeypatch):
    """The class weights are Python floats: on a GPU, a `torch.tensor([...], device=...)` per
    batch is a host-to-device copy that waits for the stream (each training and validation step)."""
    loss = FocalLoss(alpha=0.75, gamma=2.0, label_smoothing=0.1)
    logits, labels = torch.randn(8, 2), torch.randint(0, 2, (8,))

    def no_host_tensor(*args, **kwargs):
        raise AssertionError("FocalLoss.forward built a tensor from host values")
    monkeypatch.setattr(torch, "tensor", no_host_tensor)
    assert torch.isfinite(loss(logits, labels))
