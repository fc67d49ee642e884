"""Training throughput, peak memory and MFU of a backbone + head: the bare model step, and the
real trainer (`headernet_core.trainer.train`, loader and all) on synthetic clips.

    python bench/throughput.py --backbone vmae --variant base --batch_size 8 16 32 --num_frames 16
    python bench/throughput.py --backbone vmae --variant base --batch_size 8 16 32 --compile on
    python bench/throughput.py --backbone vmae --variant large --batch_size 64 48 32 16 8 --largest
    python bench/throughput.py --backbone vmae --variant base --batch_size 16 --mode both --workers 8
    python bench/throughput.py --backbone csn --variant tiny --num_frames 8 --size 64 --cpu

Random weights at the real shapes for every variant (built from the architecture table; the
trainer mode writes them as a checkpoint folder), so no download is needed. `bare`: uint8 clips
already on the device, normalised, autocast forward, loss, backward, AdamW step (fused on CUDA),
as `train_one_epoch` does it. `trainer`: `train()` for `--trainer_epochs` epochs over
`--trainer_clips` synthetic `(num_frames, source_size^2)` clips with `--workers` loader threads;
the last epoch's clips/s (training part) is reported. MFU = counted FLOPs per step
(`torch.utils.flop_counter.FlopCounterMode`, forward + backward) x steps/s / the GPU's dense
bf16 peak (`--peak_tflops` or a table of known GPUs). One JSON line per measurement; record the
command and the lines in docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headernet_core.augment import normalize
from headernet_core.backbones import CSN_MEAN_STD, CSN_NATIVE_SIZE, VMAE_MEAN_STD, configs, csn, videomae
from headernet_core.config import TrainConfig
from headernet_core import model as model_module
from headernet_core.model import build_classifier, build_optimizer
from headernet_core.trainer import resolve_amp

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against the device name in order.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0))


def random_backbone(family: str, variant: str) -> tuple[torch.nn.Module, int, tuple, tuple, object]:
    """(module, native size, mean, std, architecture config) with random weights."""
    if family == "vmae":
        arch = configs.VMAE_VARIANTS[variant]
        return videomae.VideoMAEv2(arch), arch.img_size, *VMAE_MEAN_STD, arch
    arch = configs.CSN_VARIANTS[variant]
    return csn.IrCSN(arch), CSN_NATIVE_SIZE.get(variant, 224), *CSN_MEAN_STD, arch


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def base_row(args: argparse.Namespace, device: torch.device, amp, size: int) -> dict:
    return {"backbone": f"{args.backbone}-{args.variant}",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "frames": args.num_frames, "size": size,
            "amp": str(amp).replace("torch.", "") if amp else "off",
            "finetune_mode": args.finetune_mode}


# --- the bare model step -------------------------------------------------------------------
def bare_rows(args: argparse.Namespace, checkpointing: bool, compiled: bool, device: torch.device):
    """One row per batch size (or only the largest that fits with --largest)."""
    warnings.filterwarnings("ignore", message=".*random.*")
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds instead of a minute for Giant
        backbone, native, mean, std, _ = random_backbone(args.backbone, args.variant)
    config = TrainConfig(backbone=args.backbone, finetune_mode=args.finetune_mode,
                         gradient_checkpointing=checkpointing, amp=args.amp
                         ).resolved(native_size=native, default_mean=mean, default_std=std)
    size = args.size or native
    model = build_classifier(backbone, config).to(device).train()
    optimizer = build_optimizer(model, config, fused=device.type == "cuda")
    amp = resolve_amp(args.amp, device)
    compiled_model = torch.compile(model, backend=args.compile_backend) if compiled else model
    oom_at = []
    for batch_size in sorted(args.batch_size, reverse=args.largest):
        clips = torch.randint(0, 255, (batch_size, 3, args.num_frames, size, size), dtype=torch.uint8,
                              device=device)
        labels = torch.randint(0, 2, (batch_size,), device=device)

        def step(net: torch.nn.Module = compiled_model, clips: torch.Tensor = clips,
                 labels: torch.Tensor = labels) -> None:
            x = normalize(clips, config.mean, config.std)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(net(x).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            timing = time_steps(step, args, device)
            flops = count_flops(lambda: step(model))  # eager: the counter sees every op
        except torch.OutOfMemoryError:
            oom_at.append(batch_size)
            optimizer.zero_grad(set_to_none=True)
            del clips, labels
            torch.cuda.empty_cache()
            continue
        row = {**base_row(args, device, amp, size), "mode": "bare", "batch": batch_size,
               "compile": compiled, "gradient_checkpointing": checkpointing, **timing,
               "clips_per_s": round(batch_size / timing["step_s"], 1),
               "gflop_per_clip": float(f"{flops / batch_size / 1e9:.4g}")}
        if args.largest:
            yield {**row, "largest_fit": True, "oom_at": oom_at}
            return
        yield row
    if args.largest:  # nothing fitted
        yield {**base_row(args, device, amp, size), "mode": "bare", "largest_fit": None, "oom_at": oom_at}


def time_steps(step, args: argparse.Namespace, device: torch.device) -> dict:
    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    return {"step_s": round(seconds, 5), "peak_gib": peak}


def count_flops(step) -> float:
    """FLOPs of one training step (forward + backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_mfu(row: dict, device: torch.device, override: float | None) -> dict:
    peak = peak_tflops(device, override)
    if peak and row.get("gflop_per_clip") and row.get("clips_per_s"):
        row["mfu"] = float(f"{row['gflop_per_clip'] * 1e9 * row['clips_per_s'] / (peak * 1e12):.4g}")
        row["peak_tflops"] = peak
    return row


# --- the real trainer ----------------------------------------------------------------------
def write_synthetic_split(folder: Path, clips: int, frames: int, side: int) -> tuple[Path, Path]:
    """Random uint8 clips + train/val CSVs (labels alternate; val = a quarter, at least 2)."""
    rng = np.random.default_rng(0)
    (folder / "clips").mkdir(parents=True)
    rows = []
    for i in range(clips + max(2, clips // 4)):
        path = folder / "clips" / f"c{i:05d}.npy"
        np.save(path, rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8))
        rows.append({"path": str(path), "label": i % 2})
    frame = pd.DataFrame(rows)
    frame[:clips].to_csv(folder / "train.csv", index=False)
    frame[clips:].to_csv(folder / "val.csv", index=False)
    return folder / "train.csv", folder / "val.csv"


def random_checkpoint_folder(folder: Path, arch) -> Path:
    """A VideoMAE checkpoint folder (config.json + model.safetensors) of random weights."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = videomae.VideoMAEv2(arch)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_config": arch.to_model_config()}))
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return folder


def trainer_row(args: argparse.Namespace, batch_size: int, compiled: bool, device: torch.device) -> dict:
    from headernet_core.trainer import train

    _, native, _, _, arch = random_backbone(args.backbone, args.variant)
    size = args.size or native
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        tmp = Path(tmp)
        train_csv, val_csv = write_synthetic_split(tmp / "data", args.trainer_clips,
                                                   args.source_frames or args.num_frames, args.source_size or size)
        extra = {}
        if args.backbone == "vmae" and args.variant in configs.FOLDERS:
            extra["backbone_ckpt"] = str(random_checkpoint_folder(tmp / "ckpt", arch))
        config = TrainConfig(
            train_csv=str(train_csv), val_csv=str(val_csv), backbone=args.backbone,
            vmae_variant=args.variant if args.backbone == "vmae" else "base",
            csn_variant=args.variant if args.backbone == "csn" else "50",
            finetune_mode=args.finetune_mode, feature_cache=False, num_frames=args.num_frames,
            input_size=size, batch_size=batch_size, epochs=args.trainer_epochs, amp=args.amp,
            compile=compiled, num_workers=args.workers, cpu=device.type == "cpu",
            threads=args.threads, lr_backbone=1e-5, lr_head=1e-4, warmup_epochs=0,
            progress=False, plots=False, tensorboard=False, output_root=str(tmp / "runs"),
            run_name="bench", **extra)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = train(config, log=lambda _: None)
        if os.environ.get("RANK", "0") != "0":
            return {}   # under torchrun rank 0 alone writes the run folder and the row
        last = pd.read_csv(result.run_dir / "metrics_epoch.csv").iloc[-1]
    amp = resolve_amp(args.amp, device)
    return {**base_row(args, device, amp, size), "mode": "trainer", "batch": batch_size, "compile": compiled,
            "workers": args.workers, "source_size": args.source_size or size,
            "clips_per_s": round(float(last["clips_per_s"]), 1),
            "processes": int(os.environ.get("WORLD_SIZE", "1")),   # > 1: under torchrun (DDP)
            "epoch_seconds": round(float(last["epoch_seconds"]), 2), "train_clips": int(last["train_clips"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vmae", choices=("vmae", "csn"))
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--finetune_mode", default="full", choices=("full", "frozen", "partial"))
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8])
    parser.add_argument("--largest", action="store_true",
                        help="try the batch sizes from the largest down; report the first that fits")
    parser.add_argument("--num_frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=None, help="frame side (default: native)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend (eager: a quick check)")
    parser.add_argument("--mode", choices=("bare", "trainer", "both"), default="bare")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="off")
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak for MFU")
    parser.add_argument("--workers", type=int, default=4, help="trainer mode: loader threads")
    parser.add_argument("--trainer_clips", type=int, default=None, help="trainer mode: train clips "
                        "(default: 24 batches)")
    parser.add_argument("--trainer_epochs", type=int, default=2)
    parser.add_argument("--source_size", type=int, default=None, help="trainer mode: stored clip side")
    parser.add_argument("--source_frames", type=int, default=None, help="trainer mode: stored frames")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    model_module.COMPILE_BACKEND = args.compile_backend  # what the trainer's --compile uses
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    checkpointing_modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    gflop_per_clip: dict[int, float] = {}  # from the bare step, for the trainer rows' MFU
    if args.mode in ("bare", "both"):
        for compiled in compile_modes:
            for checkpointing in checkpointing_modes:
                for row in bare_rows(args, checkpointing, compiled, device):
                    if "batch" in row and not checkpointing:
                        gflop_per_clip[row["batch"]] = row["gflop_per_clip"]
                    print(json.dumps(add_mfu(row, device, args.peak_tflops)), flush=True)
    if args.mode in ("trainer", "both"):
        for compiled in compile_modes:
            for batch_size in args.batch_size:
                args.trainer_clips = args.trainer_clips or 24 * batch_size
                row = trainer_row(args, batch_size, compiled, device)
                if batch_size in gflop_per_clip:
                    row["gflop_per_clip"] = gflop_per_clip[batch_size]
                if os.environ.get("RANK", "0") == "0":   # under torchrun: one row, from rank 0
                    print(json.dumps(add_mfu(row, device, args.peak_tflops)), flush=True)


if __name__ == "__main__":
    main()
