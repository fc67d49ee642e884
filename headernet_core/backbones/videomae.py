"""VideoMAE v2 encoder (OpenGVLab ViT for video), written to load the published weights as is.

Module and parameter names equal the checkpoint keys (after the HF wrapper's `model.` prefix),
so loading is a strict one-to-one copy. Numerics follow the reference code: Conv3d tubelet
embedding, a fixed 1-D sin-cos table over the flattened token index (float64, then cast),
pre-norm blocks with a k-bias-free qkv, exact GELU, and either mean pooling + `fc_norm` or
`norm` of the first patch token (Giant). The table is built for the token count actually seen,
so any T that is a multiple of the tubelet and any H, W that are multiples of the patch work.

Order: blocks, model class, checkpoint conversion/loading (the config and the variant
table are in `configs.py`, without torch).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from timm.layers import DropPath, Mlp
from torch import nn

from ..errors import fail
from .base import (Backbone, load_into, require_path, strip_prefixes, torch_load_dict,
                   unwrap_state_dict)
from .configs import VideoMAEConfig, read_config_json

logger = logging.getLogger(__name__)


# --- blocks -----------------------------------------------------------------------------------
class PatchEmbed3d(nn.Module):
    """Non-overlapping tubelet x patch x patch cubes -> tokens in (t, h, w) order."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, tubelet_size: int) -> None:
        super().__init__()
        size = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=size, stride=size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; the qkv bias is [q_bias, 0, v_bias] as in the checkpoints."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_scale: float | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block (no layer scale: the released models have none). Drop path
    (`set_drop_path`) is off until the trainer asks for it; off, the branches are plain."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool,
                 qk_scale: float | None, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden_features=mlp_hidden, act_layer=nn.GELU)  # exact (erf) GELU
        self.drop_path: nn.Module = nn.Identity()  # no parameters: checkpoints are unaffected

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sincos_table(num_tokens: int, dim: int) -> torch.Tensor:
    """(num_tokens, dim) float64 table: angle = pos / 10000^(2*floor(j/2)/dim), sin on even j,
    cos on odd j. 1-D over the flattened index, so fewer tokens give an exact prefix."""
    pos = torch.arange(num_tokens, dtype=torch.float64).unsqueeze(1)
    exponent = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)
    table = torch.empty(num_tokens, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table


# --- model ------------------------------------------------------------------------------------
class VideoMAEv2(Backbone):
    """VideoMAE v2 encoder: float (B, C, T, H, W) -> pooled feature (B, embed_dim)."""

    def __init__(self, config: VideoMAEConfig) -> None:
        super().__init__()
        self.config = config
        self.num_features = self.embed_dim = config.embed_dim
        self.patch_embed = PatchEmbed3d(config.in_chans, config.embed_dim, config.patch_size,
                                        config.tubelet_size)
        self.blocks = nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_hidden, config.qkv_bias,
                  config.qk_scale, config.layer_norm_eps) for _ in range(config.depth))
        # Only the pooling norm in use exists, so the parameter names match the checkpoint.
        ln = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.norm: nn.LayerNorm | None = None if config.use_mean_pooling else ln
        self.fc_norm: nn.LayerNorm | None = ln if config.use_mean_pooling else None
        # Position tables per (tokens, device, dtype); not parameters, not in the state dict.
        self._pos_cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self.apply(_init_weights)

    # --- forward pieces ---
    def pos_embed(self, num_tokens: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (1, N, d) sin-cos table for N tokens, computed once per (N, device, dtype)."""
        key = (num_tokens, device, dtype)
        table = self._pos_cache.get(key)
        if table is None:
            table = sincos_table(num_tokens, self.embed_dim).to(device=device, dtype=dtype)
            self._pos_cache[key] = table = table.unsqueeze(0)
        return table

    def check_input(self, x: torch.Tensor) -> None:
        """One clear line instead of a shape error deep inside the model."""
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_chans:
            fail(f"VideoMAE v2 expects clips shaped (B, {c.in_chans}, T, H, W), got {tuple(x.shape)}")
        _, _, t, h, w = x.shape
        if t < c.tubelet_size or t % c.tubelet_size:
            fail(f"VideoMAE v2 needs a frame count that is a positive multiple of its "
                 f"tubelet_size {c.tubelet_size}, got {t} frames (change --num_frames)")
        if h % c.patch_size or w % c.patch_size or not h or not w:
            fail(f"VideoMAE v2 needs H and W that are multiples of its patch_size "
                 f"{c.patch_size}, got {h}x{w} (change --input_size; native {c.img_size})")

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the tubelet embedding plus position table: (B, N, d)."""
        self.check_input(x)
        tokens = self.patch_embed(x)
        return tokens + self.pos_embed(tokens.shape[1], tokens.device, tokens.dtype)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block, before pooling: (B, N, d)."""
        x = self.embed_tokens(x)
        for block in self.blocks:
            x = self.run_block(block, x)
        return x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean of all tokens + fc_norm, or norm of the first patch token (no CLS token)."""
        if self.fc_norm is not None:
            return self.fc_norm(tokens.mean(dim=1))
        return self.norm(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_tokens(x))

    # --- trainer interface ---
    def block_list(self) -> list[nn.Module]:
        return list(self.blocks)

    def post_block_modules(self) -> list[nn.Module]:
        return [self.fc_norm if self.fc_norm is not None else self.norm]

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth like the official fine-tuning code: block i of depth L drops its
        residual branches per sample with rate i * rate / (L - 1) (`linspace(0, rate, L)`),
        scaling kept samples by 1/(1 - p) (timm `DropPath`); identity in eval mode."""
        rates = torch.linspace(0, rate, len(self.blocks)).tolist()
        for block, p in zip(self.blocks, rates):
            block.drop_path = DropPath(p) if p > 0 else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm layer grouping (for layer-wise LR decay): stem, one group per block, then the
        pooling norm as its own last group (scale 1, like BEiT/VideoMAE's fine-tuning; timm's
        (99999,) would merge it into the last block)."""
        return dict(stem=r"^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^(?:fc_)?norm", (100_000,))])


def _init_weights(module: nn.Module) -> None:
    """Reference init for random models: truncated-normal linears, zero biases (LayerNorms
    start at 1 and 0 already)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# --- checkpoint conversion and loading ----------------------------------------------------------
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")
DROPPED_PREFIXES = ("head.", "decoder.", "encoder_to_decoder.", "mask_token")  # not encoder weights
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16}  # published S/B/L/H/g


def convert_state_dict(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Encoder keys from a checkpoint: strip wrapper prefixes, drop heads and decoders."""
    stripped = strip_prefixes(state, prefixes)
    dropped = [k for k in stripped if k.startswith(DROPPED_PREFIXES)]
    if dropped:
        logger.info("ignoring %d non-encoder tensors (%s ...)", len(dropped), dropped[0])
    return {k: v for k, v in stripped.items() if not k.startswith(DROPPED_PREFIXES)}


def infer_config(state: Mapping[str, torch.Tensor], source: str) -> VideoMAEConfig:
    """A config from tensor shapes alone (a .pth without config.json).

    The head count is not in any shape: published widths use their published counts, other
    widths 64-wide heads (with a warning). Eps is the released 1e-6; img_size 224.
    """
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 5:
        fail(f"{source}: no 5-D patch_embed.proj.weight, so this is not a VideoMAE v2 encoder "
             f"state dict (first keys: {', '.join(list(state)[:4])})")
    embed_dim, in_chans, tubelet, patch, _ = proj.shape
    block_ids = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    depth = len(block_ids)
    if depth == 0 or block_ids != set(range(depth)):
        fail(f"{source}: expected transformer blocks numbered 0..N-1, found {sorted(block_ids)[:8]}")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        fail(f"{source}: no blocks.0.mlp.fc1.weight to read the MLP width from")
    if "fc_norm.weight" not in state and "norm.weight" not in state:
        fail(f"{source}: neither fc_norm.weight (mean pooling) nor norm.weight (first-token "
             f"pooling) found; cannot tell how the encoder pools")
    heads = HEADS_BY_WIDTH.get(embed_dim)
    if heads is None:
        heads = max(1, embed_dim // 64)
        warnings.warn(f"{source}: num_heads is not stored in the weights; assuming {heads} "
                      f"(embed_dim {embed_dim} / 64). Put a config.json with model_config beside "
                      f"the file if that is wrong", stacklevel=3)
    return VideoMAEConfig(
        img_size=224, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads,
        mlp_ratio=fc1.shape[0] / embed_dim, qkv_bias="blocks.0.attn.q_bias" in state,
        layer_norm_eps=1e-6, tubelet_size=tubelet, use_mean_pooling="fc_norm.weight" in state,
        in_chans=in_chans)._validated(source)


def _load(config: VideoMAEConfig, state: Mapping[str, torch.Tensor], source: str,
          where: str) -> tuple[VideoMAEv2, VideoMAEConfig]:
    """The strict copy into a model built from `config` (read from `where`)."""
    hint = (f"Built from {where}: embed_dim {config.embed_dim}, depth {config.depth}, "
            f"patch {config.patch_size}, tubelet {config.tubelet_size}, mlp hidden "
            f"{config.mlp_hidden}, mean pooling {config.use_mean_pooling}")
    return load_into(lambda: VideoMAEv2(config), state, source, hint=hint), config


def load_folder(folder: Path) -> tuple[VideoMAEv2, VideoMAEConfig]:
    """HF layout: `config.json` (model_config) + `model.safetensors` with `model.` keys."""
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            fail(f"{path}: not found; a VideoMAE v2 checkpoint folder holds config.json and "
                 f"model.safetensors (as published in OpenGVLab/VideoMAEv2-Base)")
    config = read_config_json(config_path)
    try:
        raw = load_safetensors(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        fail(f"{weights_path}: cannot read safetensors file ({' '.join(str(exc).split())[:200]}); "
             f"is the download complete?")
    return _load(config, convert_state_dict(raw, ("model.",)), str(weights_path), str(config_path))


def load_pth(path: Path) -> tuple[VideoMAEv2, VideoMAEConfig]:
    """OpenGVLab `.pth`: state dict under `model`/`module` (or flat), config from a
    `config.json` beside the file, else inferred from the shapes."""
    data = torch_load_dict(path)
    raw = unwrap_state_dict(data, path, ("model", "module", "state_dict"))
    state = convert_state_dict(raw, WRAPPER_PREFIXES)
    beside = path.parent / "config.json"
    if beside.is_file():
        config, where = read_config_json(beside), str(beside)
    else:
        config, where = infer_config(state, str(path)), "the tensor shapes"
    return _load(config, state, str(path), where)


def load_videomae(source: str | Path) -> tuple[VideoMAEv2, VideoMAEConfig]:
    """A VideoMAE v2 encoder from a checkpoint folder or a .pth file, strictly, in eval mode."""
    path = require_path(source, "a VideoMAE v2 checkpoint folder (config.json + "
                                "model.safetensors) or an OpenGVLab .pth file")
    if path.name == "model.safetensors":  # the weights file of a folder: load the folder
        path = path.parent
    return load_folder(path) if path.is_dir() else load_pth(path)

