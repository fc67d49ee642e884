"""Backbone registry: which video encoders exist, the clip shapes each takes, how to build one,
and the public loader.

Two families share one interface (`Backbone`): `forward` maps float clips (B, 3, T, H, W) to
(B, num_features); `block_list`/`post_block_modules` define partial fine-tuning;
`set_grad_checkpointing` saves memory. `create_backbone` is what the trainer calls (family +
variant + optional checkpoint); `load_backbone` is what users call on a checkpoint they hold.

This module and `configs.py` import no torch: the model modules (`videomae.py`, `csn.py`) are
imported by the functions that build a model, so a search driver checks every trial's clip
shape (`check_geometry`) without loading torch.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from ..errors import fail
from .configs import (CSN_MIN_SIZE, CSN_VARIANTS, VMAE_VARIANTS, CSNConfig, VideoMAEConfig,
                      published_folder, read_config_json)

if TYPE_CHECKING:
    from torch import nn

    from ..config import TrainConfig

    from .csn import IrCSN
    from .videomae import VideoMAEv2

__all__ = ["BackboneInfo", "CSNConfig", "Geometry", "VARIANTS", "VideoMAEConfig", "backbone_geometry",
           "build_backbone", "check_geometry", "create_backbone", "load_backbone"]

logger = logging.getLogger(__name__)

# Family -> variants, in the order the CLI lists them.
VARIANTS: dict[str, tuple[str, ...]] = {"vmae": tuple(VMAE_VARIANTS), "csn": tuple(CSN_VARIANTS)}
# VideoMAE: the 0.5/0.5 that upstream trained and ran inference with. CSN: ImageNet statistics.
VMAE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CSN_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CSN_NATIVE_SIZE = {"tiny": 64}  # others 224


@dataclass(frozen=True)
class BackboneInfo:
    """What the trainer needs to know about a backbone besides the module itself."""

    family: str            # "vmae" | "csn"
    name: str              # "vmae-base", "csn-tiny", or "<family>:<checkpoint path>"
    source: str | None     # checkpoint path loaded, None for random init
    native_size: int       # default input side in pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frame_multiple: int    # T must be a multiple of this (VideoMAE tubelet size; CSN 1)
    # The architecture as plain values (VideoMAEConfig / CSNConfig fields): stored in our
    # checkpoints so a trained model rebuilds without the original backbone checkpoint.
    arch: Mapping[str, Any] = field(default_factory=dict)
    size_multiple: int = 1  # H and W must be multiples of this (VideoMAE patch size; CSN 1)
    min_size: int = 1       # smallest H and W that still give the last layer a real pixel


def create_backbone(family: str, variant: str, *, ckpt: str | os.PathLike[str] | None = None,
                    checkpoint_root: str | os.PathLike[str] = "checkpoints") -> tuple[nn.Module, BackboneInfo]:
    """Build the backbone a run asks for, in eval mode.

    vmae: `ckpt` (folder or .pth) wins; else base/large/giant load the published folder under
    `checkpoint_root`; tiny is random. csn: `ckpt` (mmaction2 file; its depth/width win, a
    different `variant` only warns); else random init, as upstream trained CSN from scratch.
    """
    if family not in VARIANTS:
        fail(f"unknown backbone family {family!r}; expected one of {', '.join(VARIANTS)} (--backbone)")
    variant = str(variant)
    if variant not in VARIANTS[family]:
        fail(f"unknown {family} variant {variant!r}; expected one of "
             f"{', '.join(VARIANTS[family])} (--{family}_variant)")
    if family == "vmae":
        return _create_vmae(variant, ckpt, Path(checkpoint_root))
    return _create_csn(variant, ckpt)


def peek_vmae_config(variant: str, ckpt: str | os.PathLike[str] | None,
                     checkpoint_root: str | os.PathLike[str]) -> VideoMAEConfig | None:
    """The VideoMAE config a run will use, read from config.json alone (no weights): lets the
    trainer reject a --num_frames/--input_size that cannot fit before loading a multi-GB
    checkpoint. None when only the weights can tell (a .pth without a config.json beside it)."""
    path = Path(ckpt) if ckpt is not None else published_folder(variant, checkpoint_root)
    if path is None:
        return VMAE_VARIANTS[variant]
    if path.name == "model.safetensors" or path.suffix == ".pth":
        path = path.parent
    config_json = path / "config.json"
    return read_config_json(config_json) if config_json.is_file() else None


class Geometry(NamedTuple):
    """The clip shapes a backbone takes: frames a multiple of `frame_multiple`, a side a
    multiple of `size_multiple` and at least `min_size`; `native_size` when --input_size is unset."""

    frame_multiple: int
    size_multiple: int
    native_size: int
    min_size: int = 1


def backbone_geometry(family: str, variant: str, ckpt: str | os.PathLike[str] | None,
                      checkpoint_root: str | os.PathLike[str]) -> Geometry | None:
    """The geometry `create_backbone` would give, without building the model or reading weights
    (a VideoMAE folder's config.json at most; a published variant whose folder is not there yet
    has its registry shape). None when only the weights can tell (a .pth without config.json)."""
    if family == "csn":
        native = 224 if ckpt is not None else CSN_NATIVE_SIZE.get(variant, 224)
        return Geometry(1, 1, native, CSN_MIN_SIZE)
    config = peek_vmae_config(variant, ckpt, checkpoint_root)
    if config is None and ckpt is None:
        config = VMAE_VARIANTS[variant]
    return None if config is None else Geometry(config.tubelet_size, config.patch_size, config.img_size)


def check_geometry(config: TrainConfig, geometry: Geometry | None = None) -> None:
    """Clip shape against the backbone: VideoMAE needs whole tubelets and whole patches, the
    CSN a frame its strides do not shrink below one pixel. `geometry` defaults to the one the
    config's backbone would have (no model built, no weights read): the same check a search
    runs for every trial before Ray starts. Silent when only the weights can tell."""
    if geometry is None:
        geometry = backbone_geometry(config.backbone, config.variant, config.backbone_ckpt,
                                     config.checkpoint_root)
        if geometry is None:
            return
    frame_multiple, size_multiple, native, min_size = geometry
    if (config.input_size or native) < min_size:
        fail(f"--input_size {config.input_size} is too small for --backbone {config.backbone}: "
             f"its strides need at least {min_size} pixels (native size {native})")
    if config.num_frames % frame_multiple:
        fail(f"--num_frames {config.num_frames} must be a multiple of the VideoMAE tubelet size "
             f"{frame_multiple}")
    if (config.input_size or native) % size_multiple:
        fail(f"--input_size {config.input_size} must be a multiple of the VideoMAE patch size "
             f"{size_multiple} (native size {native})")


def load_backbone(source: str | os.PathLike[str], backbone: str = "vmae") -> nn.Module:
    """Load a backbone from a checkpoint, built from the checkpoint's own config/shapes.

    vmae: a folder with config.json + model.safetensors, or an OpenGVLab .pth file.
    csn: an mmaction2 ir-CSN .pth file. Strict (every key must match), eval mode;
    `model(x)` maps float (B, 3, T, H, W) to (B, model.num_features).
    """
    if backbone == "vmae":
        from .videomae import load_videomae

        return load_videomae(source)[0]
    if backbone == "csn":
        from .csn import load_ircsn

        return load_ircsn(source)[0]
    fail(f"unknown backbone family {backbone!r}; expected vmae or csn")


def build_backbone(family: str, arch: Mapping[str, Any]) -> nn.Module:
    """A randomly initialised backbone of the architecture `BackboneInfo.arch` describes (to
    load a trained HeaderNet checkpoint into)."""
    if family == "vmae":
        from .videomae import VideoMAEv2

        return VideoMAEv2(VideoMAEConfig(**arch)).eval()
    if family == "csn":
        from .csn import IrCSN

        return IrCSN(CSNConfig(**{**arch, "stage_blocks": tuple(arch["stage_blocks"])})).eval()
    fail(f"unknown backbone family {family!r}; expected vmae or csn")


def _arch(config: object) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _create_vmae(variant: str, ckpt: str | os.PathLike[str] | None,
                 root: Path) -> tuple[VideoMAEv2, BackboneInfo]:
    from .videomae import VideoMAEv2, load_videomae

    if ckpt is not None:
        model, config = load_videomae(ckpt)
        name, source = f"vmae:{ckpt}", str(ckpt)
        _warn_if_other(variant, VMAE_VARIANTS[variant], config, "--vmae_variant", str(ckpt),
                       ("embed_dim", "depth", "patch_size"))
    elif (folder := published_folder(variant, root)) is not None:
        if not folder.exists():
            fail(f"{folder}: VideoMAE v2 {variant} checkpoint folder not found; download "
                 f"OpenGVLab/{folder.name} (config.json + model.safetensors) "
                 f"there, set --checkpoint_root, or pass --backbone_ckpt PATH")
        model, config = load_videomae(folder)
        name, source = f"vmae-{variant}", str(folder)
    else:
        config = VMAE_VARIANTS[variant]
        model, name, source = VideoMAEv2(config).eval(), f"vmae-{variant}", None
        warnings.warn(f"VideoMAE v2 '{variant}' has random weights (no pre-training): for tests "
                      f"and demos, not for real results", stacklevel=3)
    info = BackboneInfo("vmae", name, source, config.img_size, *VMAE_MEAN_STD,
                        frame_multiple=config.tubelet_size, arch=_arch(config),
                        size_multiple=config.patch_size)
    return model, info


def _create_csn(variant: str, ckpt: str | os.PathLike[str] | None) -> tuple[IrCSN, BackboneInfo]:
    from .csn import IrCSN, load_ircsn

    if ckpt is not None:
        model, config = load_ircsn(ckpt)
        name, source = f"csn:{ckpt}", str(ckpt)
        _warn_if_other(variant, CSN_VARIANTS[variant], config, "--csn_variant", str(ckpt),
                       ("stage_blocks", "base_channels"))
    else:
        config = CSN_VARIANTS[variant]
        model, name, source = IrCSN(config).eval(), f"csn-{variant}", None
        if variant == "tiny":
            warnings.warn("ir-CSN 'tiny' is a small random model: for tests and demos, not for "
                          "real results", stacklevel=3)
        else:
            logger.info("ir-CSN-%s randomly initialised (trained from scratch)", variant)
    shape = backbone_geometry("csn", variant, ckpt, "")
    info = BackboneInfo("csn", name, source, shape.native_size, *CSN_MEAN_STD,
                        frame_multiple=shape.frame_multiple, arch=_arch(config), min_size=shape.min_size)
    return model, info


def _warn_if_other(variant: str, wanted: object, got: object, flag: str, path: str,
                   fields: tuple[str, ...]) -> None:
    """A checkpoint defines its own architecture; say so when the variant flag disagrees."""
    diff = [f"{f} {getattr(got, f)}" for f in fields if getattr(wanted, f) != getattr(got, f)]
    if diff:
        warnings.warn(f"{flag} {variant} ignored: {path} holds a different model "
                      f"({', '.join(diff)}); its own architecture is used", stacklevel=4)
