"""Data-loading throughput: clips/s that ClipDataset + DataLoader deliver (train transform).

    python bench/loader.py --csv demo_data/splits/train.csv --num_frames 8 --size 64 --workers 0 1 2

No model: this is the ceiling the loader puts on training. Record results in docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from headernet_core.data import ClipDataset, ClipTransform, EpochSampler, read_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", required=True)
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    frame = read_split(args.csv, "bench")
    dataset = ClipDataset(frame["clip_path"].tolist(), frame["label"].tolist(),
                          ClipTransform(num_frames=args.num_frames, size=args.size, train=True))
    for workers in args.workers:
        sampler = EpochSampler(frame["label"].to_numpy(), neg_pos_ratio=None, seed=0, shuffle=True)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                             num_workers=workers)
        start, seen = time.perf_counter(), 0
        for clips, _, _ in loader:
            seen += len(clips)
        seconds = time.perf_counter() - start
        print(json.dumps({"csv": args.csv, "workers": workers, "frames": args.num_frames,
                          "size": args.size, "clips": seen, "clips_per_s": round(seen / seconds, 1)}))


if __name__ == "__main__":
    main()
