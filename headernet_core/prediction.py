"""Predict headers on clips without labels: a CSV of paths or a folder of `.npy` clips.

    python -m headernet_core.predict --checkpoint report/header_experiments/RUN/checkpoints/best_epoch_3.pt \
        --clips new_match/clips/ --output predictions.csv [--threshold T] [--views 2 --spatial_views 3]

`--clips` is a CSV with a `path` column (resolved like the trainer's split CSVs; any other
column, `label` included, is copied to the output untouched) or a folder, whose `*.npy` files
(recursively, sorted) are the clips. The output has one row per clip: `path`, the copied
columns, `prob_header` and `pred_label` (1 iff prob_header >= the threshold: by default the
validation threshold stored in the checkpoint). Views as in `headernet_core.evaluate`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .artifacts import write_csv
from .data import check_clips, check_paths_present, resolve_clips
from .config import inference_parser
from .errors import fail, fail_not_utf8, run_cli
from .evaluation import (check_inference, clip_probabilities, eval_config,
                         load_classifier, resolve_threshold)
from .paths import check_output_file


def read_clip_list(source: str | Path) -> pd.DataFrame:
    """The clips of a CSV (needs `path`) or a folder of `.npy` files: the source's columns plus
    `clip_path` (absolute) and a placeholder `label` of 0 for the loader (labels are not read)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(source.rglob("*.npy"))
        if not files:
            fail(f"{source}: no .npy clips in this folder (--clips)")
        frame = pd.DataFrame({"path": [str(f) for f in files]})
        frame["clip_path"] = [str(f.absolute()) for f in files]
    elif source.is_file():
        try:
            frame = pd.read_csv(source, dtype={"path": str})
        except UnicodeDecodeError as exc:
            fail_not_utf8(source, exc)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            fail(f"{source}: not a readable CSV ({' '.join(str(exc).split())})")
        if "path" not in frame.columns or frame.empty:
            fail(f"{source}: expected a CSV with a path column and at least one row (--clips)")
        frame["clip_path"] = resolve_clips(check_paths_present(frame["path"], source), source)
    else:
        fail(f"{source}: no such CSV or folder (--clips)")
    check_clips(frame, source)
    return frame


def predict(checkpoint: str | Path, clips: str | Path, *, threshold: float | None = None,
            views: int = 1, spatial_views: int = 1, batch_size: int | None = None,
            num_workers: int = 0, cpu: bool = False) -> pd.DataFrame:
    """Per-clip predictions of `checkpoint` on the clips of a CSV or folder (module docstring)."""
    check_inference(views=views, spatial_views=spatial_views, threshold=threshold,
                    batch_size=batch_size, num_workers=num_workers)
    frame = read_clip_list(clips)
    model, config, payload = load_classifier(checkpoint)
    threshold, _ = resolve_threshold(threshold, payload, checkpoint)
    config = eval_config(config, batch_size=batch_size, num_workers=num_workers, cpu=cpu)
    prob, _ = clip_probabilities(model, config, frame.assign(label=np.zeros(len(frame), np.int64)),
                                 views=views, spatial_views=spatial_views)
    return frame.drop(columns="clip_path").assign(prob_header=prob,
                                                  pred_label=(prob >= threshold).astype(int))


def main(argv: Sequence[str] | None = None) -> None:
    cli(inference_parser("predict").parse_args(argv))


def cli(args: argparse.Namespace) -> None:
    """`python -m headernet_core.predict` once its flags are read (`config.inference_parser`)."""
    def body() -> None:
        check_output_file(args.output, "--output", inputs=(args.checkpoint, args.clips))
        predictions = predict(args.checkpoint, args.clips, threshold=args.threshold,
                              views=args.views, spatial_views=args.spatial_views,
                              batch_size=args.batch_size, num_workers=args.num_workers, cpu=args.cpu)
        write_csv(predictions, args.output)
        print(f"{int(predictions['pred_label'].sum())} of {len(predictions)} clips predicted as "
              f"headers; wrote {args.output}")

    run_cli(body)
