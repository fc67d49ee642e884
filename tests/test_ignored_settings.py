"""Settings that have no effect are warned about, one line each naming the flag and why: in a
single run (the trainer's `prepare`, whose CLI prints `warning: ...`), and once per search for
what its trials would ignore or replace."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from headernet_core.config import IgnoredSettingWarning, TrainConfig, ignored_settings
from headernet_core.trainer import prepare
from tuning.space import load_space
from tuning.trial import search_warnings

REPO = Path(__file__).resolve().parents[1]
FIXTURE_VMAE = REPO / "tests" / "data" / "vmae_tiny"


@pytest.mark.parametrize("settings, expected", [
    ({"finetune_mode": "frozen", "lr_backbone": 1e-4},
     "--lr_backbone 0.0001 has no effect with --finetune_mode frozen"),
    ({"finetune_mode": "frozen", "layer_decay": 0.75}, "--layer_decay 0.75 has no effect"),
    ({"finetune_mode": "frozen", "gradient_checkpointing": True},
     "--gradient_checkpointing has no effect with a frozen backbone"),
    ({"unfreeze_blocks": 6}, "--unfreeze_blocks 6 has no effect with --finetune_mode full"),
    ({"finetune_mode": "frozen", "unfreeze_blocks": 2}, "--unfreeze_blocks 2 has no effect with --finetune_mode frozen"),
    ({"loss": "ce", "focal_alpha": 0.5}, "--focal_alpha 0.5 has no effect with --loss ce"),
    ({"loss": "ce", "focal_gamma": 3.0}, "--focal_gamma 3 has no effect with --loss ce"),
    ({"momentum": 0.8}, "--momentum 0.8 has no effect with --optimizer adamw (SGD only)"),
    ({"optimizer": "sgd", "betas": [0.8, 0.99]}, "--betas 0.8 0.99 has no effect with --optimizer sgd"),
    ({"scheduler": "none", "warmup_epochs": 2.0}, "--warmup_epochs 2 has no effect with --scheduler none"),
    ({"augment": False, "aug_flip": 0.0}, "--aug_flip 0 has no effect with --no-augment"),
    ({"augment": False, "aug_jitter": 0.3}, "--aug_jitter 0.3 has no effect with --no-augment"),
    ({"augment": False, "aug_crop_scale": 1.0}, "--aug_crop_scale 1 has no effect with --no-augment"),
    ({"mixup_prob": 0.5}, "--mixup_prob 0.5 has no effect while --mixup and --cutmix are 0"),
    ({"mixup_switch_prob": 0.2}, "--mixup_switch_prob 0.2 has no effect while --mixup and --cutmix"),
    ({"mixup": 0.8, "mixup_switch_prob": 0.2},
     "--mixup_switch_prob 0.2 has no effect unless --mixup and --cutmix are both on"),
    ({"model_ema_decay": 0.99}, "--model_ema_decay 0.99 has no effect without --model_ema"),
])
def test_each_ignored_setting_gets_one_line(settings, expected):
    lines = ignored_settings(TrainConfig(**settings))
    assert len(lines) == 1 and lines[0].startswith(expected), lines


@pytest.mark.parametrize("settings", [
    {},                                                     # defaults
    {"finetune_mode": "partial", "unfreeze_blocks": 6},     # the setting is used
    {"optimizer": "sgd", "momentum": 0.8},
    {"loss": "focal", "focal_gamma": 3.0},
    {"finetune_mode": "frozen"},                            # lr_backbone left to the LR table
    {"augment": False},
    {"mixup": 0.8, "cutmix": 1.0, "mixup_prob": 0.5, "mixup_switch_prob": 0.2},
    {"model_ema": True, "model_ema_decay": 0.99},
])
def test_settings_that_take_effect_are_not_warned_about(settings):
    assert ignored_settings(TrainConfig(**settings)) == []


def test_prepare_warns_including_a_vmae_config_json_dropout(tiny_config, tmp_path):
    with pytest.warns(IgnoredSettingWarning, match="--momentum 0.5 has no effect"):
        prepare(tiny_config(momentum=0.5))
    folder = tmp_path / "vmae_dropout"
    shutil.copytree(FIXTURE_VMAE, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_config"]["drop_path_rate"] = 0.1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(IgnoredSettingWarning, match="config.json drop_path_rate 0.1 has no effect"):
        prepare(tiny_config(backbone_ckpt=str(folder)))


def test_the_cli_prints_each_warning_on_one_line(tiny_data, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "headernet_core.train", "--train_csv", str(tiny_data["train_csv"]),
         "--val_csv", str(tiny_data["val_csv"]), "--vmae_variant", "tiny", "--num_frames", "4",
         "--input_size", "32", "--epochs", "1", "--cpu", "--num_workers", "0", "--no-progress",
         "--no-plots", "--no-tensorboard", "--loss", "ce", "--focal_gamma", "3",
         "--output_root", str(tmp_path), "--run_name", "r"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "focal_gamma" in line]
    assert warned == ["warning: --focal_gamma 3 has no effect with --loss ce (focal loss only)"]
    assert "Warning:" not in result.stderr  # every warning is a `warning: ...` line


def test_a_search_names_what_its_trials_replace_or_ignore(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({
        "trainer": {"select_metric": "val_auc", "num_workers": 4, "progress": True, "cpu": True,
                    "output_root": str(tmp_path / "elsewhere"), "vmae_variant": "tiny"},
        "search": {"finetune_mode": {"choice": ["frozen", "full"]},
                   "lr_backbone": {"loguniform": [1e-4, 1e-3]}},
        "resources": {"cpu": 2, "gpu": 0}}))
    space = load_space(str(space_file))
    lines = search_warnings(space, tmp_path / "storage" / "space")
    text = "\n".join(lines)
    assert "select_metric val_auc is replaced by val_f1 in trials" in text
    assert "num_workers 4 becomes 1 in trials: resources.cpu 2" in text
    assert "progress is off in trials" in text
    assert f"output_root {tmp_path / 'elsewhere'} is not used" in text
    # lr_backbone is sampled for both choices, but only frozen trials ignore it
    [lr] = [line for line in lines if line.startswith("--lr_backbone")]
    assert lr.endswith("(trials with finetune_mode=frozen)"), lr
    assert all("\n" not in line for line in lines)
