"""Memory of a run: the peak of each epoch (`peak_mem_gib` in metrics_epoch.csv), and the
out-of-memory backoff's rule (halve the micro-batch, double the accumulation).

The peak is per epoch, not per process: Ray reuses a trial's actor for the next trial, so a
lifetime peak would carry one trial's memory into the next. On a GPU it is the allocator's
peak reserved memory (what another process could not have), reset at each epoch's start; on
the CPU the process's peak resident set (VmHWM), reset by writing 5 to /proc/self/clear_refs
(Linux); where /proc offers neither, the peak is NaN.

A CPU run that exhausts memory is killed by the kernel (no exception reaches Python): the
backoff covers a GPU's `torch.OutOfMemoryError` only.

Under DDP the halving cannot be retried in-process (the other ranks wait for the one that ran
out in DDP's gradient all-reduce): the rank(s) that ran out write the halved config to the run's
config.yaml and the run ends; its restart (`--resume`, a search trial's retry) reads it on every
rank, so all ranks agree (headernet_core/trainer.py, `_halve_for_restart`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from . import distributed
from .config import TrainConfig
from .errors import OutOfMemoryEnd

GIB = 2**30
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
# Test seam: "EPOCH:ABOVE" raises torch.OutOfMemoryError at the second micro-batch of epoch
# EPOCH while the (global) batch is larger than ABOVE (a CPU test cannot exhaust a GPU);
# "EPOCH:ABOVE:RANK" raises on DDP rank RANK only (every rank without it).
OOM_TEST_ENV = "HEADERNET_TEST_OOM"


def reset_peak(device: torch.device, device_ids: Sequence[int] = ()) -> None:
    """Start a new peak: the GPUs' peak reserved memory, or the process's peak RSS."""
    if device.type == "cuda":
        for index in device_ids or [device.index or 0]:
            torch.cuda.reset_peak_memory_stats(index)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:   # not Linux, or /proc read-only: the peak then covers the process's life
        pass


def peak_gib(device: torch.device, device_ids: Sequence[int] = ()) -> float:
    """The peak since `reset_peak` in GiB (the largest GPU's with several); NaN if unknown."""
    if device.type == "cuda":
        return max(torch.cuda.max_memory_reserved(i) for i in device_ids or [device.index or 0]) / GIB
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB   # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return math.nan


def inject_oom(config: TrainConfig, epoch: int, batch_index: int) -> None:
    """The test seam (`OOM_TEST_ENV`); a no-op unless the variable is set."""
    spec = os.environ.get(OOM_TEST_ENV)
    if not spec or batch_index != 1:
        return
    at_epoch, above, *rank = (int(part) for part in spec.split(":"))
    if epoch == at_epoch and config.batch_size > above and (not rank or rank[0] == distributed.current().rank):
        raise torch.OutOfMemoryError(f"{OOM_TEST_ENV}={spec}")


def halved_batch(config: TrainConfig, peak: float, world: int = 1) -> TrainConfig:
    """The config to retry with: half the micro-batch, twice the accumulation, so the
    effective batch (and with it every LR) stays (an odd micro-batch rounds down and loses one
    clip per micro-batch). At micro-batch 1 the run ends: `OutOfMemoryEnd`; under DDP
    (`world` processes, `batch_size` the global batch) already when the half would not divide
    by them (each process takes an equal part)."""
    half = config.batch_size // 2
    if half < 1 or half % world:
        raise OutOfMemoryEnd(peak, config.batch_size, world)
    return config.replace(batch_size=half, grad_accum=config.grad_accum * 2)


def recorded_micro_batch(config: TrainConfig, run_dir: Path) -> TrainConfig:
    """`config` with the micro-batch and accumulation a backoff recorded in the run's
    config.yaml (a retried trial starts from its space's values; the config.yaml is there
    without last.pt too, after an out-of-memory in epoch 1 under DDP); unchanged when there is
    none or it describes another effective batch."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return config
    if not isinstance(saved, dict) or not same_effective_batch(saved, config):
        return config
    return config.replace(batch_size=saved["batch_size"], grad_accum=saved["grad_accum"])


def same_effective_batch(saved: dict, config: TrainConfig) -> bool:
    """Whether `saved` (a config dict) and `config` differ at most in how the same effective
    batch is split into micro-batches: what a backoff changes, and a resume may change."""
    return saved.get("batch_size", 0) * saved.get("grad_accum", 0) == config.batch_size * config.grad_accum
