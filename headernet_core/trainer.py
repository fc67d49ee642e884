"""Train one header classifier: `train(config, on_epoch=...)` is what the CLI and a Tune trial call.

Read it top to bottom: `prepare` checks every input before anything is written, `train` runs
the epochs (train -> validate -> write artifacts -> callback), and `main` is the thin CLI.

    python -m headernet_core.train --train_csv splits/train.csv --val_csv splits/val.csv \
        --backbone vmae --vmae_variant base --epochs 30 --run_name vmae_base_lr5e-5
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import sklearn.metrics  # noqa: F401 - loaded with the trainer, not inside epoch 1's timing
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from . import artifacts, checkpoints, distributed
from .augment import ClipLoader, DeviceTransform
from .backbones import BackboneInfo, Geometry, check_geometry, create_backbone, peek_vmae_config
from .config import (SELECTABLE_METRICS, IgnoredSettingWarning, TrainConfig, config_for_cli, fields_with_role,
                     ignored_settings, load_yaml_mapping, parse_neg_pos_ratio)
from .data import (BatchLoader, CheckedSplits, ClipDataset, ClipTransform, EpochSampler, check_frames,
                   load_split, split_warnings)
from .ema import WeightEma
from .errors import HeaderNetError, describe_os_error, fail, interrupts_held, run_cli
from .features import FrozenFeatures
from .locks import FolderLock, Heartbeat
from .losses import build_loss
from .memory import OutOfMemoryEnd, halved_batch, inject_oom, peak_gib, reset_peak, same_effective_batch
from .metrics import classification_metrics, is_improvement
from .mixup import ClipMix
from .model import CompiledWithFallback, HeaderClassifier, build_classifier, build_optimizer, nominal_lr
from .paths import check_writable_dir, is_inside
from .status import beat, read_status, read_status_record, recorded_end, write_status
from .threads import apply_thread_policy

# metrics_epoch.csv starts with upstream's legacy columns, in upstream's order (lr_* = mean LR
# over the epoch's optimizer steps, without the layer-decay scale).
LEADING_COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "val_precision", "val_recall",
                   "val_f1", "val_auc", "lr_backbone", "lr_head")
# What a run writes into its folder; other files there (e.g. Ray Tune's) are left alone.
RUN_ARTIFACTS = ("config.yaml", "status.json", "metrics_epoch.csv", "best_metrics.json",
                 "val_predictions.csv", "checkpoints", "plots", "tb")
# Settings that may change when a stopped run is resumed; anything else must match.
RESUMABLE_CHANGES = frozenset(fields_with_role("resumable"))
# Training steps between reads of the running loss from the device (the only host syncs).
LOG_EVERY = 20
# plots/ is drawn when a run ends and, during it, once its last drawing is this old: drawing
# the four PNGs takes 0.25-0.5 s, ~5% of a demo search's epochs (paid in every epoch of every
# trial), while an epoch of a real model takes minutes and still gets its curves every epoch.
PLOT_EVERY_S = 60.0


@dataclass
class EpochReport:
    """What `on_epoch` receives after each epoch's artifacts are on disk."""
    epoch: int                      # 1-based
    metrics: dict[str, float]       # this epoch's row of metrics_epoch.csv
    best_epoch: int
    best_metrics: dict[str, float]
    is_best: bool
    run_dir: Path
    last_checkpoint: Path


@dataclass
class TrainResult:
    run_dir: Path
    status: str                     # "finished" | "stopped"
    epochs_done: int
    best_epoch: int | None
    best_metrics: dict[str, float]
    best_checkpoint: Path | None
    config: TrainConfig


@dataclass
class Prepared:
    """Everything validated and built, before a single file is written."""
    config: TrainConfig
    info: BackboneInfo
    model: HeaderClassifier
    device: torch.device
    device_ids: list[int]
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    run_dir: Path
    resume_state: dict[str, Any] | None = None


@dataclass
class RunState:
    """Progress that `last.pt` carries across a resume."""
    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_metrics: dict[str, float] | None = None


# --- preparation: every check before anything is written ----------------------------------
def resolve_devices(config: TrainConfig) -> tuple[torch.device, list[int]]:
    """`--cpu` -> CPU; `--gpus a b ...` -> cuda:a with DataParallel over all; else first GPU or CPU.
    One of several DDP processes: its node-local GPU (`LOCAL_RANK`), else the CPU."""
    ranks = distributed.current()
    if ranks.active and config.gpus:
        fail(f"--gpus (DataParallel in one process) does not combine with {ranks.world} DDP "
             f"processes (torchrun or a space's resources.workers); drop --gpus")
    if ranks.active:
        use_gpu = not config.cpu and torch.cuda.is_available()
        return (torch.device(f"cuda:{ranks.local_rank}") if use_gpu else torch.device("cpu")), []
    if config.cpu:
        return torch.device("cpu"), []
    if config.gpus:
        if not torch.cuda.is_available():
            fail(f"--gpus {' '.join(map(str, config.gpus))}: no CUDA GPU is visible on this machine")
        count = torch.cuda.device_count()
        missing = [g for g in config.gpus if not 0 <= g < count]
        if missing:
            fail(f"--gpus {' '.join(map(str, missing))}: only {count} GPU(s) visible (ids 0-{count - 1})")
        if len(set(config.gpus)) != len(config.gpus):
            fail(f"--gpus lists an id twice: {config.gpus}")
        return torch.device(f"cuda:{config.gpus[0]}"), list(config.gpus)
    if torch.cuda.is_available():
        return torch.device("cuda:0"), [0]
    return torch.device("cpu"), []


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        if amp == "fp16":
            fail("--amp fp16 needs a GPU; use --amp bf16 or off on the CPU")
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        fail("--amp bf16: this GPU has no bf16 support; use --amp fp16")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def default_run_name(config: TrainConfig) -> str:
    return f"{config.backbone}-{config.variant}_{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(config: TrainConfig) -> tuple[Path, dict[str, Any] | None]:
    """Where the run goes, and its last.pt when resuming. A finished run is never overwritten.
    A resumed run without last.pt (it ended in its first epoch, e.g. out of memory under DDP,
    which records the halved micro-batch in config.yaml) starts again from its beginning: with
    the CLI's --resume, at the settings of its config.yaml."""
    run_dir = Path(config.output_root) / str(config.run_name)
    last = run_dir / "checkpoints" / "last.pt"
    if config.resume:
        if not run_dir.is_dir():
            fail(f"{run_dir}: nothing to resume (no such run folder); check --output_root/--run_name")
        if not last.is_file():
            if read_status(run_dir) == "finished":
                fail(f"{run_dir} is a finished run without checkpoints/last.pt; it is never "
                     f"overwritten: choose another --run_name")
            return run_dir, None
        saved = checkpoints.load(last)
        missing = sorted(RESUME_KEYS - saved.keys())
        if missing:
            fail(f"{last}: not a resumable last.pt (no {', '.join(missing)}: a best_epoch_<N>.pt "
                 f"copied over it?); start again with --overwrite, or restore the run's own last.pt")
        return run_dir, saved
    if any((run_dir / name).exists() for name in RUN_ARTIFACTS):
        if not config.overwrite:
            hint = ("--resume to continue it" if last.is_file() else
                    "--resume to start it again with its config.yaml, or --overwrite with these settings "
                    "(it ended before its first epoch)")
            state = read_status(run_dir)
            state = f" ({'its process died' if state == 'dead' else state})" if state else ""
            fail(f"{run_dir} already exists{state}; pass {hint} or choose another --run_name")
        if read_status(run_dir) == "finished":
            fail(f"{run_dir} is a finished run and is never overwritten; choose another --run_name")
    return run_dir, None


def check_resume_compatible(saved: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    current = config.to_dict()
    # The micro-batch may change with the effective batch kept (what an OOM backoff records).
    kept = {"batch_size", "grad_accum"} if same_effective_batch(saved, config) else set()
    changed = sorted(k for k, v in saved.items()
                     if k not in RESUMABLE_CHANGES | kept and k in current and current[k] != v)
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed[:4])
        fail(f"{run_dir}: --resume cannot change {detail}; only {', '.join(sorted(RESUMABLE_CHANGES))} may change")


def check_inputs_outside(config: TrainConfig, run_dir: Path, clip_paths: Sequence[str]) -> None:
    """Inputs are never written: no CSV, checkpoint or clip may live in the run folder (which a
    run writes into and `--overwrite` clears)."""
    for key in ("train_csv", "val_csv", "backbone_ckpt"):
        value = getattr(config, key)
        if value and is_inside(value, run_dir):
            fail(f"--{key} {value} lies inside the run folder {run_dir}; inputs are never "
                 f"written: choose another --run_name or --output_root")
    # Per clip folder, not per clip: resolving links (a run folder reached through a link to
    # the clips' folder) costs a syscall each.
    folders = {os.path.dirname(clip): clip for clip in clip_paths}
    inside = next((clip for folder, clip in folders.items() if is_inside(folder, run_dir)), None)
    if inside is not None:
        fail(f"clip {inside} lies inside the run folder {run_dir}; inputs are never written: "
             f"choose another --run_name or --output_root")


def prepare(config: TrainConfig, checked: CheckedSplits | None = None) -> Prepared:
    """Validate config, devices, backbone, data and run folder. Writes nothing. `checked`:
    split CSVs a search driver has already validated (reused while the files are unchanged)."""
    config.validate()
    world = distributed.current().world
    if config.batch_size % world:
        fail(f"--batch_size {config.batch_size} is the global batch and must divide by the "
             f"{world} DDP processes (world size)")
    if config.run_name is None:
        if config.resume:
            fail("--resume needs --run_name (the run folder to continue)")
        config = config.replace(run_name=distributed.from_main(default_run_name(config)))
    device, device_ids = resolve_devices(config)
    resolve_amp(config.amp, device)
    # Cheap checks first: data before loading a (possibly multi-GB) backbone checkpoint.
    train_df = load_split(config.train_csv, "train", checked)
    val_df = load_split(config.val_csv, "val", checked)
    check_frames(config, [*train_df["clip_frames"], *val_df["clip_frames"]])
    for message in split_warnings(train_df, val_df, config.train_csv, config.val_csv):
        warnings.warn(message, stacklevel=2)

    check_writable_dir(config.output_root, "--output_root")
    run_dir, resume_state = check_run_dir(config)
    check_inputs_outside(config, run_dir, [*train_df["clip_path"], *val_df["clip_path"]])

    check_geometry(config)  # before loading the weights: seconds instead of minutes for Giant
    # (validate() has checked the variant name)
    peeked = peek_vmae_config(config.variant, config.backbone_ckpt, config.checkpoint_root) \
        if config.backbone == "vmae" else None
    for line in ignored_settings(config, peeked):
        warnings.warn(line, IgnoredSettingWarning, stacklevel=2)

    # Every global RNG from the seed: a run (or a reused Ray actor's next trial) starts the same.
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    backbone, info = create_backbone(config.backbone, config.variant, ckpt=config.backbone_ckpt,
                                     checkpoint_root=config.checkpoint_root)
    config = config.resolved(native_size=info.native_size, default_mean=info.mean, default_std=info.std)
    check_geometry(config, Geometry(info.frame_multiple, info.size_multiple, info.native_size,
                                    info.min_size))

    if resume_state is not None:
        check_resume_compatible(resume_state["config"], config, run_dir)
    model = build_classifier(backbone, config)
    return Prepared(config, info, model, device, device_ids, train_df, val_df, run_dir, resume_state)


# --- the loop ------------------------------------------------------------------------------
def make_loader(df: pd.DataFrame, config: TrainConfig, *, train: bool, pin: bool,
                shard: Callable[[list], list] | None = None) -> tuple[ClipLoader, EpochSampler]:
    """`num_workers` threads read uint8 crops + augmentation draws (data.BatchLoader);
    `loader.to_device` finishes each batch on the training device (augment.DeviceTransform).
    Nothing here touches the global RNG: a resumed run draws the same dropout masks."""
    dataset = ClipDataset(df["clip_path"].tolist(), df["label"].tolist(),
                          ClipTransform.from_config(config, train=train))
    sampler = EpochSampler(df["label"].to_numpy(), seed=config.seed, shuffle=train,
                           neg_pos_ratio=parse_neg_pos_ratio(config.neg_pos_ratio) if train else None)
    batches = BatchLoader(dataset, sampler, config.batch_size, threads=config.num_workers, pin=pin,
                          shard=shard)
    return ClipLoader(batches, DeviceTransform(config.input_size, config.mean, config.std)), sampler


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, criterion,
                    config: TrainConfig, state: RunState, device: torch.device,
                    amp_dtype: torch.dtype | None, writer, desc: str, *,
                    mix: ClipMix | None = None, ema: WeightEma | None = None,
                    shares: list[distributed.Share] | None = None) -> dict[str, float]:
    """One pass over `loader` (clips, or cached features with a frozen backbone). Nothing waits
    for the device per step: the running loss and accuracy stay on the device, and each step's
    loss is kept there until the next log point (every LOG_EVERY steps and the epoch's end),
    where one read checks them all for divergence and writes them to TensorBoard. `mix` mixes
    each batch on the device after its augmentation (the loss gets soft targets; accuracy
    counts hard labels); `ema` folds the weights in after each optimizer step. `shares`: under
    DDP, this rank's part of each global batch (its loss scaled to the global mean, the
    epoch's sums added over the ranks)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    pending: list[tuple[int, int, torch.Tensor]] = []  # (batch, global step, loss) not read yet
    seen, micro, optimizer_steps = 0, 0, 0
    lr_sums = {"lr_backbone": 0.0, "lr_head": 0.0}
    steps = len(loader)
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, total=steps, disable=not config.progress, leave=False,
               dynamic_ncols=True, file=sys.stderr)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        inputs, labels = loader.to_device(batch, device)
        inject_oom(config, state.epoch + 1, i)
        targets = labels
        if mix is not None:
            inputs, targets = mix(inputs, labels, state.epoch + 1, i)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(inputs)
        loss = criterion(logits.float(), targets)
        share = shares[i] if shares is not None else None
        if micro == 0:  # the epoch's last group of micro-batches may be shorter than grad_accum
            group_size = min(config.grad_accum, steps - i)
        scaler.scale((loss if share is None else loss * share.loss_scale) / group_size).backward()
        micro += 1
        if micro == config.grad_accum or i + 1 == steps:
            if config.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            micro = 0
            for key in lr_sums:  # the LR this step used, before the scheduler moves it
                lr_sums[key] += nominal_lr(optimizer, key.removeprefix("lr_"))
            optimizer_steps += 1
            state.global_step += 1
            if ema is not None:
                ema.update(state.global_step)
            if scheduler is not None:
                scheduler.step_update(state.global_step)
        batch_size = len(labels) if share is None else share.real
        loss_sum += loss.detach() * batch_size
        correct += (logits.detach().argmax(1) == labels)[:batch_size].sum()
        seen += batch_size
        pending.append((i, state.global_step, loss.detach()))
        if (i + 1) % LOG_EVERY == 0 or i + 1 == steps:
            running_loss = _read_losses(pending, loss_sum, state, writer)
            bar.set_postfix(loss=f"{running_loss / seen:.4f}",
                            clips_s=f"{seen / (time.perf_counter() - start):.1f}")
    bar.close()
    if shares is not None:
        loss_total, correct_total, seen = distributed.all_sum([loss_sum.item(), correct.item(), seen], device)
        loss_sum, correct = torch.tensor(loss_total), torch.tensor(correct_total)
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
            "train_clips": float(seen), "train_seconds": seconds, "clips_per_s": seen / seconds,
            **{key: total / max(1, optimizer_steps) for key, total in lr_sums.items()}}


def _read_losses(pending: list[tuple[int, int, torch.Tensor]], loss_sum: torch.Tensor,
                 state: RunState, writer) -> float:
    """One host sync for the steps since the last read: fail on the first non-finite loss
    (naming its batch), log each step's loss; returns the running loss sum."""
    values = torch.stack([loss for *_, loss in pending] + [loss_sum]).tolist()
    for (i, step, _), value in zip(pending, values):
        if not math.isfinite(value):
            fail(f"training diverged: loss is {value} at epoch {state.epoch + 1}, batch {i + 1}; "
                 "lower --lr_backbone/--lr_head or try --amp off")
        if writer is not None:
            writer.add_scalar("step/train_loss", value, step)
    pending.clear()
    return values[-1]


@torch.no_grad()
def predict(model: nn.Module, loader, config: TrainConfig, device: torch.device,
            amp_dtype: torch.dtype | None, criterion: nn.Module,
            shares: list[distributed.Share] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Class-1 probabilities in dataset order, labels, and mean loss (read from the device once).
    Under DDP (`shares`) every rank gets all ranks' predictions, in dataset order."""
    model.eval()
    probs, labels_all, loss_sum = [], [], torch.zeros((), device=device)
    for i, batch in enumerate(tqdm(loader, desc="validate", disable=not config.progress, leave=False,
                                   dynamic_ncols=True, file=sys.stderr)):
        inputs, labels = loader.to_device(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(inputs).float()
        if shares is not None:  # a weight-0 pad is dropped
            logits, labels = logits[:shares[i].real], labels[:shares[i].real]
        if len(labels):
            loss_sum += criterion(logits, labels) * len(labels)
        probs.append(torch.softmax(logits, dim=1)[:, 1])
        labels_all.append(labels)
    if shares is None:
        prob = torch.cat(probs).cpu().numpy().astype(np.float64)
        label = torch.cat(labels_all).cpu().numpy()
        return prob, label, loss_sum.item() / len(label)
    prob = distributed.gather_batches([p.cpu().numpy().astype(np.float64) for p in probs])
    label = distributed.gather_batches([lab.cpu().numpy() for lab in labels_all])
    (total,) = distributed.all_sum([loss_sum.item()], device)
    return prob, label, total / len(label)


def predictions_frame(val_df: pd.DataFrame, prob: np.ndarray, threshold: float) -> pd.DataFrame:
    """val_predictions.csv: upstream's columns, plus half/frame when the CSV has them."""
    if not math.isfinite(threshold):
        threshold = 0.5
    out = pd.DataFrame({
        "video_id": val_df["video_id"] if "video_id" in val_df else "",
        "path": val_df["path"],
        "label": val_df["label"].astype(int),
        "prob_header": prob,
        "prob_non_header": 1.0 - prob,
        "pred_label": (prob >= threshold).astype(int),
    })
    for column in ("half", "frame"):
        if column in val_df:
            out[column] = val_df[column].to_numpy()
    return out


def write_metrics_csv(run_dir: Path, history: list[dict[str, float]]) -> None:
    frame = pd.DataFrame(history)
    columns = [c for c in LEADING_COLUMNS if c in frame] + [c for c in frame if c not in LEADING_COLUMNS]
    artifacts.write_csv(frame[columns], run_dir / "metrics_epoch.csv")


def summary_line(config: TrainConfig, row: dict[str, float], is_best: bool) -> str:
    return (f"epoch {int(row['epoch'])}/{config.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.3f} | val loss {row['val_loss']:.4f} auc {row['val_auc']:.3f} "
            f"ap {row['val_ap']:.3f} f1 {row['val_f1']:.3f}@{row['val_threshold']:.2f} | "
            f"lr {row['lr_backbone']:.2e}/{row['lr_head']:.2e} | {row['epoch_seconds']:.1f}s "
            f"{row['clips_per_s']:.1f} clips/s{'  *best*' if is_best else ''}")


def build_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int) -> CosineLRScheduler | None:
    if config.scheduler == "none":
        return None
    total = max(1, steps_per_epoch * config.epochs)
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
    return CosineLRScheduler(optimizer, t_initial=total, lr_min=0.0, warmup_t=max(0, warmup),
                             warmup_lr_init=0.0, t_in_epochs=False)


def train(config: TrainConfig, on_epoch: Callable[[EpochReport], bool | None] | None = None,
          *, log: Callable[[str], None] = print, lock: bool = True,
          checked: CheckedSplits | None = None) -> TrainResult:
    """Run (or resume) one training run and write its artifacts; `on_epoch` may return True to stop.

    `lock=False` is for a caller that already owns the folder (a search owns its trials');
    `checked`: split CSVs already validated by the caller (see `prepare`).

    Launched by torchrun (or inside Ray Train's process group) every rank calls it: it joins
    the group, trains its share of each global batch, and only rank 0 writes and logs
    (headernet_core/distributed.py)."""
    created_group = distributed.init(config.cpu)
    try:
        with distributed.LauncherInterrupts():
            return _train_rank(config, on_epoch, log, lock, checked)
    finally:
        distributed.shutdown(created_group)


def _silent(_line: str) -> None:
    """The log of a rank other than 0."""


def _train_rank(config: TrainConfig, on_epoch: Callable[[EpochReport], bool | None] | None,
                log: Callable[[str], None], lock: bool, checked: CheckedSplits | None) -> TrainResult:
    main = distributed.current().main
    with warnings.catch_warnings() if not main else contextlib.nullcontext():
        if not main:  # rank 0 shows the warnings, once
            warnings.simplefilter("ignore")
        prep = prepare(config, checked)
    distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
    owner = FolderLock(prep.run_dir, "a training run") if lock and main else None
    heartbeat = Heartbeat(lambda: beat(prep.run_dir), *([owner.beat] if owner else []))
    created = not prep.run_dir.exists()
    try:
        if owner is not None:
            owner.acquire()
            if not config.resume:
                check_run_dir(prep.config)  # another run may have written here meanwhile
        if main:
            artifacts.remove_stale_temps(prep.run_dir, prep.run_dir / "checkpoints")
            heartbeat.start()
        return _run(prep, on_epoch, log if main else _silent, rank_log=log)
    except OSError as exc:  # disk full, quota, a vanished folder: status.json says failed
        resume = (f"; once that is fixed, --resume --run_name {prep.config.run_name} continues from "
                  f"its last completed epoch" if (prep.run_dir / "checkpoints" / "last.pt").is_file() else "")
        raise HeaderNetError(f"{describe_os_error(exc)}: run {prep.run_dir} stopped{resume}") from exc
    finally:
        heartbeat.stop()
        if owner is not None:
            owner.release()
            if created and prep.run_dir.is_dir() and not any(prep.run_dir.iterdir()):
                prep.run_dir.rmdir()  # refused before writing anything: leave nothing behind


def _run(prep: Prepared, on_epoch: Callable[[EpochReport], bool | None] | None,
         log: Callable[[str], None], rank_log: Callable[[str], None] = print) -> TrainResult:
    """The run's epochs. `log`: rank 0's lines (silent on the other ranks); `rank_log`: a line
    any rank says (a DDP rank that ran out of memory)."""
    config, model, device, run_dir = prep.config, prep.model, prep.device, prep.run_dir
    amp_dtype = resolve_amp(config.amp, device)
    ranks = distributed.current()
    main = ranks.main  # the one rank that writes

    def record(state: str, epochs_done: int, error: str | None = None, ended: OutOfMemoryEnd | None = None) -> None:
        if main:
            write_status(run_dir, state, epochs_done, error=error, world_size=ranks.world,
                         out_of_memory=ended.record() if ended else None)

    # From here on files are written.
    if main and prep.resume_state is None:
        # only finds something with --overwrite, or --resume, of a run without a completed epoch
        _remove_run_artifacts(run_dir)
    if main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        artifacts.write_yaml(run_dir / "config.yaml", config.to_dict())
    log(f"backbone {prep.info.name}: random initialisation" if prep.info.source is None
        else f"backbone {prep.info.name} loaded from {prep.info.source}")

    if device.type == "cpu":
        log(apply_thread_policy(config.threads, config.num_workers, ranks.local_world))
    # A frozen backbone runs once per clip and view, into the feature cache; the head trains on that.
    features = FrozenFeatures(config, prep.info, model.backbone, prep.train_df, prep.val_df, amp_dtype) \
        if config.uses_feature_cache else None
    model.to(device)
    parallel = len(prep.device_ids) > 1
    shard = distributed.shard_for(ranks)
    if features is None:
        plain: nn.Module = model
        net: nn.Module = nn.DataParallel(model, device_ids=prep.device_ids) if parallel else model
    else:
        plain = net = model.head
        feature_backbone = nn.DataParallel(model.backbone, device_ids=prep.device_ids) if parallel \
            else model.backbone
    train_loader, train_sampler, val_loader, val_sampler = _loaders(prep, config, features, shard)
    if ranks.active:
        net = distributed.wrap_ddp(plain, device)
    if config.compile:
        net = CompiledWithFallback(net, log)
    optimizer = build_optimizer(model, config, fused=device.type == "cuda")
    steps_per_epoch = _steps_per_epoch(train_sampler, config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = build_loss(config.loss, focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma,
                           label_smoothing=config.label_smoothing)
    # val_loss against the true labels: comparable between runs with different smoothing.
    val_criterion = build_loss(config.loss, focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma)
    mix = ClipMix.from_config(config)
    ema = WeightEma.from_config(model, config)
    # Under DDP each rank validates its part with the plain model (no collective per batch).
    eval_net = (plain if ranks.active else net) if ema is None else \
        _eval_net(ema.module, features is not None, prep.device_ids)
    state = RunState()

    if prep.resume_state is not None:
        state = _restore(prep.resume_state, model, optimizer, scheduler, scaler, config, steps_per_epoch,
                         ema)
        _drop_stale_best(run_dir, state.best_epoch)
        log(f"resuming {run_dir} after epoch {state.epoch}")
    elif config.resume:
        log(f"resuming {run_dir}: no epoch was completed, so it starts again from epoch 1 at batch "
            f"{config.batch_size} x {config.grad_accum} accumulation")

    plots = RunPlots(run_dir / "plots") if config.plots and main else None
    writer = None
    if config.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=state.epoch + 1 if state.epoch else None)
    log(f"run {run_dir}: {len(prep.train_df)} train / {len(prep.val_df)} val clips, "
        f"{len(train_sampler)} train clips per epoch, device {device}"
        f"{' x' + str(len(prep.device_ids)) if parallel else ''}"
        f"{f', {ranks.world} DDP processes' if ranks.active else ''}, "
        f"amp {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}")

    trained = (model, optimizer, scheduler, scaler, ema)
    # An out-of-memory retry of epoch 1 restarts from here; later epochs from last.pt.
    start_copy = _cpu_copy(_last_payload(*trained[:4], config, prep.info, state, ema)) \
        if state.epoch == 0 else None
    status = "running"
    record(status, state.epoch)
    finished = False   # "finished" recorded: every artifact of the last epoch is written
    try:
        while state.epoch < config.epochs:
            # Under DDP: rank 0 has recorded the last epoch, so a rank's out-of-memory record
            # (`_halve_for_restart`) cannot come before it and be overwritten.
            distributed.barrier()
            epoch = state.epoch + 1
            train_sampler.set_epoch(epoch)
            shares = distributed.batch_shares(len(train_sampler), config.batch_size, ranks)
            val_shares = distributed.batch_shares(len(val_sampler), config.batch_size, ranks)
            epoch_start = time.perf_counter()
            reset_peak(device, prep.device_ids)
            backbone_clips = 0
            if features is not None:  # computes what the cache lacks, once per run
                backbone_clips = distributed.main_first(
                    lambda: features.build(feature_backbone, device, amp_dtype, log))
            try:
                train_stats = train_one_epoch(net, train_loader, optimizer, scheduler, scaler, criterion,
                                              config, state, device, amp_dtype, writer,
                                              desc=f"epoch {epoch}/{config.epochs}", mix=mix, ema=ema,
                                              shares=shares)
                prob, labels, val_loss = predict(eval_net, val_loader, config, device, amp_dtype,
                                                 val_criterion, shares=val_shares)
            except torch.OutOfMemoryError:
                if ranks.active:   # the other ranks wait in an all-reduce: agreed by a restart
                    _halve_for_restart(prep, config, state.epoch, ranks, rank_log)
                    raise
                train_stats = None   # handled outside: the traceback holds the step's tensors
            if train_stats is None:
                config, state, (train_loader, train_sampler, val_loader, val_sampler) = _retry_smaller(
                    prep, config, epoch, features, trained, start_copy, log)
                continue
            if features is None:  # every train and val clip went through the backbone
                backbone_clips = int(train_stats["train_clips"]) + len(labels)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                val = classification_metrics(labels, prob, loss=val_loss)
            for w in {str(w.message) for w in caught}:
                log(f"warning: {w}")
            row = {"epoch": epoch, **train_stats, **val, "eval_weights": "model" if ema is None else "ema",
                   "val_clips": len(labels),
                   "backbone_clips": backbone_clips, "epoch_seconds": time.perf_counter() - epoch_start,
                   "peak_mem_gib": peak_gib(device, prep.device_ids)}
            state.epoch = epoch
            state.history.append(row)
            is_best = is_improvement(row, state.best_metrics, config.select_metric,
                                     SELECTABLE_METRICS[config.select_metric])
            if is_best and main:
                _save_best(run_dir, model if ema is None else ema.module, config, prep.info, epoch, row,
                           predictions_frame(prep.val_df, prob, row["val_threshold"]))
            if is_best:
                state.best_epoch, state.best_metrics = epoch, row
                if plots is not None:
                    plots.best = (epoch, labels, prob)
            last = run_dir / "checkpoints" / "last.pt"
            if main:
                write_metrics_csv(run_dir, state.history)
                checkpoints.save(last, _last_payload(model, optimizer, scheduler, scaler, config, prep.info,
                                                     state, ema))
                _drop_stale_best(run_dir, state.best_epoch)  # only now: last.pt points at the new best
            start_copy = None   # last.pt now holds the next epoch's start
            _write_scalars(writer, row, state.epoch)
            # Finished is recorded before the callback: a Tune scheduler may end the process there.
            last_epoch = state.epoch >= config.epochs
            if plots is not None:
                plots.draw(state, due_only=not last_epoch)
            record("finished" if last_epoch else "running", state.epoch)
            finished = last_epoch
            log(summary_line(config, row, is_best))
            if on_epoch is not None and distributed.from_main(bool(on_epoch(EpochReport(
                    epoch, row, state.best_epoch, state.best_metrics, is_best, run_dir, last)))):
                if not last_epoch:
                    status = "stopped"
                    break
        else:
            status = "finished"
        if plots is not None:
            plots.draw(state)   # a run stopped early: its last epochs
        record(status, state.epoch)
    except BaseException as exc:
        with interrupts_held():   # a signal now acts once the end is recorded
            if finished:  # e.g. Ray Tune ended the process in the last epoch's callback
                record("finished", state.epoch)
            elif isinstance(exc, SystemExit) and exc.code in (0, None):
                record("stopped", state.epoch)  # e.g. Ray Tune's scheduler ended it
            else:
                # A peer's out-of-memory reaches rank 0 as a vanished peer or torchrun's SIGTERM:
                # its recorded end, or the halving it wrote.
                ended = exc if isinstance(exc, OutOfMemoryEnd) else None
                reason = None
                if ranks.active and main and ended is None:
                    ended = recorded_end(read_status_record(run_dir))
                    reason = _peer_halving(run_dir, config) if ended is None else None
                record("failed" if ended or reason or isinstance(exc, Exception) else "interrupted", state.epoch,
                       error=reason or f"{type(ended or exc).__name__}: {ended or exc}", ended=ended)
        if plots is not None:   # after the status: a second Ctrl-C here loses only the plots
            plots.draw_if_possible(state, log)
        raise
    finally:
        if writer is not None:
            writer.close()
    best_ckpt = run_dir / "checkpoints" / f"best_epoch_{state.best_epoch}.pt" if state.best_epoch else None
    log(f"{status}: best epoch {state.best_epoch} {config.select_metric} "
        f"{(state.best_metrics or {}).get(config.select_metric, float('nan')):.4f} -> {best_ckpt}")
    return TrainResult(run_dir, status, state.epoch, state.best_epoch, state.best_metrics or {},
                       best_ckpt, config)


def _loaders(prep: Prepared, config: TrainConfig, features: FrozenFeatures | None,
             shard: Callable[[list], list] | None = None) -> tuple:
    """(train loader, its sampler, val loader, its sampler) at `config.batch_size`: over clips,
    or over cached features with a frozen backbone; `shard`: this rank's part under DDP."""
    if features is None:
        pin = prep.device.type == "cuda"
        train = make_loader(prep.train_df, config, train=True, pin=pin, shard=shard)
        val = make_loader(prep.val_df, config, train=False, pin=pin, shard=shard)
    else:
        train = features.loader(train=True, batch_size=config.batch_size, shard=shard)
        val = features.loader(train=False, batch_size=config.batch_size, shard=shard)
    return (*train, *val)


def _steps_per_epoch(train_sampler: EpochSampler, config: TrainConfig) -> int:
    return math.ceil(math.ceil(len(train_sampler) / config.batch_size) / config.grad_accum)


# --- out of memory: the epoch again at half the micro-batch ------------------------------------
def _cpu_copy(value: Any) -> Any:
    """A copy of a checkpoint payload whose tensors live on the CPU (training changes the
    originals in place)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


def _retry_smaller(prep: Prepared, config: TrainConfig, epoch: int, features: FrozenFeatures | None,
                   trained: tuple, start_copy: dict[str, Any] | None, log: Callable[[str], None]
                   ) -> tuple[TrainConfig, RunState, tuple]:
    """After `torch.OutOfMemoryError` in epoch `epoch`: its starting state back (model,
    optimizer, scheduler, scaler, EMA, RNG: last.pt, or `start_copy` in a first epoch), half
    the micro-batch and twice the accumulation (memory.halved_batch; ends the run at batch 1),
    recorded in config.yaml at once and in last.pt at the epoch's end, so a retried trial or
    `--resume` continues with them. Returns the new config, state and loaders."""
    model, optimizer, scheduler, scaler, ema = trained
    peak = peak_gib(prep.device, prep.device_ids)
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if prep.device.type == "cuda":
        torch.cuda.empty_cache()
    smaller = halved_batch(config, peak)
    log(f"out of memory in epoch {epoch} at batch {config.batch_size} (peak {peak:.1f} GiB): "
        f"epoch {epoch} again at batch {smaller.batch_size} x {smaller.grad_accum} accumulation")
    artifacts.write_yaml(prep.run_dir / "config.yaml", smaller.to_dict())
    loaders = _loaders(prep, smaller, features)
    payload = start_copy if start_copy is not None else \
        checkpoints.load(prep.run_dir / "checkpoints" / "last.pt")
    state = _restore(payload, model, optimizer, scheduler, scaler, smaller,
                     _steps_per_epoch(loaders[1], smaller), ema)
    return smaller, state, loaders


def _halve_for_restart(prep: Prepared, config: TrainConfig, epochs_done: int, ranks: distributed.Ranks,
                       log: Callable[[str], None]) -> None:
    """Under DDP, on a rank that hit `torch.OutOfMemoryError` in epoch `epochs_done + 1`: the
    epoch cannot be retried in-process, since the other ranks wait for this one in DDP's
    gradient all-reduce, so the ranks agree through a restart. This rank writes the halved
    config to config.yaml (atomically; every rank that ran out writes the same, and it is the
    one file a rank other than 0 writes) and says so; the caller re-raises, the launcher ends
    the group, and the restart (--resume, a search trial's retry) reads config.yaml on every
    rank. When the halved global batch would not divide by the ranks, `OutOfMemoryEnd` is
    raised instead and recorded in status.json as one process records it (also by a rank
    other than 0: rank 0 keeps that record)."""
    peak = peak_gib(prep.device, prep.device_ids)
    try:
        smaller = halved_batch(config, peak, ranks.world)
    except OutOfMemoryEnd as end:
        if not ranks.main:   # rank 0 records its own end (and a CLI prints rank 0's error only)
            write_status(prep.run_dir, "failed", epochs_done, error=f"{type(end).__name__}: {end}",
                         world_size=ranks.world, out_of_memory=end.record())
        log(f"{end} in epoch {epochs_done + 1} on DDP rank {ranks.rank}: nothing smaller is left to try, "
            f"the run ends")
        raise
    artifacts.write_yaml(prep.run_dir / "config.yaml", smaller.to_dict())
    log(f"out of memory in epoch {epochs_done + 1} at batch {config.batch_size} (peak {peak:.1f} GiB) on "
        f"DDP rank {ranks.rank}: config.yaml now holds batch {smaller.batch_size} x {smaller.grad_accum} "
        f"accumulation; the run ends here, and resuming it (--resume; a search trial's retry) "
        f"continues at that batch on every rank")


def _peer_halving(run_dir: Path, config: TrainConfig) -> str | None:
    """At the end of a DDP run on rank 0, which sees a peer's out-of-memory only as a vanished
    peer or torchrun's SIGTERM: the error to record when that peer wrote a halving to
    config.yaml (`_halve_for_restart`), else None."""
    try:
        saved = load_yaml_mapping(run_dir / "config.yaml")
    except (HeaderNetError, OSError):
        return None
    if saved.get("batch_size") == config.batch_size or not same_effective_batch(saved, config):
        return None
    return (f"OutOfMemoryError: a DDP rank ran out of memory at batch {config.batch_size}: config.yaml "
            f"now holds batch {saved['batch_size']} x {saved['grad_accum']} accumulation; resuming the "
            f"run (--resume; a search trial's retry) continues at that batch")


def _eval_net(ema_model: HeaderClassifier, on_features: bool, device_ids: list[int]) -> nn.Module:
    """What validation runs with --model_ema: the EMA model (its head on cached features),
    over the same GPUs as training."""
    net = ema_model.head if on_features else ema_model
    return nn.DataParallel(net, device_ids=device_ids) if len(device_ids) > 1 and not on_features else net


# --- artifacts of one epoch -----------------------------------------------------------------
def _model_payload(model: HeaderClassifier, config: TrainConfig, info: BackboneInfo) -> dict[str, Any]:
    return {"state_dict": model.state_dict(), "config": config.to_dict(),
            "backbone": {"family": info.family, "name": info.name, "arch": dict(info.arch)}}


def _save_best(run_dir: Path, model: HeaderClassifier, config: TrainConfig, info: BackboneInfo,
               epoch: int, row: dict[str, float], predictions: pd.DataFrame) -> None:
    ckpt_dir = run_dir / "checkpoints"
    checkpoints.save(ckpt_dir / f"best_epoch_{epoch}.pt",
                     {**_model_payload(model, config, info), "epoch": epoch, "metrics": row})
    artifacts.write_csv(predictions, run_dir / "val_predictions.csv")
    artifacts.write_json(run_dir / "best_metrics.json",
                         {**row, "epoch": epoch, "checkpoint": f"checkpoints/best_epoch_{epoch}.pt"})


def _remove_run_artifacts(run_dir: Path) -> None:
    for name in RUN_ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _drop_stale_best(run_dir: Path, best_epoch: int | None) -> None:
    """Keep only the best checkpoint last.pt records: the previous best after a new one, a new
    best written just before a crash (last.pt still records the previous one)."""
    for path in (run_dir / "checkpoints").glob("best_epoch_*.pt"):
        if path.name != f"best_epoch_{best_epoch}.pt":
            path.unlink()


def _write_scalars(writer, row: dict[str, float], epoch: int) -> None:
    if writer is None:
        return
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and not math.isnan(value):  # not text
            group = "train" if key.startswith("train") else "lr" if key.startswith("lr_") else \
                "val" if key.startswith("val") else "speed"
            writer.add_scalar(f"{group}/{key}", value, epoch)
    writer.flush()


class RunPlots:
    """plots/ of a run: drawn when the run ends, however it ends (finished, stopped by a
    scheduler, interrupted, failed after an epoch), and during it once the last drawing is
    PLOT_EVERY_S old. ROC and PR show the best epoch, kept here until drawn: redrawn only when
    it changed (a resumed run whose best epoch came before the resume keeps the earlier ones)."""

    clock = staticmethod(time.monotonic)

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.best: tuple[int, np.ndarray, np.ndarray] | None = None   # (epoch, labels, prob)
        self.drawn_best: int | None = None
        self.drawn_epochs = 0
        self.drawn_at = self.clock()   # the run's start: nothing drawn in its first minute

    def draw(self, state: RunState, due_only: bool = False) -> None:
        if not state.history or len(state.history) == self.drawn_epochs:
            return
        if due_only and self.clock() - self.drawn_at < PLOT_EVERY_S:
            return
        from .plots import write_plots

        fresh = self.best if self.best is not None and self.best[0] != self.drawn_best else None
        write_plots(self.folder, pd.DataFrame(state.history), *(fresh[1:] if fresh else (None, None)),
                    state.best_epoch)
        self.drawn_epochs, self.drawn_at = len(state.history), self.clock()
        if fresh is not None:
            self.drawn_best = fresh[0]

    def draw_if_possible(self, state: RunState, log: Callable[[str], None]) -> None:
        """At a run's error or interruption: the curves of its epochs, without hiding why it ended."""
        try:
            self.draw(state)
        except Exception as exc:  # noqa: BLE001 - the run's own error is the one to raise
            log(f"warning: plots not drawn: {type(exc).__name__}: {exc}")


# What `_last_payload` writes besides the model and `_restore` reads back.
# What a resume reads from last.pt besides the weights: the training state, then RunState's fields.
RESUME_KEYS = frozenset({"optimizer", "scheduler", "scaler", "rng", *(f.name for f in fields(RunState))})


def _last_payload(model, optimizer, scheduler, scaler, config, info, state: RunState,
                  ema: WeightEma | None = None) -> dict[str, Any]:
    """The training weights (never the EMA: a resume continues them) and, with --model_ema,
    the EMA's state as `model_ema`."""
    return {**_model_payload(model, config, info),
            **({"model_ema": ema.state_dict()} if ema is not None else {}),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(),
            "rng": checkpoints.rng_state(),
            **{f.name: getattr(state, f.name) for f in fields(RunState)}}


def _restore(payload: dict[str, Any], model, optimizer, scheduler, scaler, config: TrainConfig,
             steps_per_epoch: int, ema: WeightEma | None = None) -> RunState:
    model.load_state_dict(payload["state_dict"])
    if ema is not None:  # config.yaml matched, so last.pt was written with --model_ema too
        ema.load_state_dict(payload["model_ema"])
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler"):
        scheduler.load_state_dict(payload["scheduler"])
        scheduler.t_initial = max(1, steps_per_epoch * config.epochs)  # --epochs may have grown
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    checkpoints.set_rng_state(payload["rng"])
    state = RunState(**{f.name: payload[f.name] for f in fields(RunState)})
    state.history = list(state.history)   # not the payload's own list
    return state


# --- CLI ------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    run_cli(lambda: train(config_for_cli(argv)))


if __name__ == "__main__":
    main()
