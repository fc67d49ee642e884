"""Clip data: split CSVs, `.npy` clips, frame sampling, per-epoch neg:pos resampling, and the
loader side of augmentation.

Inputs are upstream's legacy cache format: a CSV (`path,label[,video_id,half,frame,...]`) whose
`path` points at a `(T, S, S, 3)` uint8 `.npy` clip, usually written without its `_s.npy`
suffix and as an absolute path of another machine. Everything a user can get wrong is checked
up front (`read_split`, `check_clips`) so a run fails in one line before any worker starts.
This module needs numpy and pandas only (torch is imported where a batch is built), so the
search driver checks CSVs without loading torch.

Why it looks like this:
- uint8 on the CPU, float on the device. A loader thread memory-maps the clip, copies only
  the sampled frames' crop box into the batch (one copy, into pinned memory for a GPU) and
  sends the clip's augmentation draw along as five numbers; `headernet_core.augment` resizes,
  flips, jitters and normalises the whole batch on the training device. The old per-clip CPU
  transform spent ~95% of a worker's time on float round trips and delivered 0.03x a raw
  `np.load`; a loader thread now delivers ~0.6x (bench/loader.py, docs/performance.md).
- Dataset keys are `(index, epoch)`: the augmentation of a clip is a pure function of
  `(seed, epoch, index)`, so results do not depend on worker count, worker order or persistent
  workers (upstream had to re-pickle the dataset each epoch for that).
- Augmentation draws ONE set of parameters per clip and applies it to every frame; per-frame
  draws made upstream's clips flicker in time.
"""
from __future__ import annotations

import math
import mmap
import os
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import pandas as pd

from .errors import fail, fail_not_utf8
from .paths import same_file

if TYPE_CHECKING:
    from .config import TrainConfig

REQUIRED_COLUMNS = ("path", "label")
SCHEMA_HINT = "path,label[,video_id,half,frame,...]"
MAX_EXAMPLES = 5  # missing clips listed in the error message
# --num_frames beyond this many times the longest clip is refused (short clips repeat frames).
MAX_FRAME_REPEAT = 8


# --- CSV reading and validation -----------------------------------------------------------
def row_number(position: int) -> int:
    """Row of a data line as an editor or spreadsheet shows it (the header is row 1)."""
    return position + 2


def read_index_csv(csv_path: str | Path, split: str, *, as_text: bool = False) -> pd.DataFrame:
    """Read a clip-index CSV and check the file-level things: exists, parses, has `path` and
    `label`, has rows. `as_text` keeps every cell as written (the split tool round-trips them);
    otherwise only `path`/`label` are read as text and other columns get pandas' types."""
    csv_path = Path(csv_path)
    flag = f" (--{split}_csv)" if split in ("train", "val", "input") else ""
    if not csv_path.is_file():
        fail(f"{csv_path}: {split} CSV not found{flag}")
    dtype: type | dict[str, type] = str if as_text else {c: str for c in REQUIRED_COLUMNS}
    try:  # utf-8-sig: a spreadsheet's byte-order mark must not rename the first column
        df = pd.read_csv(csv_path, dtype=dtype, keep_default_na=not as_text, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        fail(f"{csv_path}: {split} CSV is empty; expected a header line {SCHEMA_HINT}")
    except UnicodeDecodeError as exc:
        fail_not_utf8(csv_path, exc)
    except (pd.errors.ParserError, OSError) as exc:
        fail(f"{csv_path}: not a readable CSV ({' '.join(str(exc).split())})")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        found = ", ".join(map(str, df.columns)) or "none"
        fail(f"{csv_path}: missing column(s) {', '.join(missing)}; expected {SCHEMA_HINT}, "
             f"found {found}")
    if df.empty:
        fail(f"{csv_path}: {split} CSV has a header but no rows")
    return df.reset_index(drop=True)


def _cell_text(value: object) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def parse_labels(values: pd.Series, csv_path: str | Path) -> np.ndarray:
    """Labels as int64 0/1. Integral floats ("1.0") are accepted because spreadsheets write
    them; anything else fails naming the row and the value."""
    labels = np.empty(len(values), dtype=np.int64)
    for position, value in enumerate(values):
        text = _cell_text(value).strip()
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if number not in (0.0, 1.0):
            fail(f"{csv_path}: row {row_number(position)}: label must be 0 or 1, got {text!r}")
        labels[position] = int(number)
    return labels


def check_paths_present(values: pd.Series, csv_path: str | Path) -> list[str]:
    """Paths as written; an empty cell fails naming its row."""
    paths = [_cell_text(v).strip() for v in values]
    for position, text in enumerate(paths):
        if not text:
            fail(f"{csv_path}: row {row_number(position)}: path is empty; expected a clip path")
    return paths


# --- clip path resolution -----------------------------------------------------------------
def path_basename(path_text: str) -> str:
    """Last component of a path written on any OS (upstream CSVs hold other machines' paths)."""
    return re.split(r"[\\/]", path_text.rstrip("\\/"))[-1]


def find_clip(path_text: str, csv_dir: Path) -> tuple[Path, Path] | None:
    """(base that matched, clip file) of the first existing candidate, or None.

    Bases, in the order tried: the path as written (absolute or relative to the working
    directory), relative to the CSV's folder (the same path when absolute), then
    `<CSV folder>/<basename>`. Files of a base: `x.npy` as is; otherwise upstream's
    `<x>_s.npy`, then `<x>.npy`."""
    written = Path(path_text)
    for base in dict.fromkeys([written, csv_dir / written, csv_dir / path_basename(path_text)]):
        suffixes = [""] if base.name.endswith(".npy") else ["_s.npy", ".npy"]
        for candidate in (base.with_name(base.name + suffix) for suffix in suffixes):
            if candidate.is_file():
                return base, candidate
    return None


def resolve_clips(paths: Sequence[str], csv_path: str | Path) -> list[str]:
    """Absolute path of the clip each CSV path points at (`find_clip`); all missing ones are
    reported together in one line."""
    csv_dir = Path(csv_path).parent
    hits = [find_clip(p, csv_dir) for p in paths]
    resolved = [os.path.abspath(hit[1]) if hit else None for hit in hits]
    missing = [p for p, r in zip(paths, resolved) if r is None]
    if missing:
        examples = ", ".join(missing[:MAX_EXAMPLES])
        fail(f"{csv_path}: {len(missing)} of {len(paths)} clips not found, e.g. {examples}; "
             f"looked for <path>, <path>_s.npy or <path>.npy as written, under {csv_dir} "
             f"and as {csv_dir}/<basename>")
    return resolved  # type: ignore[return-value]


def read_split(csv_path: str | Path, split: str) -> pd.DataFrame:
    """Validated split CSV: all original columns, `label` as int 0/1 and `clip_path` (absolute
    path of the resolved `.npy`). `split` ("train"/"val") only appears in messages."""
    df = read_index_csv(csv_path, split)
    paths = check_paths_present(df["path"], csv_path)
    df["label"] = parse_labels(df["label"], csv_path)
    df["clip_path"] = resolve_clips(paths, csv_path)
    return df


def check_has_both_classes(df: pd.DataFrame, csv_path: str | Path) -> None:
    """Training needs positives and negatives (the focal loss and neg:pos sampling assume it)."""
    for label, name in ((1, "positive"), (0, "negative")):
        if not (df["label"] == label).any():
            fail(f"{csv_path}: no {name} clips (label {label}) among {len(df)} rows; training needs both classes")


# --- clip files ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NpyLayout:
    """Where a `.npy` file keeps its array: what `np.load` learns from the header."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int            # bytes before the data

    @property
    def end(self) -> int:
        """Bytes the file needs to hold all the data the header promises."""
        return self.offset + math.prod(self.shape) * self.dtype.itemsize


def read_npy_layout(path: str | Path) -> NpyLayout:
    """The header alone (ValueError if the file is not a `.npy`)."""
    with open(path, "rb") as fp:
        fmt = np.lib.format
        # 2.0 and 3.0 share one layout
        read_header = fmt.read_array_header_1_0 if fmt.read_magic(fp) == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = read_header(fp)
        return NpyLayout(tuple(shape), dtype, bool(fortran_order), fp.tell())


def clip_problem(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """What is wrong with a clip array of this shape/dtype, or None if it is usable."""
    if len(shape) != 4 or shape[-1] != 3:
        return f"has shape {tuple(shape)}; expected (T, H, W, 3)"
    if dtype != np.uint8:
        return f"has dtype {dtype}; expected uint8"
    if shape[0] == 0:
        return "has 0 frames; expected at least 1"
    if shape[1] == 0 or shape[2] == 0:
        return f"has empty frames {tuple(shape)}; expected H, W >= 1"
    return None


def check_clips(df: pd.DataFrame, csv_path: str | Path) -> list[tuple[int, ...]]:
    """Read each clip's header (not its data) and fail on the first unusable one, so a bad
    cache file stops the run before training instead of killing a worker mid-epoch. Returns
    the clips' shapes."""
    shapes = []
    for position, clip_path in enumerate(df["clip_path"]):
        where = f"{csv_path}: row {row_number(position)}: clip {clip_path}"
        try:
            layout = read_npy_layout(clip_path)
        except (ValueError, OSError, EOFError) as exc:
            fail(f"{where} is not a valid .npy file ({' '.join(str(exc).split())})")
        problem = clip_problem(layout.shape, layout.dtype)
        if problem:
            fail(f"{where} {problem}")
        size = os.path.getsize(clip_path)
        if size < layout.end:
            fail(f"{where} is truncated ({size} bytes; its header needs {layout.end})")
        shapes.append(layout.shape)
    return shapes


def split_warnings(train_df: pd.DataFrame, val_df: pd.DataFrame, train_csv: str | Path,
                   val_csv: str | Path) -> list[str]:
    """What makes validation scores lie without being an error: the same file as train and
    val, clips in both splits, matches (`video_id`) in both, and clips listed twice."""
    messages = []
    if same_file(train_csv, val_csv):
        messages.append(f"{train_csv} is both --train_csv and --val_csv: validation scores will "
                        f"be training scores")
    else:
        shared = set(train_df["clip_path"]) & set(val_df["clip_path"])
        if shared:
            messages.append(f"{len(shared)} of the {len(val_df)} clips in {val_csv} are also in "
                            f"{train_csv} (e.g. {sorted(shared)[0]}): validation scores will be "
                            f"too high")
        if "video_id" in train_df and "video_id" in val_df:
            ids = set(train_df["video_id"].astype(str)) & set(val_df["video_id"].astype(str))
            if ids:
                messages.append(f"{len(ids)} video_id value(s) are in both {train_csv} and "
                                f"{val_csv} (e.g. {sorted(ids)[0]}): clips of one match in both "
                                f"splits leak; split_dataset keeps each video_id in one split")
    for df, csv in ((train_df, train_csv), (val_df, val_csv)):
        repeats = int(df["clip_path"].duplicated().sum())
        if repeats:
            messages.append(f"{csv}: {repeats} row(s) repeat a clip listed earlier in the file")
    return messages


# Split frames a caller has validated, by (split, absolute CSV path, size, mtime): a search
# driver checks each CSV once and hands the result to every trial.
CheckedSplits = dict[tuple[str, str, int, int], pd.DataFrame]


def _split_identity(csv_path: str | Path, split: str) -> tuple[str, str, int, int] | None:
    try:
        stat = os.stat(csv_path)
    except OSError:
        return None
    return split, os.path.abspath(csv_path), stat.st_size, stat.st_mtime_ns


def load_split(csv_path: str | Path, split: str, checked: CheckedSplits | None = None) -> pd.DataFrame:
    """A split CSV read and fully checked (`read_split`, both classes for "train",
    `check_clips`, whose frame counts become column `clip_frames`), or the frame `checked`
    holds for this very file (same path, size, mtime)."""
    key = _split_identity(csv_path, split)
    if checked and key in checked:
        return checked[key]
    frame = read_split(csv_path, split)
    if split == "train":
        check_has_both_classes(frame, csv_path)
    frame["clip_frames"] = [shape[0] for shape in check_clips(frame, csv_path)]
    return frame


def check_splits(csvs: dict[str, str | Path]) -> CheckedSplits:
    """`load_split` every `{split: csv}` and keep the results for `load_split(checked=...)`."""
    checked: CheckedSplits = {}
    for split, csv_path in csvs.items():
        frame = load_split(csv_path, split)
        key = _split_identity(csv_path, split)
        if key is not None:
            checked[key] = frame
    return checked


def check_frames(config: TrainConfig, clip_frames: Sequence[int]) -> None:
    """Short clips repeat frames, within reason: --num_frames far beyond every clip is a typo."""
    longest = max(clip_frames)
    if config.num_frames > MAX_FRAME_REPEAT * longest:
        fail(f"--num_frames {config.num_frames} is more than {MAX_FRAME_REPEAT}x the longest clip "
             f"({longest} frames in {config.train_csv} / {config.val_csv}); use at most "
             f"{MAX_FRAME_REPEAT * longest}")


def sample_frame_indices(num_available: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread evenly over the whole clip, first and last frame included:
    `linspace(0, T-1, n)` rounded to the nearest frame (halves up). Shorter clips repeat frames
    in order (11 -> 16 repeats every other frame) instead of upstream's pad-and-sort, which
    stretched the start of the clip and squeezed its end."""
    if num_available < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_available}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_frames == 1:
        return np.array([(num_available - 1) // 2], dtype=np.int64)  # the centre frame
    positions = np.linspace(0, num_available - 1, num_frames)
    return np.clip(np.floor(positions + 0.5), 0, num_available - 1).astype(np.int64)


def frame_segments(num_available: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last frame `(lo, hi)` of each sampled frame's segment, for temporal jitter.

    Segment k holds the frames nearer to the k-th evenly spaced position p_k = k (T-1)/(n-1)
    than to any other (a frame halfway between two goes to the later one), so the segments
    tile the clip and each holds its evenly spaced frame `sample_frame_indices(T, n)[k]`. A
    clip no longer than `num_frames` has one-frame segments (no jitter); one sampled frame's
    segment is the whole clip. Integer arithmetic: the boundaries (k - 1/2)(T-1)/(n-1) are
    exact."""
    if num_frames == 1:
        return np.zeros(1, dtype=np.int64), np.full(1, num_available - 1, dtype=np.int64)
    k = np.arange(num_frames, dtype=np.int64)
    span, steps = num_available - 1, 2 * (num_frames - 1)
    lo = -((-(2 * k - 1) * span) // steps)               # ceil((k - 1/2) (T-1)/(n-1))
    hi = -((-(2 * k + 1) * span) // steps) - 1           # ceil((k + 1/2) (T-1)/(n-1)) - 1
    lo, hi = np.clip(lo, 0, span), np.clip(hi, 0, span)
    even = sample_frame_indices(num_available, num_frames)
    short = hi < lo                                      # T < n: no frame nearer than the next
    return np.where(short, even, lo), np.where(short, even, hi)


def jittered_frame_indices(num_available: int, num_frames: int, u: np.ndarray) -> np.ndarray:
    """One frame per segment (`frame_segments`), chosen by the uniform draws `u` in [0, 1)."""
    lo, hi = frame_segments(num_available, num_frames)
    return np.minimum(lo + np.floor(u * (hi - lo + 1)).astype(np.int64), hi)


def load_clip_frames(path: str, num_frames: int) -> np.ndarray:
    """The sampled frames `(n, H, W, 3)` uint8, reading only those frames through a memmap."""
    clip = np.load(path, mmap_mode="r")
    problem = clip_problem(clip.shape, clip.dtype)
    if problem:
        fail(f"clip {path} {problem}")
    indices = sample_frame_indices(clip.shape[0], num_frames)
    return np.ascontiguousarray(clip[indices])


# --- per-epoch neg:pos sampling -----------------------------------------------------------
def epoch_indices(labels: np.ndarray, neg_pos_ratio: float | None, seed: int, epoch: int) -> np.ndarray:
    """Row indices of one training epoch: every positive plus `ratio x #positives` negatives
    drawn without replacement (all negatives if fewer exist), fresh each epoch. RNG is
    `default_rng(seed + epoch)` like upstream. `None` takes every row. The result is shuffled
    i.i.d. (upstream grouped by video, which made batches of near-duplicate frames)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed + epoch)
    if neg_pos_ratio is None:
        return rng.permutation(len(labels)).astype(np.int64)
    positives = np.flatnonzero(labels == 1)
    negatives = np.flatnonzero(labels == 0)
    if len(positives) == 0:
        fail(f"neg_pos_ratio {neg_pos_ratio} needs at least one positive clip, the split has none")
    wanted = min(len(negatives), int(round(neg_pos_ratio * len(positives))))
    chosen = rng.choice(negatives, size=wanted, replace=False)
    return rng.permutation(np.concatenate([positives, chosen])).astype(np.int64)


class EpochSampler:
    """Yields `(index, epoch)` dataset keys. Train (`shuffle=True`): `epoch_indices` order;
    eval: every row in order. Call `set_epoch` before each epoch."""

    def __init__(self, labels: Sequence[int] | np.ndarray, *, neg_pos_ratio: float | None,
                 seed: int, shuffle: bool) -> None:
        if not shuffle and neg_pos_ratio is not None:
            raise ValueError("neg_pos_ratio resamples training epochs; eval (shuffle=False) uses every row")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.neg_pos_ratio = neg_pos_ratio
        self.seed = seed
        self.shuffle = shuffle
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.shuffle:
            self.indices = epoch_indices(self.labels, self.neg_pos_ratio, self.seed, epoch)
        else:
            self.indices = np.arange(len(self.labels), dtype=np.int64)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(int(i), self.epoch) for i in self.indices])

    def __len__(self) -> int:
        return len(self.indices)


# --- augmentation parameters ---------------------------------------------------------------
VIEW_STREAM = 0x76696577  # "view": keeps the cached views' draws apart from the epochs' draws
JITTER_STREAM = 0x6A697474  # "jitt": temporal jitter's draws, apart from the spatial ones


@dataclass(frozen=True)
class AugParams:
    """One clip's augmentation draw; the same values are applied to every frame."""

    flip: bool
    brightness: float
    contrast: float
    crop_side: float   # fraction of min(H, W)
    crop_top: float    # position in [0, 1) of the free vertical range
    crop_left: float   # position in [0, 1) of the free horizontal range

    def crop_box(self, height: int, width: int) -> tuple[int, int, int]:
        """(top, left, side) in pixels of the square crop."""
        side = max(1, min(height, width, round(self.crop_side * min(height, width))))
        top = min(height - side, int(self.crop_top * (height - side + 1)))
        left = min(width - side, int(self.crop_left * (width - side + 1)))
        return top, left, side


def crop_region(height: int, width: int, params: AugParams | None) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the pixels a clip is resized from: the crop box, or the
    whole frame when the clip is not augmented."""
    if params is None:
        return 0, 0, height, width
    top, left, side = params.crop_box(height, width)
    return top, left, side, side


@dataclass(frozen=True)
class ClipTransform:
    """How a clip becomes a `(3, n, size, size)` input: the settings, and the seeded draws.

    Train: ONE draw per clip from `default_rng([seed, epoch, index])` (reproducible in any
    worker) of a square crop (side U[crop_scale, 1] of the short side, uniform position), a
    horizontal flip (prob `flip`), brightness and contrast factors U[1-jitter, 1+jitter]; applied
    in that order to every frame, resizing with antialias after the crop. Only brightness and
    contrast: upstream channels are three time-shifted greys, which hue/saturation would break.
    Eval (`train=False`): resize only.

    The work is split in two (see `headernet_core.augment`): the loader reads the crop box's
    uint8 pixels of the sampled frames and sends the draw along; the training device resizes,
    flips, jitters and normalises the whole batch at once.
    """

    num_frames: int
    size: int
    train: bool
    flip: float = 0.5
    jitter: float = 0.1
    crop_scale: float = 0.8
    seed: int = 0
    temporal_jitter: bool = False  # training only (see `frame_indices`); independent of augment

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.size < 1:
            fail(f"clip transform needs num_frames >= 1 and size >= 1, got {self.num_frames}, {self.size}")
        if not 0 <= self.flip <= 1 or not 0 <= self.jitter <= 1:
            fail(f"aug flip and jitter must be in [0, 1], got {self.flip}, {self.jitter}")
        if not 0 < self.crop_scale <= 1:
            fail(f"aug crop_scale must be in (0, 1], got {self.crop_scale}")
        if self.seed < 0:
            fail(f"seed must be >= 0 for clip augmentation, got {self.seed}")

    @classmethod
    def from_config(cls, config: TrainConfig, *, train: bool) -> ClipTransform:
        """The train or eval transform of a resolved config (`input_size` filled in);
        `augment=False` makes the train transform resize only."""
        if config.input_size is None:
            raise ValueError("config.input_size is unset; use TrainConfig.resolved() first")
        return cls(num_frames=config.num_frames, size=config.input_size,
                   train=train and config.augment, flip=config.aug_flip,
                   jitter=config.aug_jitter, crop_scale=config.aug_crop_scale, seed=config.seed,
                   temporal_jitter=train and config.temporal_jitter)

    def frame_indices(self, num_available: int, epoch: int, index: int) -> np.ndarray:
        """The frames clip `index` is read at in `epoch`: evenly spaced, or with
        `temporal_jitter` one random frame of each segment from
        `default_rng([seed, JITTER_STREAM, epoch, index])` (the same in any worker or resume)."""
        if not self.temporal_jitter:
            return sample_frame_indices(num_available, self.num_frames)
        u = np.random.default_rng([self.seed, JITTER_STREAM, epoch, index]).random(self.num_frames)
        return jittered_frame_indices(num_available, self.num_frames, u)

    def params(self, epoch: int, index: int) -> AugParams:
        """The draw for clip `index` in `epoch`; always six numbers in a fixed order so that
        changing one probability does not reshuffle the others."""
        return self._draw(np.random.default_rng([self.seed, epoch, index]).random(6))

    def epoch_params(self, epoch: int, index: int) -> AugParams | None:
        """What the training loader applies: the epoch's draw, or nothing (eval, no augment)."""
        return self.params(epoch, index) if self.train else None

    def view_params(self, view: int, index: int) -> AugParams | None:
        """A fixed view of a clip for the feature cache: view 0 is the clip un-augmented (what
        validation sees), view v >= 1 is one seeded draw that never changes between epochs."""
        if view == 0:
            return None
        return self._draw(np.random.default_rng([self.seed, VIEW_STREAM, view, index]).random(6))

    def epoch_views(self, epoch: int, clips: int, views: int) -> np.ndarray:
        """Which of `views` cached views each of `clips` clips trains on in `epoch` (seeded):
        entry i is clip i's view."""
        if views <= 1:
            return np.zeros(clips, dtype=np.int64)
        return np.random.default_rng([self.seed, VIEW_STREAM, epoch, views]).integers(views, size=clips)

    def _draw(self, u: np.ndarray) -> AugParams:
        return AugParams(
            flip=bool(u[0] < self.flip),
            brightness=float(1 + self.jitter * (2 * u[1] - 1)),
            contrast=float(1 + self.jitter * (2 * u[2] - 1)),
            crop_side=float(self.crop_scale + (1 - self.crop_scale) * u[3]),
            crop_top=float(u[4]),
            crop_left=float(u[5]),
        )


# --- dataset and loader: uint8 crops and their draws, one batch at a time --------------------
AUG_FIELDS = ("height", "width", "flip", "brightness", "contrast")


class ClipBatch(NamedTuple):
    """What the loader hands to the training device: only bytes and numbers, no float pixels.

    frames: uint8 `(B, n, H, W, 3)`, clip b's crop in `[:h_b, :w_b]` (zero padding beyond it
    when the crops of a batch differ in size); aug: float32 `(B, 5)` = `AUG_FIELDS` per clip."""

    frames: Any
    aug: Any
    labels: Any
    indices: Any


class ClipDataset:
    """Clips by `(index, epoch)` key (or a plain index = epoch 0); `views=True` makes the key
    `(index, view)` of a fixed cached view instead (see `ClipTransform.view_params`).
    `read_batch` copies each sampled frame's crop box once, from the memory-mapped file
    straight into the batch tensor."""

    def __init__(self, clip_paths: Sequence[str], labels: Sequence[int], transform: ClipTransform,
                 *, views: bool = False) -> None:
        if len(clip_paths) != len(labels):
            raise ValueError(f"{len(clip_paths)} clip paths but {len(labels)} labels")
        self.paths = np.array([os.fsencode(p) for p in clip_paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.views = views
        # Parsing a .npy header (ast.literal_eval) cost as much as copying the clip: once per
        # clip and process, checked against the file's size and mtime on every read.
        self._layouts: dict[int, tuple[int, int, NpyLayout]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def aug_params(self, key: tuple[int, int] | int) -> tuple[int, AugParams | None]:
        """(clip index, the draw to apply) of a key."""
        index, second = map(int, key if isinstance(key, tuple) else (key, 0))
        if not 0 <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        if self.views:
            return index, self.transform.view_params(second, index)
        return index, self.transform.epoch_params(second, index)

    def __getitem__(self, key: tuple[int, int] | int) -> ClipBatch:
        return self.read_batch([key])

    def read_batch(self, keys: Sequence[tuple[int, int] | int], *, pin: bool = False) -> ClipBatch:
        """The batch of `keys`. `pin`: frames in pinned memory (from torch's caching host
        allocator, which reuses a block once the asynchronous copy to the GPU has read it)."""
        import torch

        plans = []
        for key in keys:
            index, params = self.aug_params(key)
            clip = self.map_clip(index)
            frames_at = self.frame_indices(clip.shape[0], key)
            plans.append((index, params, clip, frames_at, self.region(clip.shape[1], clip.shape[2], params)))
        num_frames = self.transform.num_frames
        height = max(region[2] for *_, region in plans)
        width = max(region[3] for *_, region in plans)
        frames = torch.empty((len(plans), num_frames, height, width, 3), dtype=torch.uint8, pin_memory=pin)
        out = frames.numpy()
        aug = np.empty((len(plans), len(AUG_FIELDS)), dtype=np.float32)
        for b, (_, params, clip, frames_at, (top, left, h, w)) in enumerate(plans):
            out[b, :, h:] = 0  # the padding only (the crop itself is overwritten next)
            out[b, :, :h, w:] = 0
            for f, t in enumerate(frames_at):
                out[b, f, :h, :w] = clip[t, top:top + h, left:left + w]
            aug[b] = (h, w, params.flip, params.brightness, params.contrast) if params else (h, w, 0, 1, 1)
        indices = np.array([index for index, *_ in plans], dtype=np.int64)
        small = [torch.from_numpy(a) for a in (aug, self.labels[indices], indices)]
        if pin:  # a copy from pageable memory would make the device wait for the host
            small = [tensor.pin_memory() for tensor in small]
        return ClipBatch(frames, *small)


    def frame_indices(self, num_available: int, key: tuple[int, int] | int = 0) -> np.ndarray:
        """Which frames of a clip of `num_available` frames are read for dataset `key` (a
        test-time view of `headernet_core.evaluation` shifts them). Cached views (`views=True`)
        keep the evenly spaced frames."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if self.views:
            return sample_frame_indices(num_available, self.transform.num_frames)
        return self.transform.frame_indices(num_available, int(epoch), int(index))

    def region(self, height: int, width: int, params: AugParams | None) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the pixels read from each frame (see `crop_region`)."""
        return crop_region(height, width, params)

    def map_clip(self, index: int) -> np.ndarray:
        """Clip `index` memory-mapped as a plain array (nothing read yet)."""
        path = os.fsdecode(self.paths[index])
        try:
            with open(path, "rb") as fp:
                stat = os.fstat(fp.fileno())
                cached = self._layouts.get(index)
                if cached is None or cached[:2] != (stat.st_size, stat.st_mtime_ns):
                    layout = read_npy_layout(path)
                    problem = clip_problem(layout.shape, layout.dtype)
                    if problem:
                        fail(f"clip {path} {problem}")
                    if stat.st_size < layout.end:
                        fail(f"clip {path} is truncated ({stat.st_size} bytes; its header needs {layout.end})")
                    cached = self._layouts[index] = (stat.st_size, stat.st_mtime_ns, layout)
                buffer = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            fail(f"clip {path} cannot be read ({' '.join(str(exc).split())})")
        layout = cached[2]
        return np.ndarray(layout.shape, dtype=layout.dtype, buffer=buffer, offset=layout.offset,
                          order="F" if layout.fortran_order else "C")


class BatchLoader:
    """The batches of a sampler's keys (`batch_size` at a time, in order), read ahead by
    `threads` threads (0: in the caller's thread, when asked for).

    Threads rather than worker processes: reading is memory-mapped copies, which release the
    GIL, and a batch read in this process needs no hand-over. A worker process must pass every
    batch through freshly allocated shared memory, whose first touch cost about 5x the reading
    itself (a 320 instead of ~1,900 clips/s worker at 16x256^2, docs/performance.md)."""

    def __init__(self, dataset: ClipDataset, sampler: Any, batch_size: int, *, threads: int = 0,
                 pin: bool = False, shard: Callable[[list], list] | None = None) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.threads, self.pin = threads, pin
        self.shard = shard   # DDP: this rank's part of each global batch (distributed.shard_for)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[ClipBatch]:
        keys = list(self.sampler)
        groups = [keys[i:i + self.batch_size] for i in range(0, len(keys), self.batch_size)]
        if self.shard is not None:
            groups = [self.shard(group) for group in groups]
        if self.threads == 0:
            for group in groups:
                yield self.dataset.read_batch(group, pin=self.pin)
            return
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="clip-reader")
        try:
            ahead = deque(pool.submit(self.dataset.read_batch, group, pin=self.pin)
                          for group in groups[:2 * self.threads])
            for group in groups[2 * self.threads:]:
                batch = ahead.popleft().result()
                ahead.append(pool.submit(self.dataset.read_batch, group, pin=self.pin))
                yield batch
            while ahead:
                yield ahead.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
