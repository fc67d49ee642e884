"""One run in several processes: DistributedDataParallel under `torchrun` or Ray Train.

A run launched with `RANK`/`WORLD_SIZE` in its environment (torchrun), or inside a process
group someone else initialised (Ray Train), trains as one of `world` ranks:

- `--batch_size` is the *global* batch. Every rank walks the same global batches a single
  process would (same sampler order, same per-clip augmentation draws, both seeded by clip and
  epoch) and takes its contiguous part of each (`rank_part`). A rank's loss is scaled by
  `real * world / global size` (`Share.loss_scale`), so DDP's gradient average equals the
  single process's mean over the global batch, a short last batch included. A last batch with
  fewer clips than ranks pads the empty ranks with one clip of weight 0 (every rank must run
  the same number of steps); only such a batch's BatchNorm statistics see the pad.
- BatchNorm (ir-CSN) normalises with the statistics of the global batch: torch's SyncBatchNorm
  on GPUs, `GlobalBatchNorm3d` on the CPU (`wrap_ddp`).
- Validation predictions are gathered from all ranks in dataset order (`gather_batches`), so
  metrics are computed on exactly the predictions one process makes.
- Rank 0 alone writes the run folder and prints; the others compute.

Mixup/cutmix mixes within each rank's part of the batch (as timm's Mixup does per GPU in the
VideoMAE v2 recipe): one draw per global batch, shared by the ranks, pairs clips of the same
rank. The EMA is updated on every rank from identical weights, so it stays identical.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank among `world`, and on its own node."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().isdigit() else default


def current() -> Ranks:
    """The ranks of an initialised process group, else those the launcher's environment names."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return Ranks(rank, world, _env_int("LOCAL_RANK", rank % max(1, local_world)), local_world)


def init(cpu: bool) -> bool:
    """Join the process group the environment describes (NCCL with GPUs, gloo on the CPU);
    returns whether this call created it (and so must destroy it, `shutdown`)."""
    ranks = current()
    if not ranks.active or dist.is_initialized():
        return False
    use_gpu = not cpu and torch.cuda.is_available()
    if use_gpu:
        torch.cuda.set_device(ranks.local_rank)
    dist.init_process_group("nccl" if use_gpu else "gloo")
    return True


def shutdown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def split_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous part of `size` items (sizes differ by at most 1)."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_part(group: Sequence[T], ranks: Ranks) -> list[T]:
    """This rank's part of one global batch; an empty part is padded with the batch's first
    item, of weight 0 (`Share.real` is then 0)."""
    start, stop = split_bounds(len(group), ranks.rank, ranks.world)
    return list(group[start:stop]) or list(group[:1])


@dataclass(frozen=True)
class Share:
    """One global batch as a rank sees it: its real clips (the first `real` of its part) and
    `loss_scale`, the factor of the rank's mean loss that makes DDP's average of the gradients
    the gradient of the global batch's mean loss (`real * world / global size`)."""
    real: int
    loss_scale: float


def batch_shares(clips: int, batch_size: int, ranks: Ranks) -> list[Share] | None:
    """The `Share` of each global batch of an epoch of `clips` clips (None in one process)."""
    if not ranks.active:
        return None
    shares = []
    for start in range(0, clips, batch_size):
        size = min(batch_size, clips - start)
        lo, hi = split_bounds(size, ranks.rank, ranks.world)
        shares.append(Share(hi - lo, (hi - lo) * ranks.world / size))
    return shares


def shard_for(ranks: Ranks) -> Callable[[Sequence[T]], list[T]] | None:
    """A loader's `shard`: this rank's part of each global batch (None in one process)."""
    return functools.partial(rank_part, ranks=ranks) if ranks.active else None


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Each value summed over all ranks (unchanged in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(list(values), dtype=torch.float64, device=on)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_batches(parts: list[np.ndarray]) -> np.ndarray:
    """Per-batch local arrays -> every rank's, batch by batch in rank order: the dataset order
    (each rank holds a contiguous part of each batch)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return np.concatenate(parts) if parts else np.zeros(0)
    every: list[list[np.ndarray] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, parts)
    return np.concatenate([part for batch in zip(*every) for part in batch])


def from_main(value: T) -> T:
    """Rank 0's value on every rank (a stop decision, a run name made from the clock)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(build: Callable[[], T]) -> T:
    """Rank 0 runs `build` (e.g. fills the feature cache), then the others (which find it done)."""
    main = current().main
    result = build() if main else None
    barrier()   # a no-op in one process
    return result if main else build()


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks, differentiable: the gradient of each rank's input is the sum over
    ranks of the output's gradients. (torch.distributed.nn.functional.all_reduce does the same
    but is deprecated in favour of a private module.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    backward = forward   # the gradients summed over ranks, the same way


class _GlobalBatchStats:
    """BatchNorm whose training-mode statistics are those of the global batch, summed over the
    ranks with gloo: torch's SyncBatchNorm does this on GPUs only (it refuses CPU tensors).
    Gradients flow through the statistics, as in SyncBatchNorm, and the running statistics,
    `num_batches_tracked` and momentum (None: a cumulative average) are updated as BatchNorm
    updates them, so a run in several CPU processes equals one process. In eval mode, or
    without a process group, it is plain BatchNorm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        # Two passes (the mean, then the squared deviations from it), as one process computes.
        local = torch.cat([x.sum(dims), x.new_full((1,), x.numel() // x.shape[1])])
        total = _AllReduceSum.apply(local)
        count = float(total[-1])
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {list(input.shape)} on this rank and {count:.0f} values in all")
        mean = total[:-1] / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / count   # biased
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = (var * (count / (count - 1))).to(self.running_var.dtype)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out.to(input.dtype)


class GlobalBatchNorm1d(_GlobalBatchStats, nn.BatchNorm1d):
    """BatchNorm1d over the global batch (see `_GlobalBatchStats`)."""


class GlobalBatchNorm2d(_GlobalBatchStats, nn.BatchNorm2d):
    """BatchNorm2d over the global batch (see `_GlobalBatchStats`)."""


class GlobalBatchNorm3d(_GlobalBatchStats, nn.BatchNorm3d):
    """BatchNorm3d over the global batch (see `_GlobalBatchStats`)."""


_GLOBAL_KINDS = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d,
                 nn.BatchNorm3d: GlobalBatchNorm3d}


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm1d/2d/3d replaced by its GlobalBatchNorm (the CPU's
    SyncBatchNorm), keeping its parameters and buffers (the same tensors, so `requires_grad`
    too) and its training flag; returns the module, or its replacement if it is one itself."""
    kind = _GLOBAL_KINDS.get(type(module))
    if kind is not None:
        new = kind(module.num_features, module.eps, module.momentum, module.affine,
                   module.track_running_stats)
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        replaced = convert_global_batchnorm(child)
        if replaced is not child:
            module.add_module(name, replaced)
    return module


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the process group, with BatchNorm computing the statistics of the global batch:
    on GPUs torch's SyncBatchNorm, on the CPU (gloo) GlobalBatchNorm (SyncBatchNorm refuses CPU
    tensors). Frozen BatchNorm stays frozen: its parameters keep `requires_grad=False` and the
    model's `train()` keeps it in eval mode, where nothing is synchronised."""
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)   # leaves a model without BatchNorm as it is
    else:
        model = convert_global_batchnorm(model)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


class LauncherInterrupts:
    """Under torchrun, Ctrl-C or SIGTERM on any one rank ends them all as `interrupted`: the
    rank tells the launcher (SIGTERM), which forwards SIGTERM to every rank, so rank 0 records
    `interrupted` instead of failing on a vanished peer. Then it raises KeyboardInterrupt.
    Only the first rank of a launcher to be signalled tells it: a second SIGTERM (e.g. from
    rank 0, signalled by the launcher) would cut short the launcher's wait for the ranks, and
    it would exit while rank 0 still records the interruption.

    A rank acts on its first signal only: when a peer fails, the launcher signals the other
    ranks, and signals them again on the SIGTERM it is told; a second KeyboardInterrupt would
    land in rank 0's recording of the end and leave status.json `running`. The launcher's
    SIGKILL, after its own wait, still ends a rank that does not exit."""

    MARKER_PREFIX = "headernet-torchrun-"   # + launcher pid, run id: `_first_to_tell`

    def __init__(self) -> None:
        self.launcher = os.getppid()
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if os.getppid() == self.launcher and self.launcher > 1 and self._first_to_tell():
            with contextlib.suppress(OSError):
                os.kill(self.launcher, signal.SIGTERM)
        self.launcher = 0
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    def _first_to_tell(self) -> bool:
        """Whether this rank is the first of its launcher's to tell it (a marker file per
        launcher and run in the temp folder, created exclusively; `_remove_stale_markers`
        removes it once the launcher is gone)."""
        marker = Path(tempfile.gettempdir()) / \
            f"{self.MARKER_PREFIX}{self.launcher}-{os.environ.get('TORCHELASTIC_RUN_ID', '')}.interrupted"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except OSError:
            return False
        return True

    @classmethod
    def _remove_stale_markers(cls) -> None:
        """The markers of launchers that have exited (no rank can remove its own: a peer may
        still be signalled after it exits)."""
        for marker in Path(tempfile.gettempdir()).glob(f"{cls.MARKER_PREFIX}*.interrupted"):
            try:
                os.kill(int(marker.name[len(cls.MARKER_PREFIX):].split("-", 1)[0]), 0)
            except ProcessLookupError:   # its launcher has exited
                with contextlib.suppress(OSError):
                    marker.unlink()
            except (ValueError, OSError):   # not ours, or a launcher of another user
                pass

    def __enter__(self) -> LauncherInterrupts:
        import threading

        if "TORCHELASTIC_RUN_ID" in os.environ and threading.current_thread() is threading.main_thread():
            self._remove_stale_markers()
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
