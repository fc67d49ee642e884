"""Frozen-backbone feature cache: with `finetune_mode: frozen` only the head trains, so each
clip's pooled backbone feature is computed once per view, kept on disk, and every epoch of every
run and trial on that storage trains the head on it instead of running the backbone again.

A feature's key (`FeatureSpec.keys`) holds everything that changes it: the backbone weights'
content hash, the backbone family and architecture, num_frames, input size, mean/std, the
compute precision, the code that computes features (`FEATURE_CODE_VERSION`) and the torch
version, the view's augmentation draw and the clip file (absolute path, size, mtime). Change
any of them and the key changes, so a stale entry is never found; nothing is ever invalidated
in place.

Views: view 0 is the clip un-augmented (validation uses it); with `--augment` views 1..V-1 are
fixed seeded draws (`ClipTransform.view_params`), and each epoch picks one view per train clip
(`ClipTransform.epoch_views`). So augmentation still varies from epoch to epoch, over V fixed
draws instead of fresh ones: the price of computing the backbone V times instead of once per
epoch.

Storage: `<feature_cache_dir>/<xx>/<shard>.safetensors`. A shard is up to `SHARD_CLIPS`
consecutive clip-views of a run, named by the hash of its members' keys, so runs over the same
CSV, settings and weights ask for the same shards. It holds `keys` (N, 32) and `features`
(N, D) float32, is written to a temp file and renamed (a reader only ever sees a complete file)
and its keys are compared on every read (a damaged or foreign file is rebuilt, never used).

Concurrency: a builder holds an exclusive `flock` on `<shard>.lock` while it computes a shard.
A run that finds a shard locked builds the other shards it needs first, then waits for the lock
and reads the finished file. The kernel releases a lock when its holder dies (a killed trial,
an OOM), so a waiter then builds the shard itself and removes the dead builder's temp file:
no claim timeouts to tune. (On a network filesystem without working locks, concurrent runs may
compute a shard twice; the rename keeps the result whole either way.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .artifacts import atomic_path
from .augment import DeviceTransform
from .backbones import BackboneInfo
from .config import TrainConfig, parse_neg_pos_ratio
from .data import AugParams, BatchLoader, ClipDataset, ClipTransform, EpochSampler

FORMAT = "headernet-features-1"
CACHE_DIRNAME = "feature_cache"
SHARD_CLIPS = 512
KEY_BYTES = 32
# Bumped by hand whenever a change to the code that turns a clip file into a feature (frame
# sampling, cropping, resizing, jitter, normalising, the backbones' forward and pooling) could
# change a feature: a shared cache then misses instead of serving features of the old code.
# tests/test_features.py hashes that code and says when to bump it.
FEATURE_CODE_VERSION = 1

_DIGESTS: dict[Any, str] = {}   # weights hash per checkpoint file identity, once per process


# --- keys -------------------------------------------------------------------------------------
def _source_identity(source: str | None) -> tuple | None:
    """(path, size, mtime) of the checkpoint file(s) a backbone came from, or None."""
    if source is None:
        return None
    path = Path(source)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def weights_digest(module: nn.Module, source: str | None = None) -> str:
    """sha256 of a module's weights (names, dtypes, shapes, bytes). A backbone loaded from a
    checkpoint is hashed once per process (keyed by its files' path, size and mtime): a Giant
    holds 4 GB."""
    identity = _source_identity(source)
    if identity is not None and identity in _DIGESTS:
        return _DIGESTS[identity]
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    if identity is not None:
        _DIGESTS[identity] = digest.hexdigest()
    return digest.hexdigest()


def clip_identity(path: str) -> list[Any]:
    """What identifies a clip file's content without reading it: path, size, mtime."""
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Everything besides the clip and its view that changes a cached feature."""

    weights: str
    backbone: str            # family and architecture, as JSON
    num_frames: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: str           # float32, bfloat16, float16
    code_version: int = FEATURE_CODE_VERSION
    torch_version: str = torch.__version__

    def keys(self, entries: Sequence[tuple[str, AugParams | None]]) -> np.ndarray:
        """`(N, 32)` uint8 keys of (clip path, view draw) entries."""
        base = hashlib.sha256(json.dumps([FORMAT, dataclasses.asdict(self)], sort_keys=True).encode())
        keys = np.empty((len(entries), KEY_BYTES), dtype=np.uint8)
        for row, (path, view) in enumerate(entries):
            digest = base.copy()
            digest.update(json.dumps([clip_identity(path), dataclasses.asdict(view) if view else None],
                                     sort_keys=True).encode())
            keys[row] = np.frombuffer(digest.digest(), dtype=np.uint8)
        return keys


# --- shards -----------------------------------------------------------------------------------
@contextlib.contextmanager
def shard_lock(path: Path, *, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created if absent); yields False when `blocking` is
    off and someone else holds it. The kernel releases it if this process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        # For people looking at a slow build: who holds it since when (not used for locking).
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        yield True
    finally:
        os.close(fd)


class ShardStore:
    """Content-addressed shards of features under `root` (see the module docstring)."""

    def __init__(self, root: str | Path, shard_clips: int = SHARD_CLIPS) -> None:
        self.root = Path(root)
        self.shard_clips = shard_clips

    def shard_path(self, keys: np.ndarray) -> Path:
        name = hashlib.sha256(keys.tobytes()).hexdigest()[:40]
        return self.root / name[:2] / f"{name}.safetensors"

    def read(self, path: Path, keys: np.ndarray) -> torch.Tensor | None:
        """The shard's features if the file is complete and holds exactly `keys`, else None."""
        if not path.is_file():
            return None
        try:
            data = load_file(str(path))
        except Exception:  # noqa: BLE001 - a damaged file is rebuilt, never used
            return None
        stored, features = data.get("keys"), data.get("features")
        if stored is None or features is None or features.ndim != 2 or len(features) != len(keys) \
                or not np.array_equal(stored.numpy(), keys):
            return None
        return features

    def fetch(self, keys: np.ndarray, compute: Callable[[np.ndarray], torch.Tensor],
              groups: Sequence[int] | None = None) -> tuple[torch.Tensor, int]:
        """Features `(N, D)` for `keys` in order, and how many rows this call computed.
        `compute(positions)` returns the features of those rows (float32, on the CPU).
        `groups`: lengths of consecutive runs of keys that never share a shard (one per view,
        so that adding a view leaves the others' shards as they are)."""
        chunks, first = [], 0
        for length in (groups if groups is not None else [len(keys)]):
            chunks += [np.arange(start, min(start + self.shard_clips, first + length))
                       for start in range(first, first + length, self.shard_clips)]
            first += length
        if first != len(keys):
            raise ValueError(f"groups cover {first} keys, got {len(keys)}")
        found: list[torch.Tensor | None] = [None] * len(chunks)
        computed, waiting = 0, []
        for number, positions in enumerate(chunks):
            path = self.shard_path(keys[positions])
            found[number] = self.read(path, keys[positions])
            if found[number] is None:
                with shard_lock(path.with_suffix(".lock"), blocking=False) as held:
                    if not held:  # another run builds it right now: do the others first
                        waiting.append(number)
                        continue
                    found[number], built = self._build(path, keys[positions], positions, compute)
                    computed += built
        for number in waiting:  # wait for the other builder; build it if that builder died
            path = self.shard_path(keys[chunks[number]])
            with shard_lock(path.with_suffix(".lock"), blocking=True):
                found[number], built = self._build(path, keys[chunks[number]], chunks[number], compute)
                computed += built
        return torch.cat(found) if chunks else torch.empty(0, 0), computed

    def _build(self, path: Path, keys: np.ndarray, positions: np.ndarray,
               compute: Callable[[np.ndarray], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """With the shard's lock held: read it if another builder finished it meanwhile, else
        compute and write it (temp file + rename). Returns (features, rows computed)."""
        features = self.read(path, keys)
        if features is not None:
            return features, 0
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # from a builder that died
            leftover.unlink(missing_ok=True)
        features = compute(positions).to(torch.float32).contiguous()
        if features.ndim != 2 or len(features) != len(keys):
            raise RuntimeError(f"feature computation returned shape {tuple(features.shape)} for {len(keys)} clips")
        with atomic_path(path) as tmp:
            save_file({"keys": torch.from_numpy(np.ascontiguousarray(keys)), "features": features},
                      str(tmp), metadata={"format": FORMAT})
        return features, len(keys)


# --- one run's features -----------------------------------------------------------------------
class KeyList:
    """A sampler whose keys are replaced before each pass (one per shard)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


def cache_dir(config: TrainConfig) -> Path:
    return Path(config.feature_cache_dir or Path(config.output_root) / CACHE_DIRNAME)


class FrozenFeatures:
    """The cached features one frozen run trains on: `views` per train clip and the
    un-augmented view of each val clip. `build` fills them (from disk or the backbone)."""

    def __init__(self, config: TrainConfig, info: BackboneInfo, backbone: nn.Module, train_df: pd.DataFrame,
                 val_df: pd.DataFrame, amp_dtype: torch.dtype | None) -> None:
        self.config = config
        self.transform = ClipTransform.from_config(config, train=True)
        self.views = config.feature_cache_views if self.transform.train else 1
        self.store = ShardStore(cache_dir(config))
        self.train_paths = train_df["clip_path"].tolist()
        self.val_paths = val_df["clip_path"].tolist()
        self.train_labels = train_df["label"].to_numpy(dtype=np.int64)
        self.val_labels = val_df["label"].to_numpy(dtype=np.int64)
        self.spec = FeatureSpec(
            weights=weights_digest(backbone, info.source),
            backbone=json.dumps({"family": info.family, "arch": dict(info.arch)}, sort_keys=True),
            num_frames=config.num_frames, input_size=int(config.input_size),
            mean=tuple(config.mean), std=tuple(config.std),
            precision=str(amp_dtype or torch.float32).replace("torch.", ""))
        self.train: torch.Tensor | None = None   # (views, train clips, D)
        self.val: torch.Tensor | None = None     # (val clips, D)

    @property
    def ready(self) -> bool:
        return self.train is not None

    def entries(self) -> list[tuple[int, int]]:
        """Dataset keys `(clip, view)` of everything needed: train views, then val clips
        (indexed after the train clips in one dataset)."""
        n = len(self.train_paths)
        return [(i, v) for v in range(self.views) for i in range(n)] + \
               [(n + j, 0) for j in range(len(self.val_paths))]

    def build(self, backbone: nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
              log: Callable[[str], None]) -> int:
        """Load or compute every feature of the run; returns how many clip-views went through
        the backbone in this call (0 once built)."""
        if self.ready:
            return 0
        paths = self.train_paths + self.val_paths
        dataset = ClipDataset(paths, np.zeros(len(paths), dtype=np.int64), self.transform, views=True)
        entries = self.entries()
        keys = self.spec.keys([(paths[i], dataset.aug_params((i, v))[1]) for i, v in entries])
        compute = BackboneRunner(backbone, dataset, self.config, device, amp_dtype)
        start = time.perf_counter()
        n = len(self.train_paths)
        features, computed = self.store.fetch(keys, lambda positions: compute([entries[p] for p in positions]),
                                              groups=[n] * self.views + [len(self.val_paths)])
        self.train = features[:n * self.views].view(self.views, n, -1)
        self.val = features[n * self.views:]
        log(f"feature cache {self.store.root}: {len(entries)} clip-views ({self.views} per train clip), "
            f"{computed} computed by the backbone, {len(entries) - computed} read "
            f"({time.perf_counter() - start:.1f}s)")
        return computed

    def loader(self, *, train: bool, batch_size: int | None = None,
               shard: Callable[[Any], Any] | None = None) -> tuple[FeatureLoader, EpochSampler]:
        """`batch_size`: a micro-batch other than the config's (after an out-of-memory halving);
        `shard`: under DDP, this rank's part of each global batch (distributed.shard_for)."""
        labels = self.train_labels if train else self.val_labels
        ratio = parse_neg_pos_ratio(self.config.neg_pos_ratio) if train else None
        sampler = EpochSampler(labels, neg_pos_ratio=ratio, seed=self.config.seed, shuffle=train)
        return FeatureLoader(self, sampler, labels, batch_size or self.config.batch_size, train=train,
                             shard=shard), sampler


class BackboneRunner:
    """Computes backbone features of dataset keys, through the normal loader and device
    transform."""

    def __init__(self, backbone: nn.Module, dataset: ClipDataset, config: TrainConfig,
                 device: torch.device, amp_dtype: torch.dtype | None) -> None:
        self.backbone, self.device, self.amp_dtype = backbone, device, amp_dtype
        self.sampler = KeyList()
        self.loader = BatchLoader(dataset, self.sampler, config.batch_size,
                                  threads=config.num_workers, pin=device.type == "cuda")
        self.transform = DeviceTransform(int(config.input_size), config.mean, config.std)

    @torch.no_grad()
    def __call__(self, keys: list[tuple[int, int]]) -> torch.Tensor:
        self.backbone.eval()
        self.sampler.keys = keys
        out = []
        for batch in self.loader:
            x = self.transform(batch, self.device)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out.append(self.backbone(x).float())
        return torch.cat(out).cpu()


class FeatureLoader:
    """Batches `(features, labels)` of cached features in an `EpochSampler`'s order; in
    training each clip's view for the epoch is `ClipTransform.epoch_views`."""

    def __init__(self, features: FrozenFeatures, sampler: EpochSampler, labels: np.ndarray,
                 batch_size: int, *, train: bool, shard: Callable[[Any], Any] | None = None) -> None:
        self.features, self.sampler, self.batch_size, self.train = features, sampler, batch_size, train
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.shard = shard

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        f = self.features
        if not f.ready:
            raise RuntimeError("FrozenFeatures.build must run before the features are read")
        indices = torch.from_numpy(np.array([i for i, _ in self.sampler], dtype=np.int64))
        if self.train:
            table = f.train
            views = torch.from_numpy(f.transform.epoch_views(self.sampler.epoch, len(f.train_paths), f.views))
        else:
            table, views = f.val[None], torch.zeros(len(f.val), dtype=torch.int64)
        for start in range(0, len(indices), self.batch_size):
            idx = indices[start:start + self.batch_size]
            if self.shard is not None:
                idx = torch.stack(self.shard(idx))
            yield table[views[idx], idx], self.labels[idx]

    def to_device(self, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = batch
        if device.type == "cuda":  # from pageable memory the copy would wait for the device
            features, labels = features.pin_memory(), labels.pin_memory()
        return features.to(device, non_blocking=True), labels.to(device, non_blocking=True)
