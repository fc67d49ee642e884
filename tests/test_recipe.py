"""The fine-tuning recipe knobs of the published VideoMAE v2 / mmaction2 ir-CSN results, each by
its properties: drop path, label smoothing, --clip_grad, --bn_frozen, temporal jitter, the LR
of VideoMAE's fc_norm; killed-and-resumed runs with them are bitwise the uninterrupted ones."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

import headernet_core.trainer as trainer_mod
from headernet_core.metrics import MEASURED_METRICS
from headernet_core.backbones import create_backbone
from headernet_core.backbones.configs import CSN_VARIANTS
from headernet_core.backbones.csn import IrCSN
from headernet_core.config import TrainConfig, ignored_settings
from headernet_core.data import (
    ClipDataset,
    ClipTransform,
    frame_segments,
    jittered_frame_indices,
    sample_frame_indices,
)
from headernet_core.errors import HeaderNetError
from headernet_core.losses import FocalLoss, build_loss
from headernet_core.model import build_classifier, build_optimizer
from headernet_core.trainer import config_for_cli, train

TIMING = list(MEASURED_METRICS)


def tiny_vmae(drop_path: float = 0.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        backbone, info = create_backbone("vmae", "tiny")
    config = TrainConfig(vmae_variant="tiny", drop_path=drop_path).resolved(
        native_size=info.native_size, default_mean=info.mean, default_std=info.std)
    return build_classifier(backbone, config), info


def write_tiny_csn_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny ir-CSN in mmaction2's Recognizer3D layout (`state_dict` / `backbone.` /
    `cls_head.`), with BN statistics and affine parameters away from their initial values."""
    torch.manual_seed(seed)
    model = IrCSN(CSN_VARIANTS["tiny"])
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                tensor.uniform_(-0.2, 0.2)
            elif name.endswith(("running_var", "bn.weight")):
                tensor.uniform_(0.5, 1.5)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    state |= {"cls_head.fc_cls.weight": torch.zeros(400, model.num_features),
              "cls_head.fc_cls.bias": torch.zeros(400)}
    torch.save({"meta": {"epoch": 58}, "state_dict": state}, path)
    return path


# --- drop path --------------------------------------------------------------------------------
def test_drop_path_rates_are_linear_over_the_blocks_and_eval_is_identity():
    model, _ = tiny_vmae(drop_path=0.3)
    blocks = model.backbone.blocks
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, len(blocks)).tolist())
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)   # rate 0: no module at all
    x = torch.randn(2, 3, 8, 64, 64)
    plain, _ = tiny_vmae()
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_drop_path_drops_whole_samples_of_a_block_at_its_rate():
    model, _ = tiny_vmae(drop_path=0.5)
    block = model.backbone.blocks[-1].train()            # rate 0.5
    x = torch.randn(4000, 3, 64)
    branch = block.drop_path
    out = branch(torch.ones_like(x))
    per_sample = out.flatten(1)
    kept = (per_sample != 0).all(1)
    assert ((per_sample == 0).all(1) | kept).all()        # a sample is dropped whole or kept whole
    assert kept.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.allclose(per_sample[kept], torch.full_like(per_sample[kept], 2.0))  # 1/(1-p)


def test_drop_path_zero_is_todays_run(tiny_config):
    a = train(tiny_config(epochs=1, run_name="a"), log=lambda _: None)
    b = train(tiny_config(epochs=1, run_name="b", drop_path=0.0, label_smoothing=0.0,
                          temporal_jitter=False), log=lambda _: None)
    wa = torch.load(a.run_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(b.run_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --- label smoothing ----------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_torch_cross_entropy(eps):
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 2) * 3, torch.randint(0, 2, (16,))
    expected = F.cross_entropy(logits, labels, label_smoothing=eps)
    ce = build_loss("ce", focal_alpha=0.75, focal_gamma=2.0, label_smoothing=eps)
    assert torch.equal(ce(logits, labels), expected)
    # focal with gamma 0 and alpha 0.5 is half the (smoothed) cross-entropy
    focal = build_loss("focal", focal_alpha=0.5, focal_gamma=0.0, label_smoothing=eps)
    torch.testing.assert_close(focal(logits, labels), 0.5 * expected)


def test_smoothed_focal_is_the_target_weighted_sum_of_class_terms():
    torch.manual_seed(1)
    logits, labels = torch.randn(32, 2) * 4, torch.randint(0, 2, (32,))
    plain = FocalLoss(alpha=0.75, gamma=2.0)
    p_t = logits.softmax(1).gather(1, labels[:, None]).squeeze(1)   # the textbook hard-label focal loss
    alpha_t = torch.where(labels == 1, 0.75, 0.25)
    torch.testing.assert_close(plain(logits, labels), -(alpha_t * (1 - p_t) ** 2 * p_t.log()).mean())
    eps, q = 0.2, F.one_hot(labels, 2).float() * 0.8 + 0.1
    p = logits.softmax(1)
    expected = -(torch.tensor([0.25, 0.75]) * q * (1 - p) ** 2 * p.log()).sum(1).mean()
    torch.testing.assert_close(FocalLoss(0.75, 2.0, label_smoothing=eps)(logits, labels), expected)
    torch.testing.assert_close(plain(logits, q), expected)   # soft targets directly


# --- --clip_grad --------------------------------------------------------------------------------
def test_clip_grad_is_max_grad_norm(tmp_path):
    base = ["--train_csv", "t.csv", "--val_csv", "v.csv"]
    assert config_for_cli(base + ["--clip_grad", "40"]) == config_for_cli(base + ["--max_grad_norm", "40"])
    assert config_for_cli(base + ["--clip_grad", "40"]).max_grad_norm == 40.0
    file = tmp_path / "c.yaml"
    file.write_text("clip_grad: 5\n")
    config = config_for_cli(["--config", str(file)] + base)
    assert config.max_grad_norm == 5.0 and "clip_grad" not in config.to_dict()
    assert config_for_cli(["--config", str(file), "--max_grad_norm", "7"] + base).max_grad_norm == 7.0
    assert TrainConfig.from_dict({"clip_grad": 3}).max_grad_norm == 3.0
    with pytest.raises(HeaderNetError, match="clip_grad is another name of max_grad_norm"):
        TrainConfig.from_dict({"clip_grad": 3, "max_grad_norm": 4})


# --- --bn_frozen --------------------------------------------------------------------------------
def test_bn_frozen_keeps_every_batchnorm_buffer_and_parameter(tiny_config, tmp_path):
    ckpt = write_tiny_csn_checkpoint(tmp_path / "csn.pth")
    result = train(tiny_config(backbone="csn", backbone_ckpt=str(ckpt), bn_frozen=True, epochs=1),
                   log=lambda _: None)
    trained = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    original = torch.load(ckpt, weights_only=True)["state_dict"]
    bn = [k for k in original if ".bn." in k]
    assert len(bn) == 5 * 17 and any(k.endswith("num_batches_tracked") for k in bn)  # stem + 4 x 4
    for key in bn:
        assert torch.equal(trained[key], original[key]), key
    conv = "backbone.layer4.0.conv1.conv.weight"
    assert not torch.equal(trained[conv], original[conv])      # the rest of the backbone trains


def test_bn_frozen_survives_train_calls_and_dataparallel_and_is_not_optimised():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone, info = create_backbone("csn", "tiny")
    config = TrainConfig(backbone="csn", csn_variant="tiny", bn_frozen=True).resolved(
        native_size=info.native_size, default_mean=info.mean, default_std=info.std)
    model = build_classifier(backbone, config)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    for net in (model, torch.nn.DataParallel(model)):
        net.train()
        assert not any(m.training for m in norms) and model.backbone.conv1.conv.training
    optimised = {id(p) for g in build_optimizer(model, config).param_groups for p in g["params"]}
    assert not any(id(p) in optimised for m in norms for p in m.parameters())
    assert id(model.backbone.conv1.conv.weight) in optimised


@pytest.mark.parametrize("settings, expected", [
    ({"backbone": "vmae", "bn_frozen": True}, "--bn_frozen has no effect with --backbone vmae"),
    ({"backbone": "csn", "finetune_mode": "frozen", "bn_frozen": True, "backbone_ckpt": "x.pth"},
     "--bn_frozen has no effect with a frozen backbone"),
    ({"backbone": "csn", "bn_frozen": True}, "--bn_frozen on a randomly initialised ir-CSN"),
    ({"backbone": "csn", "drop_path": 0.1}, "--drop_path 0.1 has no effect with --backbone csn"),
    ({"finetune_mode": "frozen", "drop_path": 0.1}, "--drop_path 0.1 has no effect with a frozen backbone"),
    ({"finetune_mode": "frozen", "temporal_jitter": True},
     "--temporal_jitter has no effect with a frozen backbone's feature cache"),
])
def test_recipe_settings_without_effect_get_one_line(settings, expected):
    lines = ignored_settings(TrainConfig(**settings))
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_recipe_settings_that_take_effect_are_not_warned_about():
    for settings in ({"drop_path": 0.2}, {"label_smoothing": 0.1}, {"temporal_jitter": True},
                     {"backbone": "csn", "bn_frozen": True, "backbone_ckpt": "x.pth"},
                     {"finetune_mode": "frozen", "feature_cache": False, "temporal_jitter": True}):
        assert ignored_settings(TrainConfig(**settings)) == [], settings


# --- temporal jitter ----------------------------------------------------------------------------
@pytest.mark.parametrize("frames, n", [(6, 4), (16, 4), (37, 8), (100, 16), (16, 16), (5, 8), (9, 1)])
def test_segments_tile_the_clip_around_the_evenly_spaced_frames(frames, n):
    lo, hi = frame_segments(frames, n)
    even = sample_frame_indices(frames, n)
    assert ((lo <= even) & (even <= hi)).all()
    if frames >= n:      # contiguous, covering every frame once
        assert lo[0] == 0 and hi[-1] == frames - 1 and (lo[1:] == hi[:-1] + 1).all()
        positions = np.linspace(0, frames - 1, n) if n > 1 else np.array([(frames - 1) / 2])
        for t in range(frames):   # each frame is in the segment of its nearest position
            k = np.searchsorted(hi, t)
            assert np.abs(positions - t).min() == pytest.approx(abs(positions[k] - t)) or n == 1
    else:                # shorter clips repeat frames: nothing to jitter
        assert (lo == hi).all()
    rng = np.random.default_rng(0)
    for _ in range(50):
        picked = jittered_frame_indices(frames, n, rng.random(n))
        assert ((lo <= picked) & (picked <= hi)).all()
    assert (jittered_frame_indices(frames, n, np.zeros(n)) == lo).all()
    assert (jittered_frame_indices(frames, n, np.full(n, 1 - 1e-12)) == hi).all()


def test_temporal_jitter_is_reproducible_training_only_and_off_is_today():
    kwargs = {"num_frames": 8, "size": 32, "seed": 3}
    jitter = ClipTransform(train=True, temporal_jitter=True, **kwargs)
    again = ClipTransform(train=True, temporal_jitter=True, **kwargs)
    draws = {tuple(jitter.frame_indices(40, epoch, index)) for epoch in (1, 2) for index in range(5)}
    assert len(draws) > 5                                  # varies by epoch and clip
    assert all((jitter.frame_indices(40, e, i) == again.frame_indices(40, e, i)).all()
               for e in (1, 2) for i in range(5))
    assert (ClipTransform(train=True, **kwargs).frame_indices(40, 1, 0) == sample_frame_indices(40, 8)).all()
    config = TrainConfig(temporal_jitter=True, input_size=32)
    assert ClipTransform.from_config(config, train=True).temporal_jitter
    assert not ClipTransform.from_config(config, train=False).temporal_jitter   # validation
    cached = ClipDataset(["a"], [0], jitter, views=True)                       # feature cache
    assert (cached.frame_indices(40, (0, 0)) == sample_frame_indices(40, 8)).all()


def test_temporal_jitter_reads_the_jittered_frames(tmp_path):
    clip = np.broadcast_to(np.arange(20, dtype=np.uint8)[:, None, None, None], (20, 8, 8, 3)).copy()
    np.save(tmp_path / "c.npy", clip)
    transform = ClipTransform(num_frames=4, size=8, train=False, temporal_jitter=True, seed=1)
    dataset = ClipDataset([str(tmp_path / "c.npy")], [1], transform)
    batch = dataset.read_batch([(0, 7)])
    assert batch.frames[0, :, 0, 0, 0].tolist() == transform.frame_indices(20, 7, 0).tolist()


# --- which LR fc_norm gets ----------------------------------------------------------------------
@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_fc_norm_trains_at_the_backbone_lr_at_scale_one(layer_decay):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone, info = create_backbone("vmae", "tiny")
    config = TrainConfig(vmae_variant="tiny", lr_backbone=1e-4, lr_head=2e-3,
                         layer_decay=layer_decay).resolved(
        native_size=info.native_size, default_mean=info.mean, default_std=info.std)
    model = build_classifier(backbone, config)
    optimizer = build_optimizer(model, config)
    for name in ("weight", "bias"):
        param = model.backbone.fc_norm.get_parameter(name)
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        assert group["name"] == "backbone" and group["lr"] == 1e-4 and group.get("lr_scale", 1.0) == 1.0


# --- resume is exact with every knob ------------------------------------------------------------
def interrupted_then_resumed(tiny_config, monkeypatch, at_call: int, **settings):
    """A run killed (KeyboardInterrupt) inside its third epoch's training, then resumed."""
    real_build_loss, calls = trainer_mod.build_loss, {"train": 0}

    def build_loss(*args, **kwargs):
        criterion = real_build_loss(*args, **kwargs)
        if "label_smoothing" not in kwargs:   # the validation loss
            return criterion

        def counting(logits, labels):
            calls["train"] += 1
            if calls["train"] == at_call:
                raise KeyboardInterrupt
            return criterion(logits, labels)
        return counting

    monkeypatch.setattr(trainer_mod, "build_loss", build_loss)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(epochs=3, run_name="killed", **settings), log=lambda _: None)
    monkeypatch.setattr(trainer_mod, "build_loss", real_build_loss)
    return train(tiny_config(epochs=3, run_name="killed", resume=True, **settings), log=lambda _: None)


@pytest.mark.parametrize("backbone, settings", [   # every recipe knob that applies, at once
    ("vmae", {"drop_path": 0.3, "temporal_jitter": True, "label_smoothing": 0.1, "max_grad_norm": 0.5,
              "mixup": 0.8, "cutmix": 1.0, "model_ema": True, "model_ema_decay": 0.99}),
    ("csn", {"bn_frozen": True, "temporal_jitter": True, "label_smoothing": 0.1,
             "max_grad_norm": 0.5, "optimizer": "sgd", "mixup": 0.8, "cutmix": 1.0, "model_ema": True}),
])
def test_killed_mid_epoch_and_resumed_is_bitwise_the_uninterrupted_run(
        tiny_config, monkeypatch, tmp_path, backbone, settings):
    if backbone == "csn":
        settings = {**settings, "backbone_ckpt": str(write_tiny_csn_checkpoint(tmp_path / "csn.pth"))}
    settings = {"backbone": backbone, **settings}
    straight = train(tiny_config(epochs=3, run_name="straight", **settings), log=lambda _: None)
    steps = len(pd.read_csv(straight.run_dir / "metrics_epoch.csv"))   # 3 epochs
    assert steps == 3
    resumed = interrupted_then_resumed(tiny_config, monkeypatch, at_call=2 * 5 + 3, **settings)
    assert resumed.status == "finished"
    a = pd.read_csv(straight.run_dir / "metrics_epoch.csv").drop(columns=TIMING)
    b = pd.read_csv(resumed.run_dir / "metrics_epoch.csv").drop(columns=TIMING)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    wa = torch.load(straight.run_dir / "checkpoints" / "last.pt", weights_only=True)
    wb = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)
    for key in wa["state_dict"]:
        assert torch.equal(wa["state_dict"][key], wb["state_dict"][key]), key
    saved = yaml.safe_load((resumed.run_dir / "config.yaml").read_text())
    assert all(saved[k] == v for k, v in settings.items())


# --- the shipped csn_ig65m space --------------------------------------------------------------
@pytest.mark.slow
def test_csn_ig65m_space_runs_with_a_tiny_checkpoint(tiny_data, tmp_path, capsys):
    """The shipped space end to end (Ray, 2 trials of 1 epoch) with a tiny mmaction2-layout
    ir-CSN checkpoint in place of the IG65M one: the recipe's settings reach the trials."""
    import json

    from tuning.search import main

    ckpt = write_tiny_csn_checkpoint(tmp_path / "ircsn_tiny.pth")
    sets = {"csn_variant": "tiny", "backbone_ckpt": ckpt, "epochs": 1, "num_frames": 4,
            "input_size": 32, "batch_size": 6, "num_workers": 0, "cpu": True, "progress": False,
            "plots": False, "tensorboard": False, "output_root": tmp_path / "out",
            "budget.num_samples": 2, "budget.max_concurrent": 1, "scheduler.type": "none",
            "resources.cpu": 1, "resources.gpu": 0}
    main(["--space", "csn_ig65m", "--train_csv", str(tiny_data["train_csv"]),
          "--val_csv", str(tiny_data["val_csv"]), *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]])
    search_dir = tmp_path / "out" / "csn_ig65m"
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["finished", "finished"]
    for trial in summary["trials"]:
        config = yaml.safe_load((search_dir / trial["name"] / "config.yaml").read_text())
        assert (config["optimizer"], config["bn_frozen"], config["max_grad_norm"]) == ("sgd", True, 40.0)
        assert config["backbone_ckpt"] == str(ckpt) and 1.5e-4 <= config["lr_backbone"] <= 1.5e-3
        trained = torch.load(search_dir / trial["name"] / "checkpoints" / "last.pt",
                             weights_only=True)["state_dict"]
        original = torch.load(ckpt, weights_only=True)["state_dict"]
        assert torch.equal(trained["backbone.conv1.bn.running_mean"], original["backbone.conv1.bn.running_mean"])
