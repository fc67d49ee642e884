"""What several benchmarks share: the README's demo dataset in a folder of their own."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path


def demo_split(folder: Path, data_args: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """The README's data commands (demo_data with `data_args`, then split_dataset) into
    `folder`, once; returns (train.csv, val.csv)."""
    from headernet_core import demo_data, split_dataset

    splits = folder / "splits"
    if not (splits / "val.csv").is_file():
        with contextlib.redirect_stdout(io.StringIO()):
            demo_data.main(["--out", str(folder / "raw"), *data_args])
            split_dataset.main(["--input_csv", str(folder / "raw" / "all_clips.csv"),
                                "--output_dir", str(splits)])
    return splits / "train.csv", splits / "val.csv"
