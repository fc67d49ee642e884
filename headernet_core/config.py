"""The one typed config of a training run: defaults, CLI flags, YAML keys and `config.yaml`.

Every knob of the trainer is a field of `TrainConfig`. The CLI parser is generated from the
fields (flag = `--<field>`, plus upstream aliases), `--config FILE` reads the same keys from
YAML, and the run writes the resolved config back as `config.yaml`, which `--config` accepts
again. A Ray Tune trial builds the same object from a dict. Nothing else defines a default.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from .errors import CliParser, HeaderNetError, fail, fail_not_utf8
from .paths import check_name

# Learning-rate defaults by (backbone, finetune_mode): (lr_backbone, lr_head).
# Pretrained VideoMAE fine-tunes with a small backbone LR and a 20x larger head LR; the CSN is
# trained from scratch like upstream, so backbone and head share one LR (lr_head=None means
# "same as lr_backbone"). A frozen backbone has no backbone LR. Explicit flags always win.
LR_TABLE: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("vmae", "full"): (5e-5, 1e-3),
    ("vmae", "partial"): (5e-5, 1e-3),
    ("vmae", "frozen"): (None, 1e-3),
    ("csn", "full"): (1e-3, None),
    ("csn", "partial"): (1e-4, 1e-3),
    ("csn", "frozen"): (None, 1e-3),
}

# Bounds that catch a typo before it allocates memory or forks processes (no real run needs more).
MAX_SEED = 2**32 - 1            # numpy's legacy seed range (train and split_dataset --seed)
MAX_NUM_FRAMES = 1024
MAX_INPUT_SIZE = 1024
MAX_NUM_WORKERS = 128
MAX_YAML_BYTES = 10 * 2**20     # a config or space file is a few KB
MAX_YAML_DEPTH = 32

# What each number setting must be, checked in this order by `TrainConfig.validate`:
# (fields, test, the rule as the error states it). An unset optional field (None) passes.
_RANGES: list[tuple[tuple[str, ...], Callable[[Any], bool], str]] = [
    (("num_frames", "epochs", "batch_size", "grad_accum", "unfreeze_blocks", "feature_cache_views"),
     lambda v: v >= 1, "a positive integer"),
    (("seed",), lambda v: 0 <= v <= MAX_SEED, f"in 0..{MAX_SEED}"),
    (("num_workers",), lambda v: 0 <= v <= MAX_NUM_WORKERS, f"in 0..{MAX_NUM_WORKERS}"),
    (("num_frames",), lambda v: v <= MAX_NUM_FRAMES, f"at most {MAX_NUM_FRAMES}"),
    (("input_size",), lambda v: 1 <= v <= MAX_INPUT_SIZE, f"in 1..{MAX_INPUT_SIZE} pixels"),
    (("threads",), lambda v: v >= 1, "a positive integer"),
    (("lr_backbone", "lr_head"), lambda v: v > 0, "> 0"),
    (("weight_decay", "focal_gamma", "warmup_epochs", "momentum"), lambda v: v >= 0, ">= 0"),
    (("head_dropout", "aug_flip", "aug_jitter", "focal_alpha"), lambda v: 0 <= v <= 1, "between 0 and 1"),
    (("aug_crop_scale", "layer_decay"), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("max_grad_norm",), lambda v: v > 0, "> 0"),
    (("drop_path", "label_smoothing"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("mixup", "cutmix"), lambda v: v >= 0, ">= 0 (0 turns it off)"),
    (("mixup_prob", "mixup_switch_prob"), lambda v: 0 <= v <= 1, "between 0 and 1"),
    (("model_ema_decay",), lambda v: 0 < v < 1, "in (0, 1)"),
]

# Metrics the trainer reports each epoch that make sense to select the best epoch on,
# with the direction that is better.
SELECTABLE_METRICS: dict[str, str] = {
    "val_f1": "max", "val_precision": "max", "val_recall": "max", "val_auc": "max",
    "val_ap": "max", "val_acc": "max", "val_loss": "min", "val_f1_05": "max",
    "val_precision_05": "max", "val_recall_05": "max",
    "val_weighted_f1": "max", "val_weighted_precision": "max", "val_weighted_recall": "max",
}


# Roles some fields play beside their own meaning (`_opt(roles=...)`; a field may have
# several). Every list of such keys elsewhere is `fields_with_role(...)` or a set rule over it:
# - run: names the run folder or how a run starts in it. A Tune trial sets these itself and a
#   retrain chooses them afresh. output_root is also a path: a search space may choose it (the
#   search's storage); the others a space may not fix.
# - device: where and with how many threads the run executes, not what it learns (devices,
#   loader and torch threads, the progress bar). A trial's Ray slot decides them (threads only
#   when the space leaves it unset) and a retrain chooses them afresh. compile is not one: a
#   retrain keeps the trial's.
# - path: a file or folder path; a search makes it absolute against the folder it started in,
#   since trials run elsewhere.
# - resumable: may differ when a stopped run is resumed (every run and device setting, the
#   epoch count, logging, compile, the feature-cache folder); the rest must match config.yaml.
ROLES = ("run", "device", "path", "resumable")


def _opt(default: Any, help: str, *, choices: Sequence[Any] | None = None,
         aliases: Sequence[str] = (), roles: Sequence[str] = ()) -> Any:
    """A dataclass field carrying what the CLI needs (help, choices, upstream aliases) and its
    `roles` (of ROLES)."""
    metadata = {"help": help, "choices": choices, "aliases": tuple(aliases), "roles": frozenset(roles)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names are the CLI flags and the YAML keys;
    `roles=` (see ROLES) puts a field into the key lists other code derives from them."""

    # --- data -------------------------------------------------------------------------
    train_csv: str | None = _opt(None, "training split CSV (columns path,label[,video_id,half,frame,...])",
                                 roles=("path",))
    val_csv: str | None = _opt(None, "validation split CSV, same schema", roles=("path",))
    num_frames: int = _opt(16, "frames sampled per clip (evenly spaced; repeats when the clip is shorter)")
    input_size: int | None = _opt(None, "frame side in pixels (default: the backbone's native size)")
    neg_pos_ratio: str = _opt("all", "negatives per positive resampled each epoch (a number) or 'all'")
    augment: bool = _opt(True, "clip-consistent train augmentation (flip, brightness/contrast, crop)")
    aug_flip: float = _opt(0.5, "probability of a horizontal flip of the whole clip")
    aug_jitter: float = _opt(0.1, "max relative brightness/contrast change of the whole clip")
    aug_crop_scale: float = _opt(0.8, "min side fraction of the random crop (1 = no crop)")
    temporal_jitter: bool = _opt(False, "training: each sampled frame is a random frame of its segment "
                                        "(the frames nearest its evenly spaced position), drawn per "
                                        "seed, epoch and clip")
    mean: list[float] | None = _opt(None, "normalisation mean per channel (default: per backbone)")
    std: list[float] | None = _opt(None, "normalisation std per channel (default: per backbone)")
    num_workers: int = _opt(2, "loader threads reading clips ahead of the training step (0: none)",
                            roles=("device", "resumable"))
    threads: int | None = _opt(None, "torch threads on the CPU (default: idle cores less loader threads; "
                                     "an explicit OMP_NUM_THREADS wins)", roles=("device", "resumable"))

    # --- model ------------------------------------------------------------------------
    backbone: str = _opt("vmae", "backbone family", choices=("vmae", "csn"))
    vmae_variant: str = _opt("base", "VideoMAE v2 variant (tiny = small random model)",
                             choices=("base", "large", "giant", "tiny"))
    csn_variant: str = _opt("50", "ir-CSN depth (tiny = small random model)",
                            choices=("50", "101", "152", "tiny"))
    backbone_ckpt: str | None = _opt(None, "VideoMAE checkpoint folder/.pth or mmaction2 ir-CSN file",
                                     roles=("path",))
    checkpoint_root: str = _opt("checkpoints", "folder holding VideoMAEv2-Base|Large|giant", roles=("path",))
    finetune_mode: str = _opt("full", "which backbone weights train", choices=("full", "frozen", "partial"))
    unfreeze_blocks: int = _opt(4, "partial mode: how many last blocks train")
    gradient_checkpointing: bool = _opt(False, "recompute block activations in backward (saves memory)")
    head_dropout: float = _opt(0.5, "dropout before the linear head")
    drop_path: float = _opt(0.0, "VideoMAE stochastic depth: per-sample drop rate of each block's "
                                 "residual branches, linear from 0 (first block) to this (last block)")
    bn_frozen: bool = _opt(False, "ir-CSN: BatchNorm layers stay in eval mode (running statistics "
                                  "kept) and their affine parameters do not train (mmaction2 bn_frozen)")
    feature_cache: bool = _opt(True, "frozen backbone: compute each clip's feature once per view, on "
                                     "disk, and train the head on it (shared by runs and trials)")
    feature_cache_dir: str | None = _opt(None, "where cached features go (default: <output_root>/feature_cache)",
                                         roles=("path", "resumable"))
    feature_cache_views: int = _opt(4, "cached views per train clip with --augment (view 0 un-augmented; "
                                       "each epoch picks one per clip); 1 without --augment")

    # --- optimisation -----------------------------------------------------------------
    optimizer: str = _opt("adamw", "optimizer", choices=("adamw", "sgd"), aliases=("--optimizer_type",))
    lr_backbone: float | None = _opt(None, "backbone learning rate (default: LR_TABLE)")
    lr_head: float | None = _opt(None, "head learning rate (default: LR_TABLE)")
    weight_decay: float = _opt(0.05, "weight decay (never on norms, biases or the head bias)")
    betas: list[float] = _opt([0.9, 0.999], "AdamW betas")
    momentum: float = _opt(0.9, "SGD momentum")
    layer_decay: float | None = _opt(None, "VideoMAE layer-wise LR decay (e.g. 0.75)",
                                     aliases=("--layer_lr_decay",))
    scheduler: str = _opt("cosine", "LR schedule (per optimizer step)", choices=("cosine", "none"))
    warmup_epochs: float = _opt(1.0, "linear warmup length in epochs")
    epochs: int = _opt(30, "training epochs", roles=("resumable",))
    batch_size: int = _opt(8, "clips per forward pass (split over --gpus)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step", aliases=("--gradient_accumulation_steps",))
    max_grad_norm: float | None = _opt(None, "clip the gradient norm to this value",
                                       aliases=("--clip_grad",))
    loss: str = _opt("focal", "loss", choices=("ce", "focal"))
    focal_alpha: float = _opt(0.75, "focal loss weight of the positive class")
    focal_gamma: float = _opt(2.0, "focal loss focusing exponent")
    label_smoothing: float = _opt(0.0, "training targets (1-E)*one-hot + E/2, for ce and focal "
                                       "(validation loss stays unsmoothed)")
    # Fine-tuning recipe of VideoMAE v2 (run_class_finetuning.py names; all off by default).
    mixup: float = _opt(0.0, "mixup alpha: Beta(a, a) weight of two clips (0: off; official 0.8)")
    cutmix: float = _opt(0.0, "cutmix alpha: Beta(a, a) area of a box pasted on every frame "
                              "(0: off; official 1.0)")
    mixup_prob: float = _opt(1.0, "probability of mixing a batch when --mixup or --cutmix is on")
    mixup_switch_prob: float = _opt(0.5, "probability of cutmix instead of mixup when both are on")
    model_ema: bool = _opt(False, "validate and keep as best the exponential moving average of the "
                                  "weights")
    model_ema_decay: float = _opt(0.999, "EMA decay cap; timm's warm-up decay 1 - step^-0.75 stays "
                                         "below it for the first 10k steps at 0.999")
    amp: str = _opt("auto", "mixed precision (auto: bf16 where the GPU has it, off on CPU)",
                    choices=("auto", "bf16", "fp16", "off"))
    seed: int = _opt(42, "seed for init, sampling and augmentation")
    select_metric: str = _opt("val_f1", "metric that picks the best epoch",
                              choices=tuple(SELECTABLE_METRICS))

    # --- devices ----------------------------------------------------------------------
    gpus: list[int] | None = _opt(None, "GPU ids; several = DataParallel (default: first GPU, else CPU)",
                                  roles=("device", "resumable"))
    cpu: bool = _opt(False, "run on the CPU even where a GPU is visible", roles=("device", "resumable"))
    compile: bool = _opt(False, "torch.compile the model (on failure: a message, then eager)",
                         roles=("resumable",))

    # --- run --------------------------------------------------------------------------
    run_name: str | None = _opt(None, "run folder name (default: <backbone>_<variant>_<time>)",
                                roles=("run", "resumable"))
    output_root: str = _opt("report/header_experiments", "where run folders go",
                            roles=("run", "path", "resumable"))
    resume: bool = _opt(False, "continue the run in <output_root>/<run_name> from checkpoints/last.pt",
                        roles=("run", "resumable"))
    overwrite: bool = _opt(False, "replace an unfinished run of the same name (finished runs are kept)",
                           roles=("run", "resumable"))
    tensorboard: bool = _opt(True, "write TensorBoard scalars to <run>/tb", roles=("resumable",))
    plots: bool = _opt(True, "write PNG curves to <run>/plots (at the run's end, at most once a minute during it)",
                       roles=("resumable",))
    progress: bool = _opt(True, "show a tqdm bar per epoch", roles=("device", "resumable"))

    # ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping (YAML file, Tune trial, tests); unknown keys and wrong types
        are errors naming `source` and the key."""
        known = [f.name for f in dataclasses.fields(cls)]
        values = canonical_keys(values, source)
        unknown = sorted(set(values) - set(known))
        if unknown:
            fail(f"{source}: unknown key(s) {', '.join(unknown)}; expected trainer config keys "
                 f"such as {', '.join(known[:6])}, ...")
        hints = field_types()
        kwargs = {name: coerce(name, value, hints[name], source) for name, value in values.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of YAML-safe values (lists, not tuples)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # --- derived values -----------------------------------------------------------------
    @property
    def variant(self) -> str:
        return self.vmae_variant if self.backbone == "vmae" else self.csn_variant

    @property
    def trains_backbone(self) -> bool:
        return self.finetune_mode != "frozen"

    @property
    def uses_feature_cache(self) -> bool:
        """A frozen backbone's features are computed once and cached (see features.py)."""
        return self.finetune_mode == "frozen" and self.feature_cache

    @property
    def mixes(self) -> bool:
        """Mixup or cutmix is on (an alpha above 0)."""
        return self.mixup > 0 or self.cutmix > 0

    def validate(self, *, need_data: bool = True) -> TrainConfig:
        """Check everything that needs no file or model; raise one clear line on the first problem."""
        if need_data:
            for key in ("train_csv", "val_csv"):
                if not getattr(self, key):
                    fail(f"--{key} is required (a CSV with columns path,label)")
        self._check_types()
        for keys, ok, rule in _RANGES:
            for key in keys:
                value = getattr(self, key)
                if value is not None and not ok(value):   # None: an Optional one, unset
                    fail(f"--{key} must be {rule}, got {value}")
        if self.layer_decay is not None and self.backbone != "vmae":
            fail("--layer_decay applies to --backbone vmae only")
        if self.mixes and self.uses_feature_cache:  # mixing needs clips, not cached features
            fail("--mixup/--cutmix mix clips, but a frozen backbone with --feature_cache trains on "
                 "cached features; pass --no-feature_cache or drop --mixup/--cutmix")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            fail(f"--betas must be two numbers in [0, 1), got {self.betas}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                fail(f"--{key} must have 3 values (one per channel), got {value}")
        if self.std is not None and any(s <= 0 for s in self.std):
            fail(f"--std values must be > 0, got {self.std}")
        parse_neg_pos_ratio(self.neg_pos_ratio)
        if self.gpus is not None and any(g < 0 for g in self.gpus):
            fail(f"--gpus ids must be >= 0, got {self.gpus}")
        if self.gpus and self.cpu:
            fail("--gpus and --cpu contradict each other; pass one")
        if self.resume and self.overwrite:
            fail("--resume and --overwrite contradict each other; pass one")
        if self.run_name is not None:  # '=' too: a search names its trial runs key=value
            check_name(self.run_name, "--run_name", extra="=")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                fail(f"--{f.name} must be one of {', '.join(map(str, choices))}, got {getattr(self, f.name)!r}")
        return self

    def _check_types(self) -> None:
        """None only where a field is Optional (from Python, `TrainConfig(epochs=None)` would
        fail with a TypeError epochs later), and no NaN or infinity, which pass every `<`/`>`
        check: both refused first, by type."""
        for f in dataclasses.fields(self):
            inner, optional = unwrap_optional(field_types()[f.name])
            value = getattr(self, f.name)
            if value is None and not optional:
                fail(f"--{f.name} must be set, got None")
            if inner is float and value is not None and not math.isfinite(value):
                fail(f"--{f.name} must be a finite number, got {value}")
            if inner == list[float] and value is not None and not all(map(math.isfinite, value)):
                fail(f"--{f.name} must be finite numbers, got {value}")

    def resolved(self, *, native_size: int, default_mean: Sequence[float],
                 default_std: Sequence[float]) -> TrainConfig:
        """Fill the defaults that depend on the backbone (LR table, input size, normalisation)."""
        lr_bb, lr_head = LR_TABLE[(self.backbone, self.finetune_mode)]
        lr_backbone = self.lr_backbone if self.lr_backbone is not None else lr_bb
        head = next((lr for lr in (self.lr_head, lr_head) if lr is not None), lr_backbone)
        return self.replace(
            lr_backbone=lr_backbone if self.trains_backbone else None,
            lr_head=head,
            input_size=self.input_size or native_size,
            mean=list(self.mean) if self.mean is not None else list(default_mean),
            std=list(self.std) if self.std is not None else list(default_std),
            neg_pos_ratio=str(parse_neg_pos_ratio(self.neg_pos_ratio) or "all"),
        )


def canonical_keys(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`values` with alias keys renamed to their field (config.yaml is then written with the
    field name); an alias given together with its field is an error naming both. The aliases
    are the fields' CLI aliases (`--clip_grad` -> max_grad_norm), so the same names work as
    YAML keys and Tune dict keys."""
    aliases = {alias.removeprefix("--"): f.name for f in dataclasses.fields(TrainConfig)
               for alias in f.metadata["aliases"]}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name in out or (name != key and name in values):
            fail(f"{source}: {key} is another name of {name}; give one of them")
        out[name] = value
    return out


def fields_with_role(role: str) -> tuple[str, ...]:
    """The `TrainConfig` fields that play `role` (one of ROLES), in declaration order."""
    if role not in ROLES:
        raise ValueError(f"unknown field role {role!r}; expected {', '.join(ROLES)}")
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if role in f.metadata["roles"])


class IgnoredSettingWarning(UserWarning):
    """A setting that has no effect in this run (warned once per setting, never an error)."""


# VideoMAE config.json keys the encoder here does not apply (the released models train
# without them at fine-tuning time; the head's dropout is --head_dropout, drop path --drop_path).
VMAE_UNUSED_DROPOUTS = ("drop_rate", "attn_drop_rate", "drop_path_rate")


def ignored_settings(config: TrainConfig, vmae_model_config: Any = None) -> list[str]:
    """One line per setting of `config` (before `resolved()`) that has no effect, naming the
    flag and why. A setting counts as given when it differs from its default (the trainer
    cannot tell a typed default from an untouched one). `vmae_model_config` (a VideoMAEConfig
    read from a checkpoint's config.json) adds its dropout rates, which are not used.

    The one table of these rules: the trainer warns with it in single runs and in Tune trials,
    and the search prints it once for the trials it will run."""
    default = TrainConfig()
    changed = {f.name for f in dataclasses.fields(TrainConfig)
               if getattr(config, f.name) != getattr(default, f.name)}
    rules: list[tuple[str, bool, str]] = [
        ("lr_backbone", config.finetune_mode == "frozen",
         "with --finetune_mode frozen (the backbone does not train)"),
        ("layer_decay", config.finetune_mode == "frozen",
         "with a frozen backbone (it trains no backbone parameter)"),
        ("gradient_checkpointing", config.finetune_mode == "frozen",
         "with a frozen backbone (no backbone gradients to save memory on)"),
        ("unfreeze_blocks", config.finetune_mode != "partial",
         f"with --finetune_mode {config.finetune_mode} (only partial unfreezes the last N blocks)"),
        ("focal_alpha", config.loss != "focal", f"with --loss {config.loss} (focal loss only)"),
        ("focal_gamma", config.loss != "focal", f"with --loss {config.loss} (focal loss only)"),
        ("momentum", config.optimizer != "sgd", f"with --optimizer {config.optimizer} (SGD only)"),
        ("betas", config.optimizer != "adamw", f"with --optimizer {config.optimizer} (AdamW only)"),
        ("warmup_epochs", config.scheduler == "none", "with --scheduler none (no schedule to warm up)"),
        *[(key, not config.mixes, "while --mixup and --cutmix are 0 (mixing is off)")
          for key in ("mixup_prob", "mixup_switch_prob")],
        ("mixup_switch_prob", config.mixes and not (config.mixup > 0 and config.cutmix > 0),
         "unless --mixup and --cutmix are both on (it picks between them)"),
        ("model_ema_decay", not config.model_ema, "without --model_ema"),
        *[(key, not config.augment, "with --no-augment (augmentation is off)")
          for key in ("aug_flip", "aug_jitter", "aug_crop_scale")],
        ("temporal_jitter", config.uses_feature_cache,
         "with a frozen backbone's feature cache (cached views keep the evenly spaced frames)"),
        ("drop_path", config.backbone != "vmae", f"with --backbone {config.backbone} (VideoMAE only)"),
        ("drop_path", config.backbone == "vmae" and config.finetune_mode == "frozen",
         "with a frozen backbone (its blocks run in eval mode)"),
        ("bn_frozen", config.backbone != "csn", f"with --backbone {config.backbone} (it has no BatchNorm)"),
        ("bn_frozen", config.backbone == "csn" and config.finetune_mode == "frozen",
         "with a frozen backbone (its BatchNorm is frozen anyway)"),
    ]
    lines = [f"{_flag_and_value(key, getattr(config, key))} has no effect {why}"
             for key, applies, why in rules if applies and key in changed]
    if vmae_model_config is not None and config.backbone == "vmae":
        for key in VMAE_UNUSED_DROPOUTS:
            value = getattr(vmae_model_config, key, 0.0)
            if value:
                lines.append(f"VideoMAE config.json {key} {value:g} has no effect (this encoder "
                             f"has no dropout; drop path is --drop_path, the head's dropout "
                             f"--head_dropout)")
    if config.bn_frozen and config.backbone == "csn" and config.trains_backbone \
            and config.backbone_ckpt is None:
        lines.append("--bn_frozen on a randomly initialised ir-CSN (no --backbone_ckpt): BatchNorm "
                     "keeps its initial statistics (mean 0, variance 1) and affine (1, 0)")
    return lines


def _flag_and_value(key: str, value: Any) -> str:
    """`--key value` as typed on the command line (`--key` / `--no-key` for on/off)."""
    if isinstance(value, bool):
        return f"--{key}" if value else f"--no-{key}"
    shown = " ".join(map(str, value)) if isinstance(value, list) else format_value(value, 6, None)
    return f"--{key} {shown}"


def format_value(value: Any, digits: int = 4, sci_from: float | None = 1e4, *,
                 yaml: bool = False) -> str:
    """A setting's or a metric's value as shown to a person; the one formatter of the trial
    folder names, the search console, the space's description and errors, and summary.md.

    Floats get `digits` significant digits. With `sci_from`, values below 1e-2 or from
    `sci_from` up are in scientific notation with one decimal (1.2e-03: learning rates read
    alike at a glance and keep folder names short); with None, Python's `g` decides. `yaml`:
    None, bools and blank or padded strings as a YAML file spells them (null, true, ' a'),
    as in a search space's messages; otherwise as Python prints them (None, True: trial
    folder names keep that spelling)."""
    if isinstance(value, float):
        if sci_from is not None and value != 0 and not 1e-2 <= abs(value) < sci_from:
            return f"{value:.1e}"
        return f"{value:.{digits}g}"
    if not yaml:
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and (not value or value.strip() != value):
        return repr(value)
    return str(value)


def parse_neg_pos_ratio(value: Any) -> float | None:
    """'all' -> None (use every negative); a positive number -> that ratio."""
    text = str(value).strip().lower()
    if text == "all":
        return None
    try:
        ratio = float(text)
    except ValueError:
        ratio = math.nan
    if not 0 < ratio < math.inf:
        fail(f"--neg_pos_ratio must be 'all' or a positive number, got {value!r}")
    return int(ratio) if ratio.is_integer() else ratio


# --- type coercion shared by YAML, Tune dicts and argparse --------------------------------
def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) != len(typing.get_args(tp))
    return tp, False


def coerce(name: str, value: Any, tp: Any, source: str = "config") -> Any:
    """Convert `value` to the field type `tp` or fail naming `source` and `name`."""
    inner, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        fail(f"{source}: {name} must not be empty")
    where = f"{source}: {name}"
    if typing.get_origin(inner) is list:
        (item_tp,) = typing.get_args(inner)
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            value = [value]
        return [_scalar(where, v, item_tp) for v in value]
    if name == "neg_pos_ratio":
        return str(value)
    return _scalar(where, value, inner)


def _scalar(where: str, value: Any, tp: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        fail(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value).strip())  # exact, also beyond a float's 2**53 ("True" fails here)
        except ValueError:
            pass
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not number.is_integer():
            fail(f"{where} must be an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            fail(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            fail(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            fail(f"{where} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} for {where}")


@functools.cache
def field_types() -> dict[str, Any]:
    """TrainConfig's field annotations, resolved once (`typing.get_type_hints` takes ~0.6 ms,
    and a search validates one config per sampled value)."""
    return typing.get_type_hints(TrainConfig)


# --- CLI ----------------------------------------------------------------------------------
def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """argparse over every `TrainConfig` field. Defaults are SUPPRESSed so that only flags the
    user typed override `--config`; the dataclass stays the single source of defaults."""
    parser = CliParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of config keys (e.g. a run's config.yaml); flags override it")
    hints, defaults = field_types(), TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        inner, _ = unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {getattr(defaults, f.name)})",
                                  "dest": f.name}
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is list:
            kwargs.update(nargs="+", type=_cli_type(f.name, typing.get_args(inner)[0]))
        else:
            kwargs.update(type=_cli_type(f.name, inner), choices=f.metadata["choices"])
        parser.add_argument(f"--{f.name}", *f.metadata["aliases"], **kwargs)
    return parser


def _cli_type(name: str, tp: Any):
    def convert(text: str) -> Any:
        try:
            return _scalar(f"--{name}", text, tp)
        except HeaderNetError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = tp.__name__
    return convert


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """`yaml.safe_load` a file that must hold a mapping; errors name the file. UTF-8 with or
    without a BOM and CRLF line ends are read; anything else is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: config file not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        fail(f"{path}: {size} bytes is not a config file (expected a few KB of YAML)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        fail_not_utf8(path, exc)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        fail(f"{path}: not valid YAML ({str(exc).splitlines()[0]})")
    except RecursionError:
        fail(f"{path}: nested too deeply to be a config file (at most {MAX_YAML_DEPTH} levels)")
    if data is None:
        return {}
    if not isinstance(data, dict):
        fail(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    if _depth(data) > MAX_YAML_DEPTH:
        fail(f"{path}: nested too deeply to be a config file (at most {MAX_YAML_DEPTH} levels)")
    return data


def _depth(data: Any) -> int:
    """How deeply lists and mappings nest in `data` (iterative: any depth is measured)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_YAML_DEPTH:
                break
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, level + 1) for child in children)
    return deepest


TRAIN_DESCRIPTION = "Train a soccer-header clip classifier (VideoMAE v2 or ir-CSN) and write its run folder."


def config_for_cli(argv: Sequence[str] | None) -> TrainConfig:
    """Defaults < `--config` YAML (with `--resume`: the run's own config.yaml) < typed flags."""
    typed = vars(build_parser("python -m headernet_core.train", TRAIN_DESCRIPTION).parse_args(argv))
    config_path = typed.pop("config", None)  # the rest: only the flags typed on the command line
    if typed.get("resume"):
        if config_path:
            fail("--resume reads the run's own config.yaml; drop --config")
        if not typed.get("run_name"):
            fail("--resume needs --run_name (the run folder to continue)")
        check_name(typed["run_name"], "--run_name", extra="=")  # before it becomes a path
        output_root = typed.get("output_root", TrainConfig().output_root)
        config_path = str(Path(output_root) / typed["run_name"] / "config.yaml")
        if not Path(config_path).is_file():
            fail(f"{Path(config_path).parent}: nothing to resume (no config.yaml)")
    # Alias keys (clip_grad) renamed first, so a typed flag overrides the file's spelling too.
    values = canonical_keys(load_yaml_mapping(config_path), config_path) if config_path else {}
    return TrainConfig.from_dict({**values, **typed}, source=config_path or "command line")


def inference_parser(command: str) -> argparse.ArgumentParser:
    """The flags of `python -m headernet_core.evaluate` or `.predict` (`command`), read before the
    model code (torch) is imported, so `--help` and a bad flag answer at once."""
    evaluate = command == "evaluate"
    parser = CliParser(prog=f"python -m headernet_core.{command}", description=(
        "Evaluate a trained checkpoint on a labelled CSV: at a threshold fixed beforehand, over "
        "one or several views of each clip, with the errors per match." if evaluate else
        "Predict headers on clips without labels: a CSV of paths or a folder of `.npy` clips."))
    parser.add_argument("--checkpoint", required=True, help="a best_epoch_<N>.pt or last.pt")
    parser.add_argument("--threshold", type=float, default=None,
                        help="a clip is a header iff its probability >= this (default: the "
                             "validation threshold stored in the checkpoint)")
    parser.add_argument("--views", type=int, default=1,
                        help="temporal views per clip, probabilities averaged (default: 1)")
    parser.add_argument("--spatial_views", type=int, default=1,
                        help="1 whole frame, 2 + its flip, 3 + the centre crop (default: 1)")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    if evaluate:
        parser.add_argument("--val_csv", required=True, help="labelled split CSV to evaluate on")
        parser.add_argument("--predictions", help="write per-clip predictions CSV here")
        parser.add_argument("--metrics", help="write metrics JSON here")
        parser.add_argument("--per_video", help="write the per-video_id error table (CSV) here")
    else:
        parser.add_argument("--clips", required=True, help="a CSV with a path column, or a folder of .npy clips")
        parser.add_argument("--output", required=True, help="predictions CSV to write")
    return parser
