"""Optimizer parameter groups, LR defaults, AMP resolution and gradient accumulation.

Upstream's trainer silently ignored --lr_backbone/--lr_head; these tests pin down that every
trainable parameter lands in exactly one group with the LR and weight decay the user asked for.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from headernet_core.backbones import create_backbone
from headernet_core.config import LR_TABLE, TrainConfig
from headernet_core.errors import HeaderNetError
from headernet_core.model import build_classifier, build_optimizer, nominal_lr
from headernet_core.trainer import build_scheduler, resolve_amp, resolve_devices, train


def make(backbone: str = "vmae", **values):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        module, info = create_backbone(backbone, "tiny")
    config = TrainConfig(backbone=backbone, vmae_variant="tiny", csn_variant="tiny", **values).resolved(
        native_size=info.native_size, default_mean=info.mean, default_std=info.std)
    model = build_classifier(module, config)
    return model, config, build_optimizer(model, config)


def groups_of(model, optimizer) -> dict[str, dict]:
    """Parameter name -> the optimizer group holding it (each parameter in exactly one)."""
    by_id = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert id(param) not in by_id, "a parameter is in two groups"
            by_id[id(param)] = group
    return {name: by_id[id(p)] for name, p in model.named_parameters() if id(p) in by_id}


def test_two_lrs_and_no_decay_on_norms_and_biases():
    model, config, optimizer = make(lr_backbone=1e-4, lr_head=3e-3, weight_decay=0.07)
    groups = groups_of(model, optimizer)
    assert set(groups) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        group = groups[name]
        assert group["lr"] == (3e-3 if name.startswith("head.") else 1e-4), name
        assert group["weight_decay"] == (0.0 if param.ndim <= 1 else 0.07), name
    assert groups["head.fc.bias"]["weight_decay"] == 0.0
    assert nominal_lr(optimizer, "backbone") == 1e-4 and nominal_lr(optimizer, "head") == 3e-3


def test_frozen_backbone_is_not_in_the_optimizer():
    model, config, optimizer = make(finetune_mode="frozen", lr_head=2e-3)
    assert config.lr_backbone is None
    assert set(groups_of(model, optimizer)) == {"head.fc.weight", "head.fc.bias"}
    assert nominal_lr(optimizer, "backbone") != nominal_lr(optimizer, "backbone")  # NaN


@pytest.mark.parametrize("backbone", ["vmae", "csn"])
def test_partial_trains_exactly_the_last_blocks_and_the_head(backbone):
    model, config, optimizer = make(backbone, finetune_mode="partial", unfreeze_blocks=1)
    trained = set(groups_of(model, optimizer))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    blocks = model.backbone.block_list()
    assert {id(p) for p in blocks[-1].parameters()} <= in_optimizer
    assert not {id(p) for p in blocks[0].parameters()} & in_optimizer
    assert {"head.fc.weight", "head.fc.bias"} <= trained


def test_layer_decay_scales_backbone_lrs_with_and_without_a_scheduler():
    model, config, optimizer = make(lr_backbone=1e-3, lr_head=1e-2, layer_decay=0.5, scheduler="none")
    backbone_groups = [g for g in optimizer.param_groups if g["name"] == "backbone"]
    scales = sorted({g["lr_scale"] for g in backbone_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[0] < 0.2
    for group in backbone_groups:  # no scheduler: the optimizer itself must use the scaled LR
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
    assert nominal_lr(optimizer, "backbone") == pytest.approx(1e-3)

    model, config, optimizer = make(lr_backbone=1e-3, lr_head=1e-2, layer_decay=0.5,
                                    scheduler="cosine", warmup_epochs=1, epochs=4)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=10)
    scheduler.step_update(20)
    factor = nominal_lr(optimizer, "head") / 1e-2  # where the cosine is, the same for all groups
    assert 0 < factor < 1
    for group in optimizer.param_groups:
        if group["name"] == "backbone":  # scaled once, not twice
            assert group["lr"] == pytest.approx(factor * 1e-3 * group["lr_scale"], rel=1e-6)
    assert nominal_lr(optimizer, "backbone") == pytest.approx(factor * 1e-3, rel=1e-6)


def test_sgd_uses_momentum_and_the_same_groups():
    model, config, optimizer = make(optimizer="sgd", momentum=0.8, lr_backbone=1e-4, lr_head=1e-3)
    assert isinstance(optimizer, torch.optim.SGD)
    assert {g["momentum"] for g in optimizer.param_groups} == {0.8}
    assert {g["lr"] for g in optimizer.param_groups} == {1e-4, 1e-3}


@pytest.mark.parametrize("backbone, mode", sorted(LR_TABLE))
def test_lr_table_defaults_and_explicit_flags_win(backbone, mode):
    lr_bb, lr_head = LR_TABLE[(backbone, mode)]
    _, config, _ = make(backbone, finetune_mode=mode, unfreeze_blocks=1)
    trains = mode != "frozen"
    assert config.lr_backbone == (lr_bb if trains else None)
    assert config.lr_head == (lr_head if lr_head is not None else lr_bb)
    _, config, _ = make(backbone, finetune_mode=mode, unfreeze_blocks=1, lr_backbone=7e-6, lr_head=7e-2)
    assert (config.lr_backbone, config.lr_head) == ((7e-6 if trains else None), 7e-2)


def test_csn_full_head_follows_an_explicit_backbone_lr():
    _, config, _ = make("csn", lr_backbone=2e-3)
    assert config.lr_head == 2e-3


def test_resolve_amp_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(HeaderNetError, match="--amp fp16 needs a GPU"):
        resolve_amp("fp16", cpu)


def test_grad_accum_equals_the_larger_batch(tiny_config):
    """batch 2 x accum 2 == batch 4, including the epoch's short last group (18 clips)."""
    common = dict(optimizer="sgd", momentum=0.0, head_dropout=0.0, epochs=1, augment=False,
                  loss="ce")
    big = train(tiny_config(batch_size=4, grad_accum=1, run_name="big", **common), log=lambda _: None)
    small = train(tiny_config(batch_size=2, grad_accum=2, run_name="small", **common), log=lambda _: None)
    big_ckpt = torch.load(big.run_dir / "checkpoints" / "last.pt", weights_only=True)
    small_ckpt = torch.load(small.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert big_ckpt["global_step"] == small_ckpt["global_step"] == 5
    for name, value in big_ckpt["state_dict"].items():
        torch.testing.assert_close(small_ckpt["state_dict"][name], value, atol=2e-6, rtol=1e-5,
                                   msg=name)


def _pretend_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    """The device logic without hardware: CI has no GPU, so fake what torch.cuda reports."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_gpus_pick_the_primary_device_and_reject_ids_that_do_not_exist(monkeypatch):
    _pretend_gpus(monkeypatch, 4)
    config = TrainConfig(train_csv="t.csv", val_csv="v.csv")
    assert resolve_devices(config) == (torch.device("cuda:0"), [0])
    assert resolve_devices(config.replace(gpus=[2, 3])) == (torch.device("cuda:2"), [2, 3])
    assert resolve_devices(config.replace(gpus=[1], cpu=True)) == (torch.device("cpu"), [])
    for bad, fragment in (([4], "only 4 GPU"), ([-1], "only 4 GPU"), ([1, 1], "twice")):
        with pytest.raises(HeaderNetError, match=fragment):
            resolve_devices(config.replace(gpus=bad))
    _pretend_gpus(monkeypatch, 0)
    assert resolve_devices(config) == (torch.device("cpu"), [])
    with pytest.raises(HeaderNetError, match="no CUDA GPU"):
        resolve_devices(config.replace(gpus=[0]))


def test_amp_auto_on_a_gpu_follows_bf16_support(monkeypatch):
    gpu = torch.device("cuda:0")
    _pretend_gpus(monkeypatch, 1, bf16=True)
    assert resolve_amp("auto", gpu) is torch.bfloat16 and resolve_amp("fp16", gpu) is torch.float16
    _pretend_gpus(monkeypatch, 1, bf16=False)
    assert resolve_amp("auto", gpu) is torch.float16
    with pytest.raises(HeaderNetError, match="no bf16 support"):
        resolve_amp("bf16", gpu)
