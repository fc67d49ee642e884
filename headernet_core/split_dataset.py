"""Split one clip-index CSV into `train.csv` and `val.csv`, stratified by label, grouped by video.

    python -m headernet_core.split_dataset --input_csv all.csv --output_dir splits \
        [--root_dir clips/] [--val_split 0.2] [--seed 42] [--no_group]

Upstream's tool split rows at random, so neighbouring clips of one match landed in both splits
(leakage) and a small val split could miss positives. Here no `video_id` is in both splits
(when the column exists; `--no_group` turns that off) and both splits keep the label balance.
Existing `train.csv`/`val.csv` in the output folder are kept unless `--overwrite`, and the input
CSV itself is never written, whatever the flags.
Cells are copied as written, except `path`: `--root_dir R` rewrites each to `R/<basename>`
(relative to the working directory when R is under it), for CSVs generated on another machine;
without it, a path that only finds its clip relative to the input CSV's folder is rewritten
relative to the output folder, so the new CSVs point at the same clips.
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

from .artifacts import atomic_path
from .data import (check_paths_present, find_clip, parse_labels, path_basename, read_index_csv,
                   resolve_clip)
from .errors import CliParser, fail, run_cli
from .paths import check_writable_dir, same_file

GROUP_COLUMN = "video_id"
MAX_FOLDS = 20  # finest val fraction the grouped split can aim at is 1/20


def split_frame(df: pd.DataFrame, val_split: float, seed: int, group: bool, *,
                source: str = "input CSV") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val) rows of `df`, each in the input order with a fresh index. Stratified by
    `label`; grouped by `video_id` when `group` and the column exists. `source` names the data
    in error messages."""
    if not 0 < val_split < 1:
        fail(f"--val_split must be between 0 and 1 (exclusive), got {val_split}")
    labels = parse_labels(df["label"], source)
    if not labels.any():
        fail(f"{source}: no positive clips (label 1) among {len(labels)} rows; nothing to stratify")
    if group and GROUP_COLUMN in df.columns:
        groups = df[GROUP_COLUMN].astype(str).to_numpy()
        train_rows, val_rows = grouped_split(labels, groups, val_split, seed, source)
    else:
        train_rows, val_rows = stratified_split(labels, val_split, seed, source)
    return (df.iloc[np.sort(train_rows)].reset_index(drop=True),
            df.iloc[np.sort(val_rows)].reset_index(drop=True))


def stratified_split(labels: np.ndarray, val_split: float, seed: int,
                     source: str) -> tuple[np.ndarray, np.ndarray]:
    """Clip-level split with scikit-learn's StratifiedShuffleSplit: val gets ceil(val_split x N)
    rows and each class in proportion."""
    counts = np.bincount(labels, minlength=2)
    if any(0 < c < 2 for c in counts):
        fail(f"{source}: {counts[1]} positive and {counts[0]} negative clips; each class present "
             f"needs at least 2 clips so both splits get one")
    classes = int((counts > 0).sum())
    val_size = math.ceil(val_split * len(labels))
    if min(val_size, len(labels) - val_size) < classes:
        fail(f"{source}: too few clips ({len(labels)}) for --val_split {val_split}: val would get "
             f"{val_size} and train {len(labels) - val_size}; each needs one clip per class")
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=val_split, random_state=seed)
    try:
        train_rows, val_rows = next(splitter.split(np.zeros(len(labels)), labels))
    except ValueError as exc:
        fail(f"{source}: cannot split {len(labels)} clips with --val_split {val_split}: {exc}")
    return train_rows, val_rows


def fold_plan(val_split: float, max_folds: int) -> tuple[int, int]:
    """(m, k): val = m of k folds (2 <= k <= min(20, max_folds)), with m/k closest to
    `val_split` (smallest k on ties)."""
    options = [(m, k) for k in range(2, max(2, min(MAX_FOLDS, max_folds)) + 1) for m in range(1, k)]
    return min(options, key=lambda mk: (abs(mk[0] / mk[1] - val_split), mk[1]))


def grouped_split(labels: np.ndarray, groups: np.ndarray, val_split: float, seed: int,
                  source: str) -> tuple[np.ndarray, np.ndarray]:
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
            fail(f"{source}: cannot split {len(names)} {GROUP_COLUMN} groups with --val_split "
                 f"{val_split}: {exc}")
    best = min((_rotation(folds, start, m) for start in range(k)),
               key=lambda rows: _score(labels, rows, target))
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[best] = True
    if not labels[val_mask].any() or not labels[~val_mask].any():
        fail(f"{source}: cannot give both splits positives with {positive_groups} positive "
             f"{GROUP_COLUMN} groups; lower/raise --val_split or use --no_group")
    train_rows, val_rows = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    return (val_rows, train_rows) if swap else (train_rows, val_rows)


def _rotation(folds: list[np.ndarray], start: int, m: int) -> np.ndarray:
    return np.concatenate([folds[(start + j) % len(folds)] for j in range(m)])


def _score(labels: np.ndarray, val_rows: np.ndarray, target: float) -> tuple[int, float]:
    """(classes missing from either split, distance of the val size from the target)."""
    in_val = np.zeros(len(labels), dtype=bool)
    in_val[val_rows] = True
    present = set(np.unique(labels).tolist())
    missing = sum(len(present - set(np.unique(labels[part]).tolist())) for part in (in_val, ~in_val))
    return missing, abs(len(val_rows) - target * len(labels))


def rebase_path(path_text: str, root_dir: str | Path) -> str:
    """`<root_dir>/<basename>`, relative to the working directory when under it, else absolute."""
    target = Path(os.path.abspath(root_dir)) / path_basename(path_text)
    try:
        return str(target.relative_to(Path.cwd()))
    except ValueError:
        return str(target)


def carry_paths(paths: Sequence[str], input_csv: str | Path, output_dir: str | Path) -> tuple[list[str], int]:
    """Paths for CSVs written to `output_dir`, and how many changed. A path that finds its clip
    from the input CSV (e.g. relative to its folder, like demo_data's `clips/x`) but would not
    find the same clip from `output_dir` is rewritten relative to `output_dir`, keeping its
    suffix style, so train.csv/val.csv point at the clips the input pointed at."""
    in_dir, out_dir = Path(input_csv).parent, Path(output_dir)
    carried, changed = [], 0
    for text in paths:
        hit = find_clip(text, in_dir)
        same = hit is not None and resolve_clip(text, out_dir) == os.path.abspath(hit[1])
        if hit is None or same:
            carried.append(text)
            continue
        carried.append(os.path.relpath(hit[0], out_dir))
        changed += 1
    return carried, changed


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
        with atomic_path(path, replace=replace) as tmp:
            part.to_csv(tmp, index=False)
    except FileExistsError:
        fail(f"{path} already exists; pass --overwrite to replace it or choose another folder")


def check_outputs(input_csv: str | Path, output_dir: str | Path, overwrite: bool) -> list[Path]:
    """The split files to write: never the input CSV, and existing ones only with --overwrite."""
    check_writable_dir(output_dir, "--output_dir")
    outputs = [Path(output_dir) / "train.csv", Path(output_dir) / "val.csv"]
    for path in outputs:
        if path.is_dir():
            fail(f"--output_dir: {path} is a folder; expected to write the split CSV there")
        if path.exists() and same_file(path, input_csv):
            fail(f"--output_dir {output_dir} would overwrite --input_csv {input_csv}; inputs are "
                 f"never written: choose another --output_dir")
        if path.exists() and not overwrite:
            fail(f"{path} already exists (an earlier split?); pass --overwrite to replace it or "
                 f"choose another --output_dir")
    return outputs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CliParser(
        prog="python -m headernet_core.split_dataset",
        description="Split a clip CSV into train.csv/val.csv, stratified by label and grouped by video_id.")
    parser.add_argument("--input_csv", required=True, help="CSV with columns path,label[,video_id,...]")
    parser.add_argument("--output_dir", required=True, help="folder for train.csv and val.csv")
    parser.add_argument("--root_dir", help="rewrite each path to ROOT_DIR/<basename of path>")
    parser.add_argument("--val_split", type=float, default=0.2, help="fraction of clips for val (default: 0.2)")
    parser.add_argument("--seed", type=int, default=42, help="split seed (default: 42)")
    parser.add_argument("--no_group", action="store_true",
                        help="split clips, not video_id groups (clips of one video may end up in both)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace train.csv/val.csv already in --output_dir (never the input CSV)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not 0 < args.val_split < 1:
        fail(f"--val_split must be between 0 and 1 (exclusive), got {args.val_split}")
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    if args.root_dir is not None and not Path(args.root_dir).is_dir():
        fail(f"--root_dir {args.root_dir}: not a directory")
    train_path, val_path = check_outputs(args.input_csv, args.output_dir, args.overwrite)
    df = read_index_csv(args.input_csv, "input", as_text=True)
    paths = check_paths_present(df["path"], args.input_csv)
    if args.root_dir is not None:
        df["path"] = [rebase_path(p, args.root_dir) for p in paths]
    else:
        df["path"], changed = carry_paths(paths, args.input_csv, args.output_dir)
        if changed:
            print(f"note: {changed} paths rewritten relative to {args.output_dir} so they still "
                  f"point at the same clips")
    has_groups = GROUP_COLUMN in df.columns
    if not has_groups:
        print(f"note: {args.input_csv} has no {GROUP_COLUMN} column; splitting clips, not videos")
    train, val = split_frame(df, args.val_split, args.seed, group=not args.no_group,
                             source=str(args.input_csv))
    write_csv(train, train_path, replace=args.overwrite)
    write_csv(val, val_path, replace=args.overwrite)
    grouped_by = GROUP_COLUMN if has_groups else None
    for name, part in (("train", train), ("val", val)):
        print(describe(name, part, grouped_by))
    if has_groups and args.no_group:
        shared = len(set(train[GROUP_COLUMN]) & set(val[GROUP_COLUMN]))
        print(f"--no_group: {shared} {GROUP_COLUMN} values appear in both splits")
    print(f"wrote {train_path} and {val_path}")


if __name__ == "__main__":
    run_cli(main)
