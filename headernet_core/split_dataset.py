"""Split one clip-index CSV into `train.csv`, `val.csv` [and `test.csv`], stratified by label,
grouped by video.

    python -m headernet_core.split_dataset --input_csv all.csv --output_dir splits \
        [--root_dir clips/] [--val_split 0.2] [--test_split 0.2] [--seed 42] [--no_group]

Upstream's tool split rows at random, so neighbouring clips of one match landed in both splits
(leakage) and a small val split could miss positives. Here no `video_id` is in two splits
(when the column exists; `--no_group` turns that off) and every split keeps the label balance.
`--test_split F` first sets F of the clips aside as `test.csv` (held out from the search, scored
once at the end), then `--val_split` of all clips goes to `val.csv`, the rest to `train.csv`.

Cells are copied as written, except `path`, which is written so that the CSVs work from any
working directory: an absolute path stays absolute; a relative one that finds its clip (as the
trainer looks: from the working directory, then the input CSV's folder) is rewritten relative to
the output folder, which the trainer tries when the working directory does not hold it.
Existing split CSVs in the output folder are kept unless `--overwrite`, and the input CSV
itself is never written, whatever the flags.
`--root_dir R` rewrites each path to `R/<basename>` (for CSVs made on another machine): absolute
when R is, else relative to the output folder.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

from . import artifacts
from .config import MAX_SEED
from .data import check_paths_present, find_clip, parse_labels, path_basename, read_index_csv
from .errors import CliParser, fail, run_cli
from .paths import check_writable_dir, same_file

GROUP_COLUMN = "video_id"
MAX_FOLDS = 20  # finest val fraction the grouped split can aim at is 1/20


def split_frame(df: pd.DataFrame, val_split: float, seed: int, group: bool, *,
                source: str = "input CSV", part: str = "val") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, held-out) rows of `df`, each in the input order with a fresh index: `val_split`
    of the rows are held out. Stratified by `label`; grouped by `video_id` when `group` and the
    column exists. `source` names the data and `part` the held-out split ("val"/"test", its flag
    is `--<part>_split`) in error messages."""
    if not 0 < val_split < 1:
        fail(f"--{part}_split must be between 0 and 1 (exclusive), got {val_split}")
    labels = parse_labels(df["label"], source)
    if not labels.any():
        fail(f"{source}: no positive clips (label 1) among {len(labels)} rows; nothing to stratify")
    if group and GROUP_COLUMN in df.columns:
        groups = df[GROUP_COLUMN].astype(str).to_numpy()
        train_rows, val_rows = grouped_split(labels, groups, val_split, seed, source, part)
    else:
        train_rows, val_rows = stratified_split(labels, val_split, seed, source, part)
    return (df.iloc[np.sort(train_rows)].reset_index(drop=True),
            df.iloc[np.sort(val_rows)].reset_index(drop=True))


def split_parts(df: pd.DataFrame, val_split: float, test_split: float | None, seed: int,
                group: bool, *, source: str = "input CSV") -> dict[str, pd.DataFrame]:
    """{"train", "val"[, "test"]} frames. With `test_split`, that fraction of the rows is held
    out first as test; val is then `val_split` of ALL rows, taken from the rest (so each
    fraction means the same with or without a test split)."""
    test: dict[str, pd.DataFrame] = {}
    if test_split is not None:
        if not 0 < test_split < 1 or not val_split + test_split < 1:
            fail(f"--test_split must be in (0, 1) with --val_split + --test_split < 1, got "
                 f"{test_split} and {val_split}")
        df, test["test"] = split_frame(df, test_split, seed, group, source=source, part="test")
        val_split = val_split / (1 - test_split)
    train, val = split_frame(df, val_split, seed, group, source=source)
    return {"train": train, "val": val, **test}


def stratified_split(labels: np.ndarray, val_split: float, seed: int, source: str,
                     part: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """Clip-level split with scikit-learn's StratifiedShuffleSplit: val gets ceil(val_split x N)
    rows and each class in proportion."""
    counts = np.bincount(labels, minlength=2)
    if any(0 < c < 2 for c in counts):
        fail(f"{source}: {counts[1]} positive and {counts[0]} negative clips; each class present "
             f"needs at least 2 clips so both splits get one")
    classes = int((counts > 0).sum())
    val_size = math.ceil(val_split * len(labels))
    if min(val_size, len(labels) - val_size) < classes:
        fail(f"{source}: too few clips ({len(labels)}) for --{part}_split {val_split}: {part} would "
             f"get {val_size} and the rest {len(labels) - val_size}; each needs one clip per class")
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_split, random_state=seed)
    try:
        train_rows, val_rows = next(splitter.split(np.zeros(len(labels)), labels))
    except ValueError as exc:
        fail(f"{source}: cannot split {len(labels)} clips with --{part}_split {val_split}: {exc}")
    return train_rows, val_rows


def fold_plan(val_split: float, max_folds: int) -> tuple[int, int]:
    """(m, k): val = m of k folds (2 <= k <= min(20, max_folds)), with m/k closest to
    `val_split` (smallest k on ties)."""
    options = [(m, k) for k in range(2, max(2, min(MAX_FOLDS, max_folds)) + 1) for m in range(1, k)]
    return min(options, key=lambda mk: (abs(mk[0] / mk[1] - val_split), mk[1]))


def grouped_split(labels: np.ndarray, groups: np.ndarray, val_split: float, seed: int,
                  source: str, part: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """Group-level split with scikit-learn's StratifiedGroupKFold.

    StratifiedGroupKFold deals whole groups into k folds keeping each fold's label mix close to
    the total; val is m consecutive folds with m/k ~ `val_split` (k <= 20). Of the k rotations
    the one is kept that gives both splits every class and then has the size closest to
    `val_split x N` (groups differ in size, so fold sizes do too). Fractions above 0.5 are
    planned as their complement, then swapped.
    """
    names, group_ids = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        fail(f"{source}: every clip has {GROUP_COLUMN} {names[0]!r}; a single group cannot be "
             f"split (use --no_group to split its clips)")
    positive_groups = len(np.unique(group_ids[labels == 1]))
    if positive_groups < 2:
        fail(f"{source}: all positives come from one {GROUP_COLUMN}; need 2 or more so both "
             f"splits get positives (or use --no_group)")
    swap = val_split > 0.5
    target = 1 - val_split if swap else val_split
    # scikit-learn refuses more folds than the larger class has clips
    m, k = fold_plan(target, min(len(names), int(np.bincount(labels).max())))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class < n_splits": handled below
        warnings.simplefilter("ignore", UserWarning)
        try:
            folds = [test for _, test in splitter.split(np.zeros(len(labels)), labels, group_ids)]
        except ValueError as exc:
            fail(f"{source}: cannot split {len(names)} {GROUP_COLUMN} groups with --{part}_split "
                 f"{val_split}: {exc}")
    rotations = (np.concatenate([folds[(start + j) % k] for j in range(m)]) for start in range(k))
    best = min(rotations, key=lambda rows: _score(labels, rows, target))
    val_mask = np.isin(np.arange(len(labels)), best)
    if not labels[val_mask].any() or not labels[~val_mask].any():
        fail(f"{source}: cannot give both splits positives with {positive_groups} positive "
             f"{GROUP_COLUMN} groups; lower/raise --{part}_split or use --no_group")
    train_rows, val_rows = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    return (val_rows, train_rows) if swap else (train_rows, val_rows)


def _score(labels: np.ndarray, val_rows: np.ndarray, target: float) -> tuple[int, float]:
    """(classes missing from either split, distance of the val size from the target)."""
    in_val = np.isin(np.arange(len(labels)), val_rows)
    classes = len(np.unique(labels))
    missing = sum(classes - len(np.unique(labels[part])) for part in (in_val, ~in_val))
    return missing, abs(len(val_rows) - target * len(labels))


def relative_to(target: str | Path, output_dir: str | Path) -> str:
    """`target` (absolute, or relative to the working directory) relative to `output_dir`."""
    return os.path.relpath(os.path.abspath(target), os.path.abspath(output_dir))


def rebase_path(path_text: str, root_dir: str | Path, output_dir: str | Path) -> str:
    """`<root_dir>/<basename>` for a CSV in `output_dir`: absolute when `root_dir` is, else
    relative to `output_dir`."""
    target = Path(root_dir) / path_basename(path_text)
    return str(target) if target.is_absolute() else relative_to(target, output_dir)


def carry_paths(paths: Sequence[str], input_csv: str | Path, output_dir: str | Path) -> tuple[list[str], int]:
    """Paths for CSVs written to `output_dir`, and how many point at no clip from here.

    Where the trainer would find a path's clip from the input CSV (`find_clip`: as written,
    under the CSV's folder, or `<CSV folder>/<basename>`), an absolute path found as written is
    kept; any other is rewritten relative to `output_dir`, keeping its suffix style (`x` for
    `x_s.npy`). So the split works from any working directory and moves with its clips. Paths
    that find no clip are kept as written."""
    hits = [find_clip(text, Path(input_csv).parent) for text in paths]
    carried = [text if hit is None or (Path(text).is_absolute() and hit[0] == Path(text))
               else relative_to(hit[0], output_dir) for text, hit in zip(paths, hits)]
    return carried, hits.count(None)


def describe(name: str, part: pd.DataFrame, grouped_by: str | None) -> str:
    """One summary line per split."""
    positives = int(parse_labels(part["label"], name).sum())
    line = f"{name}: {len(part)} clips, {positives} positives"
    if grouped_by:
        line += f", {part[grouped_by].nunique()} {grouped_by} groups"
    return line


def write_csv(part: pd.DataFrame, path: Path, *, replace: bool = False) -> None:
    """Write a split CSV; an existing file is replaced only with `replace` (another process's
    file appearing meanwhile included)."""
    try:
        artifacts.write_csv(part, path, replace=replace)
    except FileExistsError:
        fail(f"{path} already exists; pass --overwrite to replace it or choose another folder")


SPLIT_NAMES = ("train", "val", "test")


def check_outputs(input_csv: str | Path, output_dir: str | Path, names: Sequence[str],
                  overwrite: bool) -> tuple[dict[str, Path], list[Path]]:
    """The split files to write (`<output_dir>/<name>.csv`), and the earlier split files this
    split does not write (a test.csv from a split with --test_split): never the input CSV, and
    existing ones only with --overwrite, which removes the stale ones too (an old test.csv beside
    a new train.csv would share matches with it)."""
    check_writable_dir(output_dir, "--output_dir")
    outputs = {name: Path(output_dir) / f"{name}.csv" for name in names}
    stale = []
    for name in SPLIT_NAMES:
        path = Path(output_dir) / f"{name}.csv"
        if path.is_dir():
            fail(f"--output_dir: {path} is a folder; expected to write the split CSV there")
        if not path.exists():
            continue
        if same_file(path, input_csv):
            if name in outputs:
                fail(f"--output_dir {output_dir} would overwrite --input_csv {input_csv}; inputs "
                     f"are never written: choose another --output_dir")
            continue
        if not overwrite:
            fail(f"{path} already exists (an earlier split?); pass --overwrite to replace it or "
                 f"choose another --output_dir")
        if name not in outputs:
            stale.append(path)
    return outputs, stale


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CliParser(
        prog="python -m headernet_core.split_dataset",
        description="Split a clip CSV into train.csv/val.csv[/test.csv], stratified by label and "
                    "grouped by video_id.")
    parser.add_argument("--input_csv", required=True, help="CSV with columns path,label[,video_id,...]")
    parser.add_argument("--output_dir", required=True, help="folder for train.csv, val.csv[, test.csv]")
    parser.add_argument("--root_dir", help="rewrite each path to ROOT_DIR/<basename of path>")
    parser.add_argument("--val_split", type=float, default=0.2, help="fraction of clips for val (default: 0.2)")
    parser.add_argument("--test_split", type=float, default=None,
                        help="fraction of clips held out as test.csv (default: no test split)")
    parser.add_argument("--seed", type=int, default=42, help="split seed (default: 42)")
    parser.add_argument("--no_group", action="store_true",
                        help="split clips, not video_id groups (clips of one video may end up in both)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace split CSVs already in --output_dir (never the input CSV)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0 < args.val_split < 1:
        fail(f"--val_split must be between 0 and 1 (exclusive), got {args.val_split}")
    if not 0 <= args.seed <= MAX_SEED:
        fail(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.root_dir is not None and not Path(args.root_dir).is_dir():
        fail(f"--root_dir {args.root_dir}: not a directory")
    names = ["train", "val", *(["test"] if args.test_split is not None else [])]
    outputs, stale = check_outputs(args.input_csv, args.output_dir, names, args.overwrite)
    df = read_index_csv(args.input_csv, "input", as_text=True)
    paths = check_paths_present(df["path"], args.input_csv)
    if args.root_dir is not None:
        df["path"] = [rebase_path(p, args.root_dir, args.output_dir) for p in paths]
    else:
        df["path"], unresolved = carry_paths(paths, args.input_csv, args.output_dir)
        if unresolved:
            print(f"note: {unresolved} of {len(paths)} paths point at no clip from here; kept as "
                  f"written (--root_dir rewrites them to a folder of clips)")
    has_groups = GROUP_COLUMN in df.columns
    if not has_groups:
        print(f"note: {args.input_csv} has no {GROUP_COLUMN} column; splitting clips, not videos")
    parts = split_parts(df, args.val_split, args.test_split, args.seed, group=not args.no_group,
                        source=str(args.input_csv))
    for name, part in parts.items():
        write_csv(part, outputs[name], replace=args.overwrite)
    for path in stale:
        path.unlink()
        print(f"removed {path}: a split file of the earlier split this one replaces")
    grouped_by = GROUP_COLUMN if has_groups else None
    for name, part in parts.items():
        print(describe(name, part, grouped_by))
    if has_groups and args.no_group:
        shared = len(set(parts["train"][GROUP_COLUMN]) & set(parts["val"][GROUP_COLUMN]))
        print(f"--no_group: {shared} {GROUP_COLUMN} values appear in both splits")
    print(f"wrote {' and '.join(str(outputs[name]) for name in parts)}")


if __name__ == "__main__":
    run_cli(main)
