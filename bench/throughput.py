"""Training throughput and peak memory of a backbone + head, measured the way the trainer
steps (uint8 clips normalised on the device, autocast, backward, AdamW step).

    python bench/throughput.py --backbone vmae --variant base --batch_size 8 --num_frames 16
    python bench/throughput.py --backbone csn --variant tiny --num_frames 8 --size 64 --cpu

Random weights (no checkpoint needed). Prints one JSON line per configuration; record the
command and the line in docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from headernet_core.backbones import create_backbone
from headernet_core.config import TrainConfig
from headernet_core.data import normalize
from headernet_core.model import build_classifier, build_optimizer
from headernet_core.trainer import resolve_amp


def measure(args: argparse.Namespace, checkpointing: bool) -> dict:
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    warnings.filterwarnings("ignore", message=".*random.*")
    torch.manual_seed(0)
    backbone, info = create_backbone(args.backbone, args.variant)
    config = TrainConfig(backbone=args.backbone, finetune_mode=args.finetune_mode,
                         gradient_checkpointing=checkpointing, batch_size=args.batch_size,
                         amp=args.amp).resolved(native_size=info.native_size,
                                                default_mean=info.mean, default_std=info.std)
    size = args.size or info.native_size
    model = build_classifier(backbone, config).to(device).train()
    optimizer = build_optimizer(model, config)
    amp = resolve_amp(args.amp, device)
    clips = torch.randint(0, 255, (args.batch_size, 3, args.num_frames, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 2, (args.batch_size,))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        x = normalize(clips.to(device), config.mean, config.std)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"backbone": f"{args.backbone}-{args.variant}", "device": torch.cuda.get_device_name()
            if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(),
            "batch": args.batch_size, "frames": args.num_frames, "size": size,
            "amp": str(amp).replace("torch.", "") if amp else "off", "finetune_mode": args.finetune_mode,
            "gradient_checkpointing": checkpointing,
            "clips_per_s": round(args.batch_size * args.steps / seconds, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vmae", choices=("vmae", "csn"))
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--finetune_mode", default="full", choices=("full", "frozen", "partial"))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=None, help="frame side (default: native)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="off")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    for checkpointing in modes:
        print(json.dumps(measure(args, checkpointing)), flush=True)


if __name__ == "__main__":
    main()
