"""Frozen-backbone epochs with and without the feature cache, on the README's demo data.

    python bench/feature_cache.py --epochs 4 --json

Two frozen tiny-VideoMAE runs of `--epochs` epochs in one process, the default settings
(augmentation on, 4 cached views): with the cache (epoch 1 computes the features) and with
`--no-feature_cache` (the backbone runs every step). Reports the median epoch seconds of
epochs 2.. for each, their ratio, epoch 1 of each, and the clips that went through the
backbone. Record results in docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings
from pathlib import Path

import pandas as pd

from common import demo_split
from headernet_core.config import TrainConfig
from headernet_core.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data", help="folder for the demo dataset (default: a temp folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feature_cache_bench_") as tmp:
        train_csv, val_csv = demo_split(Path(args.data or tmp) / "demo")
        rows = {}
        for name, cache in (("cache", True), ("no_cache", False)):
            config = TrainConfig(train_csv=str(train_csv), val_csv=str(val_csv), backbone="vmae",
                                 vmae_variant="tiny", finetune_mode="frozen", feature_cache=cache,
                                 num_frames=args.num_frames, epochs=args.epochs, lr_head=1e-3,
                                 num_workers=0, cpu=True, threads=args.threads, progress=False,
                                 plots=False, tensorboard=False, output_root=str(Path(tmp) / "runs"),
                                 run_name=name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = train(config, log=lambda _: None)
            rows[name] = pd.read_csv(result.run_dir / "metrics_epoch.csv")
    later = {name: statistics.median(frame["epoch_seconds"][1:]) for name, frame in rows.items()}
    result = {
        "epochs": args.epochs, "train_clips": int(rows["cache"]["train_clips"].iloc[0]),
        "val_clips": int(rows["cache"]["val_clips"].iloc[0]),
        "cache_epoch1_s": round(float(rows["cache"]["epoch_seconds"].iloc[0]), 2),
        "no_cache_epoch1_s": round(float(rows["no_cache"]["epoch_seconds"].iloc[0]), 2),
        "cache_later_epoch_s": round(later["cache"], 3),
        "no_cache_later_epoch_s": round(later["no_cache"], 3),
        "speedup_after_epoch1": round(later["no_cache"] / later["cache"], 1),
        "cache_backbone_clips": int(rows["cache"]["backbone_clips"].sum()),
        "no_cache_backbone_clips": int(rows["no_cache"]["backbone_clips"].sum()),
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k:>26}  {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
