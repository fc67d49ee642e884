"""Every backbone as plain values, without torch: the architecture dataclasses (a published
VideoMAE v2 `config.json`'s `model_config`; an ir-CSN's depth and width), the named variants and
the folders the published VideoMAE checkpoints are looked for in.

Torch-free on purpose: a search driver checks every trial's clip shape against its backbone
before Ray starts (`headernet_core.backbones.check_geometry`) and needs only these values;
importing torch and timm for them cost its start and its exit seconds (docs/performance.md).
The model modules (`videomae.py`, `csn.py`) build from these configs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..errors import fail

# --- VideoMAE v2 -------------------------------------------------------------------------------
LAYER_NORM_NAMES = ("nn.LayerNorm", "LayerNorm", "torch.nn.LayerNorm")


@dataclass(frozen=True)
class VideoMAEConfig:
    """The 22 keys of a published `config.json["model_config"]`, same names and meaning.

    Keys that only matter to the reference training code (num_classes, drop rates, with_cp,
    norm_layer) are validated and otherwise ignored; options no released model uses
    (layer scale, learnable position embedding, cosine attention) are rejected.
    """

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    layer_norm_eps: float
    tubelet_size: int
    use_mean_pooling: bool
    in_chans: int = 3
    num_classes: int = 0
    qk_scale: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_layer: str = "nn.LayerNorm"
    init_values: float = 0.0
    use_learnable_pos_emb: bool = False
    with_cp: bool = False
    num_frames: int = 16
    cos_attn: bool = False

    @property
    def mlp_hidden(self) -> int:
        """int(embed_dim * mlp_ratio) like the reference, without float error: Giant's
        1408 * 4.3636... must give the 6144 of its checkpoint, not 6143."""
        product = self.embed_dim * self.mlp_ratio
        nearest = round(product)
        return int(nearest) if abs(product - nearest) < 1e-6 * max(1.0, product) else int(product)

    @classmethod
    def from_model_config(cls, values: Mapping[str, Any], source: str) -> VideoMAEConfig:
        """Validate a `model_config` mapping; errors name `source` and the key."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            fail(f"{source}: unknown model_config key(s) {', '.join(unknown)}; "
                 f"expected the VideoMAE v2 keys {', '.join(fields)}")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in values]
        if missing:
            fail(f"{source}: model_config is missing key(s) {', '.join(missing)}")
        return cls(**{name: _check_value(source, name, values[name]) for name in values})._validated(source)

    def to_model_config(self) -> dict[str, Any]:
        """The `model_config` dict of a checkpoint folder's `config.json`."""
        return dataclasses.asdict(self)

    def _validated(self, source: str) -> VideoMAEConfig:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "tubelet_size", "num_frames"):
            if getattr(self, name) < 1:
                fail(f"{source}: model_config {name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            fail(f"{source}: model_config num_classes must be >= 0, got {self.num_classes}")
        if self.embed_dim % self.num_heads:
            fail(f"{source}: model_config embed_dim {self.embed_dim} is not divisible by "
                 f"num_heads {self.num_heads}")
        if not self.mlp_ratio > 0 or not self.layer_norm_eps > 0:
            fail(f"{source}: model_config mlp_ratio and layer_norm_eps must be > 0, got "
                 f"{self.mlp_ratio} and {self.layer_norm_eps}")
        if self.qk_scale is not None and not self.qk_scale > 0:
            fail(f"{source}: model_config qk_scale must be null or > 0, got {self.qk_scale}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0 <= getattr(self, name) < 1:
                fail(f"{source}: model_config {name} must be in [0, 1), got {getattr(self, name)}")
        if self.norm_layer not in LAYER_NORM_NAMES:
            fail(f"{source}: model_config norm_layer {self.norm_layer!r} is not supported; "
                 f"expected \"nn.LayerNorm\"")
        for name, what, instead in (("init_values", f"init_values {self.init_values} (layer scale)", "use 0"),
                                    ("use_learnable_pos_emb", "use_learnable_pos_emb true", "use the fixed sin-cos table"),
                                    ("cos_attn", "cos_attn true", "use plain softmax attention")):
            if getattr(self, name):
                fail(f"{source}: model_config {what} is not supported; the released models {instead}")
        return self


def _check_value(source: str, name: str, value: Any) -> Any:
    """Type-check one model_config value against the dataclass field (JSON types)."""
    where = f"{source}: model_config {name}"
    kind = {f.name: f.type for f in dataclasses.fields(VideoMAEConfig)}[name]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"{where} must be an integer, got {value!r}")
    elif kind in ("float", "float | None"):
        if value is None and kind == "float | None":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(f"{where} must be a number, got {value!r}")
        return float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            fail(f"{where} must be true or false, got {value!r}")
    elif kind == "str" and not isinstance(value, str):
        fail(f"{where} must be a string, got {value!r}")
    return value


def read_config_json(path: Path) -> VideoMAEConfig:
    """`config.json` -> VideoMAEConfig from its `model_config` dict (never runs its code)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path}: not readable JSON ({' '.join(str(exc).split())})")
    if not isinstance(data, dict) or not isinstance(data.get("model_config"), dict):
        fail(f"{path}: expected a JSON object with a \"model_config\" dict (the VideoMAE v2 "
             f"encoder settings, as in OpenGVLab/VideoMAEv2-Base)")
    return VideoMAEConfig.from_model_config(data["model_config"], str(path))


def _published(**changes: Any) -> VideoMAEConfig:
    base = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                qkv_bias=True, layer_norm_eps=1e-6, tubelet_size=2, use_mean_pooling=True)
    return VideoMAEConfig(**{**base, **changes})


VMAE_VARIANTS: dict[str, VideoMAEConfig] = {
    "base": _published(),
    "large": _published(embed_dim=1024, depth=24, num_heads=16),
    "giant": _published(patch_size=14, embed_dim=1408, depth=40, num_heads=16,
                        mlp_ratio=48 / 11, use_mean_pooling=False),
    # Random-init model for tests and the CPU demo: 8 frames at 64x64 -> 256 tokens.
    "tiny": _published(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=4,
                       num_frames=8),
}
# Folder names of the published checkpoints under --checkpoint_root (their OpenGVLab repos).
FOLDERS: dict[str, str] = {"base": "VideoMAEv2-Base", "large": "VideoMAEv2-Large",
                           "giant": "VideoMAEv2-giant"}
# What such a folder holds (the Hugging Face layout).
FOLDER_FILES = ("config.json", "model.safetensors")


def published_folder(variant: str, checkpoint_root: str | Path) -> Path | None:
    """Where the published checkpoint of `variant` is looked for without --backbone_ckpt:
    `<checkpoint_root>/VideoMAEv2-Base|Large|giant`. None for a variant that has none (tiny:
    random weights)."""
    return Path(checkpoint_root) / FOLDERS[variant] if variant in FOLDERS else None


# --- ir-CSN ------------------------------------------------------------------------------------
EXPANSION = 4
STAGE_STRIDES = (1, 2, 2, 2)  # temporal and spatial, applied by the first block of a stage
# The stem (conv stride 2, max-pool stride 2) and the stages shrink H and W 32x: a smaller frame
# leaves the last stage less than one pixel of picture (the rest is padding).
CSN_MIN_SIZE = 2 * 2 * math.prod(STAGE_STRIDES)


@dataclass(frozen=True)
class CSNConfig:
    """Blocks per stage and stem width; stage i has base_channels * 2**i planes, expansion 4."""

    stage_blocks: tuple[int, int, int, int] = (3, 4, 6, 3)
    base_channels: int = 64
    in_chans: int = 3
    bn_eps: float = 1e-3  # mmaction2's CSN value, which the public weights were trained with

    @property
    def num_features(self) -> int:
        return self.base_channels * 2 ** (len(self.stage_blocks) - 1) * EXPANSION


CSN_VARIANTS: dict[str, CSNConfig] = {
    "50": CSNConfig(stage_blocks=(3, 4, 6, 3)),
    "101": CSNConfig(stage_blocks=(3, 4, 23, 3)),
    "152": CSNConfig(stage_blocks=(3, 8, 36, 3)),
    # Random-init model for tests and the CPU demo; 512 features.
    "tiny": CSNConfig(stage_blocks=(1, 1, 1, 1), base_channels=16),
}
