"""CPU cost of the training loader per clip, against a raw `np.load` of the same files.

    python bench/loader.py --clips 200 --frames 16 --size 224 --source_size 256 --json

Writes `--clips` random uint8 clips `(frames, source_size, source_size, 3)` into a temp folder,
then measures, interleaved in one process (rounds alternate which goes first; medians):
- `np_load`: `np.load(mmap_mode="r")` + a copy of the whole array, per file;
- `loader`: everything a training-loader thread does for a train clip: draw the augmentation,
  memory-map the file, copy the sampled frames' crop box into the batch tensor
  (`ClipDataset.read_batch`). Nothing the device does (resize, flip, jitter, normalise).
- `--legacy`: also the per-clip torchvision transform the loader ran before (uint8 crop-resize,
  flip, brightness, contrast and a permute copy on the CPU), for comparison.

Prints one JSON line (`--json`) or a readable summary. No model, no GPU. Record results in
docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from headernet_core.data import ClipDataset, ClipTransform, load_clip_frames


def write_clips(folder: Path, count: int, frames: int, side: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"clip_{i:04d}.npy"
        np.save(path, rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8))
        paths.append(str(path))
    return paths


def time_np_load(paths: list[str]) -> float:
    start = time.perf_counter()
    for path in paths:
        np.array(np.load(path, mmap_mode="r"))
    return time.perf_counter() - start


def time_loader(dataset: ClipDataset, batch_size: int, epoch: int) -> float:
    keys = [(i, epoch) for i in range(len(dataset))]
    start = time.perf_counter()
    for first in range(0, len(keys), batch_size):
        dataset.read_batch(keys[first:first + batch_size])
    return time.perf_counter() - start


def time_legacy(paths: list[str], transform: ClipTransform, epoch: int) -> float:
    """The pre-GPU-pipeline transform: torchvision uint8 ops per clip on the CPU."""
    from torchvision.transforms.v2 import functional as F

    start = time.perf_counter()
    for index, path in enumerate(paths):
        video = torch.from_numpy(load_clip_frames(path, transform.num_frames)).permute(0, 3, 1, 2)
        p = transform.params(epoch, index)
        top, left, side = p.crop_box(video.shape[-2], video.shape[-1])
        video = F.resized_crop(video, top, left, side, side, [transform.size] * 2, antialias=True)
        if p.flip:
            video = F.horizontal_flip(video)
        video = F.adjust_contrast(F.adjust_brightness(video, p.brightness), p.contrast)
        video.permute(1, 0, 2, 3).contiguous()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--frames", type=int, default=16, help="frames sampled per clip")
    parser.add_argument("--source_frames", type=int, default=None, help="frames per file (default: --frames)")
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--source_size", type=int, default=256, help="side of the stored clips")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--legacy", action="store_true", help="also time the old CPU transform")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        paths = write_clips(Path(tmp), args.clips, args.source_frames or args.frames, args.source_size)
        transform = ClipTransform(num_frames=args.frames, size=args.size, train=True, seed=0)
        dataset = ClipDataset(paths, [0] * len(paths), transform)
        time_np_load(paths), time_loader(dataset, args.batch_size, 0)  # warm the page cache
        rates: dict[str, list[float]] = {"np_load": [], "loader": [], "legacy_transform": []}
        for round_ in range(args.rounds):
            runs = [("np_load", lambda: time_np_load(paths)),
                    ("loader", lambda r=round_: time_loader(dataset, args.batch_size, r + 1))]
            if args.legacy:
                runs.append(("legacy_transform", lambda r=round_: time_legacy(paths, transform, r + 1)))
            if round_ % 2:
                runs.reverse()
            for name, run in runs:
                rates[name].append(args.clips / run())
    ratios = [loader / raw for loader, raw in zip(rates["loader"], rates["np_load"])]
    result = {
        "clips": args.clips, "frames": args.frames, "source_frames": args.source_frames or args.frames,
        "size": args.size, "source_size": args.source_size, "batch_size": args.batch_size,
        "rounds": args.rounds,
        "np_load_clips_per_s": round(statistics.median(rates["np_load"]), 1),
        "loader_clips_per_s": round(statistics.median(rates["loader"]), 1),
        "ratio_to_np_load": round(statistics.median(ratios), 3),
    }
    if args.legacy:
        result["legacy_transform_clips_per_s"] = round(statistics.median(rates["legacy_transform"]), 1)
        result["legacy_ratio_to_np_load"] = round(statistics.median(
            [legacy / raw for legacy, raw in zip(rates["legacy_transform"], rates["np_load"])]), 3)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>30}  {value}")


if __name__ == "__main__":
    main()
