"""ir-CSN (interaction-reduced channel-separated 3-D ResNet) with mmaction2's module names.

Names equal mmaction2's `ResNet3dCSN` keys (`conv1.conv`, `layerS.B.conv2.0.bn`, ...), so the
public mmaction2 weights load as a strict copy once `backbone.`/`cls_head.` are handled. The
semantics are mmaction2's too (BN eps 1e-3, no pool2, temporal and spatial stride 2 in stages
2-4), not upstream header_net's trimmed copy (BN named `norm`, eps 1e-5). Depth and width are
read from a checkpoint's shapes, so any ir-CSN depth/width loads.

Order: blocks, model class, checkpoint conversion/loading (the config and the variant
table are in `configs.py`, without torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..errors import fail
from .base import (Backbone, load_into, require_path, strip_prefixes, torch_load_dict,
                   unwrap_state_dict)
from .configs import EXPANSION, STAGE_STRIDES, CSNConfig


# --- blocks -----------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """Bias-free Conv3d + BatchNorm3d (+ ReLU): mmcv's ConvModule with its `conv`/`bn` names."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], *, eps: float,
                 stride: tuple[int, int, int] = (1, 1, 1), padding: tuple[int, int, int] = (0, 0, 0),
                 groups: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=padding, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm3d(cout, eps=eps, momentum=0.1)
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class IrBottleneck(nn.Module):
    """1x1x1 reduce -> depthwise 3x3x3 (carries the stride) -> 1x1x1 expand, + shortcut.

    `conv2` is a one-element Sequential because mmaction2's is (its "ip" mode puts a second
    unit there), which gives the checkpoint keys `conv2.0.*`.
    """

    def __init__(self, inplanes: int, planes: int, stride: int, eps: float) -> None:
        super().__init__()
        strides = (stride, stride, stride)
        self.conv1 = ConvBN(inplanes, planes, (1, 1, 1), eps=eps)
        self.conv2 = nn.Sequential(ConvBN(planes, planes, (3, 3, 3), eps=eps, stride=strides,
                                          padding=(1, 1, 1), groups=planes))
        self.conv3 = ConvBN(planes, planes * EXPANSION, (1, 1, 1), eps=eps, relu=False)
        self.downsample: ConvBN | None = None
        if stride != 1 or inplanes != planes * EXPANSION:
            self.downsample = ConvBN(inplanes, planes * EXPANSION, (1, 1, 1), eps=eps,
                                     stride=strides, relu=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.relu(out + identity)


# --- model ------------------------------------------------------------------------------------
class IrCSN(Backbone):
    """ir-CSN: float (B, C, T, H, W) -> globally average-pooled last stage (B, num_features).

    Any T, H, W work (each strided stage maps T -> ceil(T/2)).
    """

    def __init__(self, config: CSNConfig) -> None:
        super().__init__()
        self.config = config
        self.num_features = config.num_features
        eps, width = config.bn_eps, config.base_channels
        self.conv1 = ConvBN(config.in_chans, width, (3, 7, 7), eps=eps, stride=(1, 2, 2),
                            padding=(1, 3, 3))
        self.maxpool = nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        inplanes = width
        for i, (blocks, stride) in enumerate(zip(config.stage_blocks, STAGE_STRIDES)):
            planes = width * 2 ** i
            layer = nn.Sequential(*(IrBottleneck(inplanes if b == 0 else planes * EXPANSION, planes,
                                                 stride if b == 0 else 1, eps)
                                    for b in range(blocks)))
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * EXPANSION
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.config.in_chans:
            fail(f"ir-CSN expects clips shaped (B, {self.config.in_chans}, T, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self.conv1(x))
        for block in self.block_list():
            x = self.run_block(block, x)
        return self.pool(x).flatten(1)

    def block_list(self) -> list[nn.Module]:
        return [block for i in range(len(self.config.stage_blocks)) for block in getattr(self, f"layer{i + 1}")]


def _init_weights(module: nn.Module) -> None:
    """mmaction2's init_weights for training from scratch: Kaiming (fan_out) convs (BatchNorm
    starts at 1 and 0 already)."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


# --- checkpoint conversion and loading ----------------------------------------------------------
WRAPPER_PREFIXES = ("module.", "backbone.")
DROPPED_PREFIXES = ("cls_head.",)


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmaction2 Recognizer3D / backbone-only keys -> our keys: strip prefixes, drop the head,
    and add the `num_batches_tracked` counters some files leave out (unused: momentum is set)."""
    out = {k: v for k, v in strip_prefixes(state, WRAPPER_PREFIXES).items()
           if not k.startswith(DROPPED_PREFIXES)}
    for key in [k for k in out if k.endswith(".bn.running_mean")]:
        counter = key[: -len("running_mean")] + "num_batches_tracked"
        out.setdefault(counter, torch.zeros((), dtype=torch.long))
    return out


def infer_config(state: Mapping[str, torch.Tensor], source: str) -> CSNConfig:
    """Stem width and blocks per stage from the state dict's names and shapes."""
    stem = state.get("conv1.conv.weight")
    if stem is None or stem.ndim != 5:
        fail(f"{source}: no 5-D conv1.conv.weight, so this is not an mmaction2 ir-CSN state "
             f"dict (first keys: {', '.join(list(state)[:4])})")
    blocks = []
    for stage in range(1, 5):
        ids = {int(k.split(".")[1]) for k in state
               if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        if not ids or ids != set(range(len(ids))):
            fail(f"{source}: expected residual blocks layer{stage}.0..N-1, found "
                 f"{sorted(ids)[:8] or 'none'}")
        blocks.append(len(ids))
    return CSNConfig(stage_blocks=tuple(blocks), base_channels=int(stem.shape[0]),
                     in_chans=int(stem.shape[1]))


def load_ircsn(source: str | Path) -> tuple[IrCSN, CSNConfig]:
    """An ir-CSN from an mmaction2 checkpoint (Recognizer3D or backbone-only, wrapped in
    `state_dict` or flat), strictly, in eval mode."""
    path = require_path(source, "an mmaction2 ir-CSN checkpoint file (.pth)")
    if path.is_dir():
        fail(f"{path}: is a folder; expected an mmaction2 ir-CSN checkpoint file (.pth)")
    raw = unwrap_state_dict(torch_load_dict(path), path, ("state_dict", "model", "module"))
    state = convert_state_dict(raw)
    config = infer_config(state, str(path))
    hint = (f"Inferred ir-CSN with blocks {config.stage_blocks} and base width "
            f"{config.base_channels}")
    if any(".norm." in k for k in state):
        hint += ("; keys with '.norm.' look like upstream header_net's own CSN layout (BN named "
                 "'norm', eps 1e-5), which is not mmaction2's and is not supported")
    model = load_into(lambda: IrCSN(config), state, str(path), hint=hint)
    return model, config

