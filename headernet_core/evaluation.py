"""Evaluate a trained checkpoint on a labelled CSV: at a threshold fixed beforehand, over one or
several views of each clip, with the errors per match.

    python -m headernet_core.evaluate --checkpoint report/header_experiments/RUN/checkpoints/best_epoch_3.pt \
        --val_csv splits/test.csv [--threshold T] [--views 2 --spatial_views 3] \
        [--predictions out.csv] [--metrics out.json] [--per_video out.csv]

The model is rebuilt from the architecture stored in the checkpoint, so the original backbone
checkpoint folder is not needed; preprocessing (frames, size, normalisation) comes from the
checkpoint's config.

Threshold: a clip is a header iff its probability >= the threshold. By default it is the one
stored with the weights, chosen on the validation split when the checkpoint was written (the
F1-best threshold of that epoch), so a test set is scored honestly. `--threshold` fixes another.
The `val_*` numbers are the trainer's, computed on THIS CSV, `val_f1` with a threshold swept on
it (optimistic on a test set; they reproduce what the trainer reported on its validation CSV).

Views (`--views T --spatial_views S`, test-time averaging): the probability of a clip is the
mean of its T x S views' probabilities.
- Temporal view k of T: the trainer's frames (`num_frames` evenly spaced over the clip) shifted
  by (k - (T-1)/2) / T of the spacing between two sampled frames, rounded to a frame and kept
  inside the clip. T = 1 (and the middle view of an odd T) is exactly the trainer's view.
- Spatial view s of S: 0 the whole frame (the trainer's validation view), 1 its horizontal
  flip, 2 the centre square crop of side `aug_crop_scale` x the short side (the tightest crop
  training used), each resized to the input size like validation.
"""
from __future__ import annotations

import argparse
import itertools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import artifacts, checkpoints
from .backbones import build_backbone
from .config import MAX_NUM_WORKERS, TrainConfig, inference_parser
from .augment import ClipLoader
from .data import AugParams, BatchLoader, ClipDataset, check_clips, read_split, sample_frame_indices
from .errors import fail, run_cli
from .losses import build_loss
from .metrics import classification_metrics, metrics_at_threshold
from .model import HeaderClassifier
from .paths import check_output_file, same_file
from .trainer import make_loader, predict, predictions_frame, resolve_amp, resolve_devices

MAX_SPATIAL_VIEWS = 3
PER_VIDEO_SHOWN = 10    # rows of the per-video table the CLI prints (all go to --per_video)


def load_classifier(checkpoint: str | Path) -> tuple[HeaderClassifier, TrainConfig, dict]:
    """A trained classifier (eval mode, CPU), its run config and the raw checkpoint payload."""
    payload = checkpoints.load(checkpoint)
    backbone_meta = payload.get("backbone") or {}
    if not isinstance(payload.get("config"), dict) or not isinstance(backbone_meta, dict) \
            or not isinstance(backbone_meta.get("arch"), dict):
        fail(f"{checkpoint}: no run config or backbone architecture stored; was it written by "
             f"headernet_core.train?")
    config = TrainConfig.from_dict(payload["config"], source=f"{checkpoint} config")
    family = backbone_meta.get("family")
    try:
        backbone = build_backbone(family, backbone_meta["arch"])
    except (TypeError, KeyError, ValueError) as exc:
        fail(f"{checkpoint}: the stored backbone family {family!r} does not match the stored "
             f"architecture ({type(exc).__name__}: {exc}); the checkpoint is damaged or was edited")
    model = HeaderClassifier(backbone, config.head_dropout)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        fail(f"{checkpoint}: weights do not fit the stored architecture ({str(exc).splitlines()[0]})")
    return model.eval(), config, payload


def checkpoint_threshold(payload: dict[str, Any]) -> float | None:
    """The validation threshold stored with the weights: a best checkpoint's epoch row, or for
    `last.pt` its last epoch's row; None when there is none (a one-class validation set)."""
    row = payload.get("metrics") or ((payload.get("history") or [{}])[-1])
    value = (row or {}).get("val_threshold")
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class View:
    """One test-time view of every clip (see the module docstring)."""
    temporal: int = 0
    temporal_views: int = 1
    spatial: int = 0

    @property
    def is_trainers(self) -> bool:
        """The whole frame at the trainer's frames: the unshifted (middle) temporal view of an
        odd count, including the only one (`view_frame_indices` shifts by zero)."""
        return self.spatial == 0 and 2 * self.temporal == self.temporal_views - 1


def view_frame_indices(num_available: int, num_frames: int, view: View) -> np.ndarray:
    """The frames of temporal view `view.temporal` of `view.temporal_views`."""
    base = sample_frame_indices(num_available, num_frames)
    if view.temporal_views == 1:
        return base
    spacing = (num_available - 1) / (num_frames - 1) if num_frames > 1 else (num_available - 1) / 2
    shift = (view.temporal - (view.temporal_views - 1) / 2) / view.temporal_views * spacing
    # around the trainer's frames (the middle view of an odd count is exactly them)
    positions = np.linspace(0, num_available - 1, num_frames) if num_frames > 1 else \
        base.astype(np.float64)
    return np.clip(np.floor(positions + shift + 0.5), 0, num_available - 1).astype(np.int64)


def view_region(height: int, width: int, view: View, crop_scale: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the pixels spatial view `view.spatial` reads from a frame:
    the whole frame (0, and 1, which is mirrored on the device), or the centre square (2)."""
    if view.spatial == 2:
        side = max(1, round(crop_scale * min(height, width)))
        return (height - side) // 2, (width - side) // 2, side, side
    return 0, 0, height, width


# The mirror view: a fixed draw that only flips (no crop, no jitter; `view_region` gives the box).
MIRROR = AugParams(flip=True, brightness=1.0, contrast=1.0, crop_side=1.0, crop_top=0.0, crop_left=0.0)


class ViewDataset(ClipDataset):
    """The validation clips of a run seen through one `View`: its frames (`frame_indices`), its
    pixels (`region`) and, for the mirror view, a flip that the device applies like training's
    flips. Everything else is the validation pipeline (device resize, normalisation)."""

    def __init__(self, base: ClipDataset, view: View, crop_scale: float) -> None:
        self.__dict__.update(base.__dict__)
        self.view, self.crop_scale = view, crop_scale

    def aug_params(self, key: tuple[int, int] | int) -> tuple[int, AugParams | None]:
        index, _ = super().aug_params(key)
        return index, MIRROR if self.view.spatial == 1 else None

    def frame_indices(self, num_available: int, key: tuple[int, int] | int = 0) -> np.ndarray:
        return view_frame_indices(num_available, self.transform.num_frames, self.view)

    def region(self, height: int, width: int, params: AugParams | None) -> tuple[int, int, int, int]:
        return view_region(height, width, self.view, self.crop_scale)


def check_views(views: int, spatial_views: int) -> None:
    if views < 1:
        fail(f"--views must be a positive integer, got {views}")
    if not 1 <= spatial_views <= MAX_SPATIAL_VIEWS:
        fail(f"--spatial_views must be 1 (whole frame), 2 (+ flip) or 3 (+ centre crop), "
             f"got {spatial_views}")


def clip_probabilities(model: HeaderClassifier, config: TrainConfig, frame: pd.DataFrame, *,
                       views: int = 1, spatial_views: int = 1) -> tuple[np.ndarray, float]:
    """Class-1 probability of each row of `frame` (`clip_path`, `label`; labels only feed the
    loss) averaged over `views` x `spatial_views` views, and the mean loss of view 0 (the first
    temporal view, whole frame). The trainer's own view (the only one, or the middle temporal
    view of an odd count) goes through exactly the trainer's validation loader; every view is
    one pass over `frame`."""
    check_views(views, spatial_views)
    device, _ = resolve_devices(config)
    amp_dtype = resolve_amp(config.amp, device)
    loader, _ = make_loader(frame, config, train=False, pin=device.type == "cuda")
    criterion = build_loss(config.loss, focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma)
    model = model.to(device)
    batches = loader.loader
    total, first_loss = None, None
    for view in (View(t, views, s) for t in range(views) for s in range(spatial_views)):
        if view.is_trainers:
            view_loader = loader
        else:
            dataset = ViewDataset(batches.dataset, view, config.aug_crop_scale)
            view_loader = ClipLoader(BatchLoader(dataset, batches.sampler, config.batch_size,
                                                 threads=config.num_workers, pin=batches.pin),
                                     loader.transform)
        prob, _, loss = predict(model, view_loader, config, device, amp_dtype, criterion)
        total = prob if total is None else total + prob
        first_loss = loss if first_loss is None else first_loss
    return total / (views * spatial_views), first_loss


def eval_config(config: TrainConfig, *, batch_size: int | None, num_workers: int,
                cpu: bool) -> TrainConfig:
    """The checkpoint's run config, with this evaluation's devices and batch size."""
    return config.replace(num_workers=num_workers, progress=False,
                          batch_size=batch_size or config.batch_size, cpu=cpu or config.cpu,
                          gpus=None if cpu else config.gpus)


def resolve_threshold(threshold: float | None, payload: dict[str, Any],
                      checkpoint: str | Path) -> tuple[float, str]:
    """(threshold, where it came from); a given `threshold` is checked by `check_inference`."""
    if threshold is not None:
        return float(threshold), "given"
    stored = checkpoint_threshold(payload)
    if stored is None:
        warnings.warn(f"{checkpoint}: no validation threshold stored; using 0.5 (pass --threshold)",
                      stacklevel=3)
        return 0.5, "default 0.5"
    return stored, "validation (stored in the checkpoint)"


def evaluate(checkpoint: str | Path, val_csv: str | Path, *, threshold: float | None = None,
             views: int = 1, spatial_views: int = 1, batch_size: int | None = None,
             num_workers: int = 0, cpu: bool = False) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics and per-clip predictions of `checkpoint` on the labelled `val_csv`.

    Keys: the trainer's `val_*` (as in metrics_epoch.csv, computed on this CSV: `val_f1` at a
    threshold swept on it); at `threshold` (default: the checkpoint's validation threshold):
    threshold, threshold_source, precision, recall, f1, accuracy, tp, fp, fn, tn; and views
    (T x S averaged per clip, see the module docstring). Predictions: val_predictions.csv's
    columns, `pred_label` at `threshold`."""
    check_inference(views=views, spatial_views=spatial_views, threshold=threshold,
                    batch_size=batch_size, num_workers=num_workers)
    model, config, payload = load_classifier(checkpoint)
    threshold, source = resolve_threshold(threshold, payload, checkpoint)
    config = eval_config(config, batch_size=batch_size, num_workers=num_workers, cpu=cpu)
    frame = read_split(val_csv, "val")
    check_clips(frame, val_csv)
    prob, loss = clip_probabilities(model, config, frame, views=views, spatial_views=spatial_views)
    labels = frame["label"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-class split is reported as NaN metrics
        metrics: dict[str, Any] = classification_metrics(labels, prob, loss=loss)
    metrics.update(metrics_at_threshold(labels, prob, threshold), threshold_source=source,
                   views=views * spatial_views)
    return metrics, predictions_frame(frame, prob, threshold)


def per_video_errors(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per `video_id` (match) of a predictions frame: clips, headers, predicted headers,
    false alarms, missed headers, errors and error rate; most errors first."""
    frame = predictions.assign(
        video_id=predictions["video_id"].astype(str).replace("", "(none)"),
        false_alarm=(predictions["pred_label"] == 1) & (predictions["label"] == 0),
        missed=(predictions["pred_label"] == 0) & (predictions["label"] == 1))
    table = frame.groupby("video_id", sort=True).agg(
        clips=("label", "size"), headers=("label", "sum"), predicted=("pred_label", "sum"),
        false_alarms=("false_alarm", "sum"), missed=("missed", "sum")).reset_index()
    table["errors"] = table["false_alarms"] + table["missed"]
    table["error_rate"] = table["errors"] / table["clips"]
    return table.sort_values(["errors", "video_id"], ascending=[False, True], kind="stable",
                             ignore_index=True)


def check_inference(*, views: int, spatial_views: int, threshold: float | None,
                    batch_size: int | None, num_workers: int) -> None:
    """What `evaluate` and `predict` are given, checked before the model loads (the CLIs and
    the Python API alike)."""
    check_views(views, spatial_views)
    if threshold is not None and not 0 <= threshold <= 1:
        fail(f"--threshold must be between 0 and 1, got {threshold}")
    if batch_size is not None and batch_size < 1:
        fail(f"--batch_size must be a positive integer, got {batch_size}")
    if not 0 <= num_workers <= MAX_NUM_WORKERS:
        fail(f"--num_workers must be in 0..{MAX_NUM_WORKERS}, got {num_workers}")


def format_table(frame: pd.DataFrame) -> list[str]:
    """A small frame as aligned text lines (floats to 3 digits)."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
             for row in frame.itertuples(index=False)]
    widths = [max(len(str(c)) for c in column) for column in zip(frame.columns, *cells)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
            for row in [list(frame.columns), *cells]]


def main(argv: Sequence[str] | None = None) -> None:
    cli(inference_parser("evaluate").parse_args(argv))


def cli(args: argparse.Namespace) -> None:
    """`python -m headernet_core.evaluate` once its flags are read (`config.inference_parser`)."""
    def body() -> None:
        outputs = [flag for flag in ("predictions", "metrics", "per_video") if getattr(args, flag)]
        for flag in outputs:  # checked before minutes of inference
            check_output_file(getattr(args, flag), f"--{flag}", inputs=(args.checkpoint, args.val_csv))
        for first, second in itertools.combinations(outputs, 2):
            if same_file(getattr(args, first), getattr(args, second)):
                fail(f"--{first} and --{second} are the same file {getattr(args, second)}; "
                     f"give different paths")
        metrics, predictions = evaluate(
            args.checkpoint, args.val_csv, threshold=args.threshold, views=args.views,
            spatial_views=args.spatial_views, batch_size=args.batch_size,
            num_workers=args.num_workers, cpu=args.cpu)
        per_video = per_video_errors(predictions)
        for path, frame in ((args.predictions, predictions), (args.per_video, per_video)):
            if path:
                artifacts.write_csv(frame, path)
        if args.metrics:
            artifacts.write_json(args.metrics, metrics)
        print(f"at threshold {metrics['threshold']:.4g} ({metrics['threshold_source']}), "
              f"{metrics['views']} view(s) per clip: f1 {metrics['f1']:.4f}, precision "
              f"{metrics['precision']:.4f}, recall {metrics['recall']:.4f}, accuracy "
              f"{metrics['accuracy']:.4f} (tp {metrics['tp']}, fp {metrics['fp']}, fn "
              f"{metrics['fn']}, tn {metrics['tn']})")
        print("the trainer's metrics on this CSV (val_f1 etc. at a threshold swept on it):")
        trainer_keys = [k for k in metrics if k.startswith("val_")]
        width = max(map(len, trainer_keys))
        for key in trainer_keys:
            value = metrics[key]
            print(f"  {key:<{width}}  {value:.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
        print(f"errors per video_id ({len(per_video)} in all, most first):")
        print("\n".join("  " + line for line in format_table(per_video.head(PER_VIDEO_SHOWN))))

    run_cli(body)


if __name__ == "__main__":
    main()
