"""headernet_core.features: the frozen-feature cache is found again, invalidated by every key
part, built once by concurrent builders, never mistaken for complete after a killed builder,
and trains the head to the same validation metrics as running the backbone every step."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from headernet_core.data import AugParams
from headernet_core.features import FeatureSpec, ShardStore, shard_lock, weights_digest
from headernet_core.trainer import train

SPEC = FeatureSpec(weights="w" * 64, backbone='{"family": "vmae"}', num_frames=4, input_size=32,
                   mean=(0.5,) * 3, std=(0.5,) * 3, precision="float32")


def fake_features(keys: np.ndarray, positions: np.ndarray) -> torch.Tensor:
    """A deterministic 'backbone': features derived from the keys."""
    return torch.from_numpy(keys[positions, :6].astype(np.float32))


def clip_files(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"c{i}.npy"
        np.save(path, np.full((2, 4, 4, 3), i, np.uint8))
        paths.append(str(path))
    return paths


# --- keys -------------------------------------------------------------------------------------
def test_every_key_part_changes_the_key(tmp_path):
    paths = clip_files(tmp_path, 2)
    view = AugParams(flip=True, brightness=1.1, contrast=0.9, crop_side=0.8, crop_top=0.1, crop_left=0.2)
    base = SPEC.keys([(paths[0], None), (paths[0], view)])
    assert base.shape == (2, 32) and not np.array_equal(base[0], base[1])
    assert np.array_equal(base, SPEC.keys([(paths[0], None), (paths[0], view)]))  # stable
    for change in [dict(weights="v" * 64), dict(num_frames=8), dict(input_size=64),
                   dict(mean=(0.4,) * 3), dict(std=(0.2,) * 3), dict(precision="bfloat16"),
                   dict(backbone='{"family": "csn"}'), dict(code_version=SPEC.code_version + 1),
                   dict(torch_version="0.0.0")]:
        assert not np.array_equal(dataclasses.replace(SPEC, **change).keys([(paths[0], None)])[0], base[0]), change
    other_view = dataclasses.replace(view, brightness=1.2)
    assert not np.array_equal(SPEC.keys([(paths[0], other_view)])[0], base[1])
    assert not np.array_equal(SPEC.keys([(paths[1], None)])[0], base[0])  # another clip
    np.save(paths[0], np.zeros((3, 4, 4, 3), np.uint8))  # the same clip file rewritten
    assert not np.array_equal(SPEC.keys([(paths[0], None)])[0], base[0])
    before = SPEC.keys([(paths[1], None)])
    os.utime(paths[1], ns=(1, 1))  # touched: mtime is part of the key
    assert not np.array_equal(SPEC.keys([(paths[1], None)]), before)


def test_weights_digest_sees_every_weight():
    model = torch.nn.Linear(3, 2)
    digest = weights_digest(model)
    assert digest == weights_digest(model) and len(digest) == 64
    with torch.no_grad():
        model.bias[1] += 1e-6
    assert weights_digest(model) != digest


# The code whose change can change a cached feature without changing its key otherwise: how a
# clip's frames, crop and pixels are read, resized, jittered and normalised, and the backbones'
# forward and pooling (their weights and architecture settings are in the key already).
FEATURE_CODE = [
    "headernet_core.data:sample_frame_indices", "headernet_core.data:AugParams.crop_box",
    "headernet_core.data:crop_region", "headernet_core.data:ClipDataset.read_batch",
    "headernet_core.data:ClipDataset.frame_indices", "headernet_core.data:ClipDataset.region",
    "headernet_core.augment:GREY_WEIGHTS", "headernet_core.augment:resize_weights",
    "headernet_core.augment:resize_crops", "headernet_core.augment:jitter",
    "headernet_core.augment:DeviceTransform.__call__", "headernet_core.augment:normalize_float",
    "headernet_core.backbones.base:Backbone.run_block",
    "headernet_core.backbones.csn:ConvBN", "headernet_core.backbones.csn:IrBottleneck",
    "headernet_core.backbones.csn:IrCSN.__init__", "headernet_core.backbones.csn:IrCSN.forward",
    "headernet_core.backbones.videomae:PatchEmbed3d", "headernet_core.backbones.videomae:Attention",
    "headernet_core.backbones.videomae:Block", "headernet_core.backbones.videomae:sincos_table",
    "headernet_core.backbones.videomae:VideoMAEv2.__init__",
    "headernet_core.backbones.videomae:VideoMAEv2.pos_embed",
    "headernet_core.backbones.videomae:VideoMAEv2.embed_tokens",
    "headernet_core.backbones.videomae:VideoMAEv2.forward_tokens",
    "headernet_core.backbones.videomae:VideoMAEv2.pool",
    "headernet_core.backbones.videomae:VideoMAEv2.forward",
    "headernet_core.features:FrozenFeatures.entries", "headernet_core.features:FrozenFeatures.build",
    "headernet_core.features:BackboneRunner.__call__",
]
# FEATURE_CODE_VERSION -> the hash of FEATURE_CODE it was recorded for.
FEATURE_CODE_HASHES = {
    1: "b98a6b7baa810875aebd2a7b80428cc0ff87e5edbfca4ace0cc46e59064c27c9",
}


def _normalised(node) -> str:
    """An AST as text without positions, docstrings, comments or formatting, the same on every
    Python >= 3.10 (fields that are None or empty are left out, as 3.13's ast.dump does)."""
    import ast

    if isinstance(node, list):
        return "[" + ",".join(_normalised(item) for item in node) + "]"
    if not isinstance(node, ast.AST):
        return repr(node)
    body = getattr(node, "body", None)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and body \
            and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:]   # the docstring
    fields = [f"{name}={_normalised(value)}" for name, value in ast.iter_fields(node)
              if value is not None and value != [] and not isinstance(value, ast.expr_context)]
    return f"{type(node).__name__}({','.join(fields)})"


def feature_code_hash() -> str:
    import ast
    import hashlib
    import importlib
    import inspect
    import textwrap

    digest = hashlib.sha256()
    for name in FEATURE_CODE:
        module_name, _, attribute = name.partition(":")
        obj = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
        text = _normalised(ast.parse(textwrap.dedent(inspect.getsource(obj)))) \
            if callable(obj) else repr(obj)
        digest.update(f"{name}\n{text}\n".encode())
    return digest.hexdigest()


def test_a_change_to_the_feature_code_bumps_feature_code_version():
    """A shared feature cache trusts its keys: new feature code under the old key would read
    features the old code computed. So a change to FEATURE_CODE fails here until
    FEATURE_CODE_VERSION is bumped (docstrings, comments and formatting do not count)."""
    from headernet_core.features import FEATURE_CODE_VERSION

    current = feature_code_hash()
    recorded = FEATURE_CODE_HASHES.get(FEATURE_CODE_VERSION)
    assert current == recorded, (
        "the code that computes cached features changed (FEATURE_CODE in tests/test_features.py): if that "
        "can change a feature, bump FEATURE_CODE_VERSION in headernet_core/features.py to "
        f"{max(FEATURE_CODE_HASHES) + 1} and add {max(FEATURE_CODE_HASHES) + 1}: \"{current}\" to "
        f"FEATURE_CODE_HASHES here; if it cannot (a refactor), replace the hash of version "
        f"{FEATURE_CODE_VERSION} with \"{current}\"")
    assert len(set(FEATURE_CODE_HASHES.values())) == len(FEATURE_CODE_HASHES)


# --- shards -----------------------------------------------------------------------------------
def test_hit_miss_and_shards_per_group(tmp_path):
    keys = SPEC.keys([(p, None) for p in clip_files(tmp_path / "clips", 7)])
    store = ShardStore(tmp_path / "cache", shard_clips=3)
    calls = []

    def compute(positions):
        calls.append(positions.tolist())
        return fake_features(keys, positions)

    features, computed = store.fetch(keys, compute, groups=[4, 3])
    assert computed == 7 and calls == [[0, 1, 2], [3], [4, 5, 6]]  # shards never span groups
    torch.testing.assert_close(features, fake_features(keys, np.arange(7)))
    again, computed = store.fetch(keys, compute, groups=[4, 3])
    assert computed == 0 and len(calls) == 3 and torch.equal(again, features)  # a hit
    _, computed = ShardStore(tmp_path / "elsewhere", shard_clips=3).fetch(keys, compute, groups=[4, 3])
    assert computed == 7  # a miss
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_damaged_or_foreign_shard_is_rebuilt_not_used(tmp_path):
    keys = SPEC.keys([(p, None) for p in clip_files(tmp_path / "clips", 4)])
    store = ShardStore(tmp_path / "cache")
    store.fetch(keys, lambda pos: fake_features(keys, pos))
    (path,) = (tmp_path / "cache").rglob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    features, computed = store.fetch(keys, lambda pos: fake_features(keys, pos))
    assert computed == 4 and torch.equal(features, fake_features(keys, np.arange(4)))
    other = SPEC.keys([(p, None) for p in clip_files(tmp_path / "other", 4)])
    ShardStore(tmp_path / "o").fetch(other, lambda pos: fake_features(other, pos))
    (foreign,) = (tmp_path / "o").rglob("*.safetensors")
    path.write_bytes(foreign.read_bytes())
    assert store.read(path, keys) is None  # a file holding other keys is never used


# --- concurrency ----------------------------------------------------------------------------
def _build_in_child(root: str, keys: np.ndarray, delay: float, counts, slot: int, started=None) -> None:
    def compute(positions):
        if started is not None:
            started.set()
        time.sleep(delay)
        return fake_features(keys, positions)

    _, computed = ShardStore(root, shard_clips=2).fetch(keys, compute)
    counts[slot] = computed


def test_two_concurrent_builders_build_each_shard_once(tmp_path):
    keys = SPEC.keys([(p, None) for p in clip_files(tmp_path / "clips", 8)])
    ctx = multiprocessing.get_context("fork")
    counts = ctx.Array("i", 2)
    builders = [ctx.Process(target=_build_in_child, args=(str(tmp_path / "cache"), keys, 0.3, counts, s))
                for s in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(60)
        assert builder.exitcode == 0
    assert sum(counts) == 8 and all(0 < c < 8 for c in counts), list(counts)  # shared, built once
    features, computed = ShardStore(tmp_path / "cache", shard_clips=2).fetch(keys, lambda pos: 1 / 0)
    assert computed == 0 and torch.equal(features, fake_features(keys, np.arange(8)))


def test_a_killed_builder_leaves_nothing_taken_for_complete(tmp_path):
    keys = SPEC.keys([(p, None) for p in clip_files(tmp_path / "clips", 4)])
    root = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    builder = ctx.Process(target=_build_in_child, args=(str(root), keys, 3600, ctx.Array("i", 1), 0, started))
    builder.start()
    assert started.wait(60)  # it holds the first shard's lock, computing
    store = ShardStore(root, shard_clips=2)
    first = store.shard_path(keys[:2])
    with shard_lock(first.with_suffix(".lock"), blocking=False) as held:
        assert not held  # really locked by the builder
    os.kill(builder.pid, signal.SIGKILL)
    builder.join(30)
    assert not first.exists()
    # a temp file as a builder killed mid-write would leave it
    leftover = first.parent / f".{first.name}.abc123.tmp"
    leftover.write_bytes(b"half a shard")
    features, computed = store.fetch(keys, lambda pos: fake_features(keys, pos))
    assert computed == 4 and torch.equal(features, fake_features(keys, np.arange(4)))
    assert not leftover.exists() and not list(root.rglob("*.tmp"))


# --- through the trainer ------------------------------------------------------------------------
def metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics_epoch.csv")


def test_cached_features_train_the_head_like_the_backbone_does(tiny_config, tiny_data):
    settings = dict(finetune_mode="frozen", augment=False, head_dropout=0.0, epochs=3)
    cached = train(tiny_config(run_name="cached", **settings), log=lambda _: None)
    direct = train(tiny_config(run_name="direct", feature_cache=False, **settings), log=lambda _: None)
    a, b = metrics(cached.run_dir), metrics(direct.run_dir)
    for column in ("val_loss", "val_auc", "val_ap", "val_acc", "train_loss"):
        np.testing.assert_allclose(a[column], b[column], atol=1e-4, err_msg=column)
    train_clips, val_clips = 18, 9
    assert a["backbone_clips"].tolist() == [train_clips + val_clips, 0, 0]
    assert b["backbone_clips"].tolist() == [train_clips + val_clips] * 3
    assert (a["val_clips"] == val_clips).all()


def test_runs_share_the_cache_and_only_compute_what_it_lacks(tiny_config, tmp_path):
    cache = tmp_path / "shared_cache"
    settings = dict(finetune_mode="frozen", feature_cache_views=3, feature_cache_dir=str(cache), epochs=2)
    first = train(tiny_config(run_name="first", **settings), log=lambda _: None)
    lines: list[str] = []
    second = train(tiny_config(run_name="second", lr_head=3e-3, **settings), log=lines.append)
    total = metrics(first.run_dir)["backbone_clips"].sum() + metrics(second.run_dir)["backbone_clips"].sum()
    assert total == 18 * 3 + 9  # every view of every clip once, for both runs
    assert any("feature cache" in line and "0 computed by the backbone, 63 read" in line for line in lines)
    more = train(tiny_config(run_name="more_views", **{**settings, "feature_cache_views": 4}), log=lambda _: None)
    assert metrics(more.run_dir)["backbone_clips"].tolist() == [18, 0]  # only the new view
    other_size = train(tiny_config(run_name="other_size", input_size=48, **settings), log=lambda _: None)
    assert metrics(other_size.run_dir)["backbone_clips"].tolist() == [18 * 3 + 9, 0]


def test_each_epoch_trains_on_one_cached_view_per_clip_and_validation_on_view_0():
    from types import SimpleNamespace

    from headernet_core.data import ClipTransform, EpochSampler
    from headernet_core.features import FeatureLoader

    clips, views = 40, 3
    table = torch.arange(views, dtype=torch.float32).view(views, 1, 1).expand(views, clips, 2).clone()
    table[:, :, 1] = torch.arange(clips, dtype=torch.float32)  # feature = (view, clip)
    features = SimpleNamespace(train=table, val=table[0] + 100, views=views, ready=True,
                               train_paths=[""] * clips,
                               transform=ClipTransform(num_frames=2, size=8, train=True, seed=1))
    labels = np.arange(clips) % 2
    sampler = EpochSampler(labels, neg_pos_ratio=None, seed=1, shuffle=True)
    loader = FeatureLoader(features, sampler, labels, batch_size=16, train=True)
    assert len(loader) == 3
    seen = {}
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        rows = torch.cat([f for f, _ in loader])
        assert sorted(rows[:, 1].tolist()) == list(range(clips))  # every clip once
        expected = features.transform.epoch_views(epoch, clips, views)
        assert [int(v) for v in rows[:, 0]] == [int(expected[int(c)]) for c in rows[:, 1]]
        seen[epoch] = dict(zip(rows[:, 1].tolist(), rows[:, 0].tolist()))
        batch_labels = torch.cat([label for _, label in loader])
        assert batch_labels.tolist() == [int(c) % 2 for c in rows[:, 1]]
    assert seen[1] != seen[2] and set(seen[1].values()) == {0.0, 1.0, 2.0}
    val = FeatureLoader(features, EpochSampler(labels, neg_pos_ratio=None, seed=1, shuffle=False),
                        labels, batch_size=16, train=False)
    assert torch.equal(torch.cat([f for f, _ in val]), table[0] + 100)
