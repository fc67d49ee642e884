"""Field roles on TrainConfig and every key list derived from them (tuning and the trainer),
the VideoMAE checkpoint-folder rule and the feature-cache default folder."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from headernet_core.backbones.configs import published_folder
from headernet_core.config import ROLES, TrainConfig, fields_with_role
from headernet_core.features import cache_dir
from headernet_core.trainer import RESUMABLE_CHANGES
from tuning.retrain import DEVICE_KEYS, RUN_KEYS, final_config
from tuning.search import PATH_KEYS, absolute_paths
from tuning.space import TRIAL_OWNED, load_space
from tuning.trial import TRIAL_REPLACED

RUN = {"output_root", "run_name", "resume", "overwrite"}
DEVICE = {"cpu", "gpus", "num_workers", "threads", "progress"}
PATHS = {"train_csv", "val_csv", "backbone_ckpt", "checkpoint_root", "output_root", "feature_cache_dir"}


def test_derived_key_lists():
    assert set(RUN_KEYS) == RUN
    assert set(DEVICE_KEYS) == DEVICE
    assert set(PATH_KEYS) == PATHS
    assert set(TRIAL_OWNED) == {"run_name", "resume", "overwrite"}       # a space may set output_root
    assert set(TRIAL_REPLACED) == {"select_metric", "output_root", "cpu", "gpus", "num_workers",
                                   "progress"}                         # a space's threads is kept
    assert RESUMABLE_CHANGES == RUN | DEVICE | {"epochs", "tensorboard", "plots", "compile",
                                                "feature_cache_dir"}


def test_every_field_has_a_consistent_role_decision():
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        roles = f.metadata["roles"]
        assert roles <= set(ROLES), f.name
        named_like_a_path = f.name.endswith(("_csv", "_ckpt", "_root", "_dir"))
        assert named_like_a_path == ("path" in roles), f.name
        if "path" in roles:
            assert hints[f.name] in (str, str | None), f.name
        if roles & {"run", "device"}:          # a run folder may move; a resume may get other devices
            assert "resumable" in roles, f.name


def test_an_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown field role"):
        fields_with_role("devices")


def test_a_retrain_replaces_run_and_device_settings_and_keeps_the_model(tmp_path):
    trial = {"lr_head": 1e-3, "threads": 1, "num_workers": 0, "cpu": True, "compile": True,
             "output_root": "/elsewhere", "run_name": "t001", "resume": True}
    config = final_config(trial, search_dir=tmp_path, name="final", epochs=2, devices={"threads": 3})
    assert (config.lr_head, config.compile, config.epochs) == (1e-3, True, 2)
    assert (config.threads, config.num_workers, config.cpu) == (3, TrainConfig().num_workers, False)
    assert (config.output_root, config.run_name, config.resume) == (str(tmp_path), "final", False)


def test_a_search_makes_every_path_setting_absolute(tmp_path):
    space_file = tmp_path / "s.yaml"
    space_file.write_text("trainer: {train_csv: a.csv, val_csv: b.csv, feature_cache_dir: cache, "
                          "vmae_variant: tiny}\nsearch: {lr_head: {loguniform: [1.0e-4, 1.0e-2]}}\n")
    space = absolute_paths(load_space(str(space_file)), tmp_path / "here")
    for key in ("train_csv", "val_csv", "feature_cache_dir", "checkpoint_root"):
        assert Path(space.trainer[key]).is_absolute(), key
    assert space.trainer["feature_cache_dir"] == str(tmp_path / "here" / "cache")


def test_videomae_checkpoint_folders(tmp_path):
    assert published_folder("base", tmp_path) == tmp_path / "VideoMAEv2-Base"
    assert published_folder("giant", "ck") == Path("ck") / "VideoMAEv2-giant"
    assert published_folder("tiny", tmp_path) is None       # random weights: no files


def test_feature_cache_default_folder(tmp_path):
    assert cache_dir(TrainConfig(output_root=str(tmp_path))) == tmp_path / "feature_cache"
    assert cache_dir(TrainConfig(output_root="x", feature_cache_dir=str(tmp_path))) == tmp_path
