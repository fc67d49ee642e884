"""Golden values of how sampled settings and metrics are shown: trial folder names, console
lines, the space's description and summary.md cells. Pinned so that sharing one formatter
changes nothing a user sees (a trial folder name is also how --resume finds a trial)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tuning.space import Param
from tuning.summary import _fmt_value
from tuning.trial import format_value, trial_dirname


def dirname(config: dict, tag: str = "3_x=1", trial_id: str = "ab12_00003") -> str:
    return trial_dirname(SimpleNamespace(experiment_tag=tag, trial_id=trial_id, config=config))


@pytest.mark.parametrize("config, expected", [
    ({"lr_head": 3e-4}, "t003_lr_head=3.0e-04"),
    ({"lr_backbone": 0.0001234}, "t003_lr_backbone=1.2e-04"),
    ({"weight_decay": 1e5}, "t003_weight_decay=1.0e_05"),
    ({"warmup_epochs": 12.5, "head_dropout": 0.0}, "t003_head_dropout=0_warmup_epochs=12.5"),
    ({"momentum": 1234.5, "focal_gamma": 999.95}, "t003_focal_gamma=1e_03_momentum=1.2e_03"),
    ({"focal_alpha": 1 / 3, "aug_flip": 0.01}, "t003_aug_flip=0.01_focal_alpha=0.333"),
    ({"max_grad_norm": -0.005, "epochs": 7}, "t003_epochs=7_max_grad_norm=-5.0e-03"),
    ({"augment": True, "cpu": False}, "t003_augment=True_cpu=False"),
    ({"backbone": "csn", "neg_pos_ratio": "2.5", "layer_decay": None},
     "t003_backbone=csn_layer_decay=None_neg_pos_ratio=2.5"),
    ({"run": "a b/c", "betas": [0.9, 0.99]}, "t003_betas=_0.9__0.99__run=a_b_c"),
    ({"lr_head": 1e-3, "x" * 130: 1}, "t003_lr_head=1.0e-03_" + "x" * 99),
])
def test_trial_folder_names(config, expected):
    assert dirname(config) == expected


def test_trial_folder_name_without_a_launch_index_uses_the_trial_id():
    assert dirname({"lr_head": 2e-3}, tag="x") == "tab12_00003_lr_head=2.0e-03"


@pytest.mark.parametrize("value, console, space, summary", [
    (3e-4, "3.0e-04", "0.0003", "0.0003"),
    (0.0001234, "1.2e-04", "0.0001234", "0.000123"),
    (1e5, "1.0e+05", "100000", "1e+05"),
    (12.5, "12.5", "12.5", "12.5"),
    (0.0, "0", "0", "0"),
    (2.0, "2", "2", "2"),
    (1234.5, "1234", "1234.5", "1.23e+03"),
    (1 / 3, "0.3333", "0.333333", "0.333"),
    (-0.005, "-5.0e-03", "-0.005", "-0.005"),
    (7, "7", "7", "7"),
    (True, "True", "true", "true"),
    (False, "False", "false", "false"),
    ("csn", "csn", "csn", "csn"),
    ("all", "all", "all", "all"),
    (np.float32(0.5), "0.5", None, "0.5"),
    (np.int64(3), "3", None, "3"),
])
def test_console_space_and_summary_values(value, console, space, summary):
    assert format_value(value) == console
    if space is not None:   # a space holds plain YAML values only
        assert Param("x", "choice", values=(value,)).describe() == f"x: choice {space}"
    assert _fmt_value(value) == summary


def test_missing_and_blank_values():
    assert format_value(None) == "None"
    assert _fmt_value(None) == "-"
    assert Param("x", "choice", values=(None, "", " a")).describe() == "x: choice null | '' | ' a'"
    assert Param("lr", "loguniform", low=1e-5, high=0.01).describe() == "lr: loguniform 1e-05 .. 0.01"
