"""Backbone + head, fine-tune modes and optimizer parameter groups.

The classifier is deliberately thin: `backbone(x) -> (B, hidden)`, then dropout + linear to two
classes (index 1 = header, so `prob_header = softmax(logits)[:, 1]`). Which backbone weights
train is decided here, once, by `requires_grad`; the optimizer only ever sees trainable
parameters, so a "frozen" backbone cannot drift and `partial` trains exactly the last N blocks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import TrainConfig
from .errors import fail


class ClassifierHead(nn.Module):
    """Dropout + linear to 2 logits (non-header, header)."""

    def __init__(self, in_features: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


class HeaderClassifier(nn.Module):
    """A backbone with a 2-class head. A frozen backbone runs in eval mode under no_grad."""

    def __init__(self, backbone: nn.Module, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ClassifierHead(backbone.num_features, dropout)
        self.finetune_mode = "full"
        self.bn_frozen = False   # --bn_frozen: every backbone BatchNorm stays in eval mode

    @property
    def backbone_frozen(self) -> bool:
        return self.finetune_mode == "frozen"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone_frozen:
            with torch.no_grad():
                features = self.backbone(x)
        else:
            features = self.backbone(x)
        return self.head(features)

    def train(self, mode: bool = True) -> HeaderClassifier:
        super().train(mode)
        if mode and (self.finetune_mode != "full" or self.bn_frozen):
            # Frozen weights must not change through BatchNorm running statistics either
            # (DataParallel replicas copy the mode; DDP's SyncBatchNorm and GlobalBatchNorm3d
            # are _BatchNorm too).
            if self.backbone_frozen:
                self.backbone.eval()
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm) and not any(
                        p.requires_grad for p in module.parameters(recurse=False)):
                    module.eval()
        return self


def configure_finetune(model: HeaderClassifier, mode: str, unfreeze_blocks: int) -> None:
    """Set `requires_grad` per `--finetune_mode`: full, frozen, or partial (last N blocks plus
    what follows them, e.g. VideoMAE's final norm)."""
    backbone = model.backbone
    model.finetune_mode = mode
    for param in backbone.parameters():
        param.requires_grad_(mode == "full")
    if mode == "partial":
        blocks = backbone.block_list()
        if unfreeze_blocks > len(blocks):
            fail(f"--unfreeze_blocks {unfreeze_blocks} exceeds the backbone's {len(blocks)} blocks")
        for module in [*blocks[-unfreeze_blocks:], *backbone.post_block_modules()]:
            for param in module.parameters():
                param.requires_grad_(True)
    for param in model.head.parameters():
        param.requires_grad_(True)


def freeze_batchnorm(model: HeaderClassifier) -> None:
    """mmaction2's `norm_eval` + `bn_frozen`: the backbone's BatchNorm layers keep their running
    statistics (`train()` leaves them in eval mode) and their affine parameters do not train
    (no gradient, so no optimizer group holds them)."""
    model.bn_frozen = True
    for module in model.backbone.modules():
        if isinstance(module, _BatchNorm):
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)


def build_classifier(backbone: nn.Module, config: TrainConfig) -> HeaderClassifier:
    model = HeaderClassifier(backbone, config.head_dropout)
    configure_finetune(model, config.finetune_mode, config.unfreeze_blocks)
    if config.bn_frozen:
        freeze_batchnorm(model)
    if config.drop_path and hasattr(backbone, "set_drop_path"):  # VideoMAE (CSN: warned)
        backbone.set_drop_path(config.drop_path)
    if config.gradient_checkpointing:
        backbone.set_grad_checkpointing(True)
    return model


def param_groups(model: HeaderClassifier, config: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups: backbone at `lr_backbone` (times a per-layer `lr_scale` with
    `--layer_decay`), head at `lr_head`; no weight decay on 1-d params (norms, biases).

    VideoMAE's pooling norm (`fc_norm`, Giant's `norm`) is backbone: `lr_backbone` at scale 1.
    The official code gives it the head's layer id, i.e. scale 1 of its one base LR; here the
    head LR is meant for the randomly initialised linear layer (20x the backbone's by default),
    while `fc_norm` is pre-trained and loaded from the checkpoint, so it takes the backbone's
    LR at the head's scale. With one LR for both (lr_head = lr_backbone) the two rules agree."""
    groups: list[dict[str, Any]] = []
    if config.trains_backbone:
        if config.layer_decay is not None:
            backbone_groups = param_groups_layer_decay(
                model.backbone, weight_decay=config.weight_decay, layer_decay=config.layer_decay)
        else:
            backbone_groups = param_groups_weight_decay(model.backbone, weight_decay=config.weight_decay)
        for group in backbone_groups:
            # `initial_lr` is the unscaled base the timm scheduler starts from (it multiplies
            # by `lr_scale` itself); `lr` is already scaled so `--scheduler none` honours it too.
            groups.append({**group, "lr": config.lr_backbone * group.get("lr_scale", 1.0),
                           "initial_lr": config.lr_backbone, "name": "backbone"})
    for group in param_groups_weight_decay(model.head, weight_decay=config.weight_decay):
        groups.append({**group, "lr": config.lr_head, "name": "head"})
    return [g for g in groups if g["params"]]


def build_optimizer(model: HeaderClassifier, config: TrainConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """SGD or AdamW over `param_groups`; `fused` (the trainer sets it on CUDA) runs AdamW's
    update as one kernel instead of one per parameter group and op."""
    groups = param_groups(model, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr_head, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr_head, betas=tuple(config.betas), fused=fused or None)


COMPILE_BACKEND: Any = "inductor"  # tests swap in a backend that fails


class CompiledWithFallback(nn.Module):
    """`torch.compile(module)` that falls back to `module` itself, once and with a message,
    when compiling fails. torch.compile is lazy: most failures (no C compiler, an unsupported
    op) surface at the first forward, which is where they are caught."""

    def __init__(self, module: nn.Module, log: Callable[[str], None]) -> None:
        super().__init__()
        self.eager = module
        self.log = log
        self.failed = False
        try:
            self.compiled: Callable[..., Any] = torch.compile(module, backend=COMPILE_BACKEND)
        except Exception as exc:  # noqa: BLE001 - any compile failure means "run eagerly"
            self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        self.failed = True
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        self.log(f"warning: --compile failed ({type(exc).__name__}: {reason}); training continues "
                 f"without torch.compile")

    def forward(self, *args: Any) -> Any:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001
                self._fall_back(exc)
        return self.eager(*args)


def nominal_lr(optimizer: torch.optim.Optimizer, name: str) -> float:
    """The current LR of a group family without its layer-decay scale (what the user set,
    after warmup/cosine), or NaN when the family has no group (frozen backbone)."""
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return group["lr"] / group.get("lr_scale", 1.0)
    return float("nan")
