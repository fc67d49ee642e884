"""Every shipped search space runs: its trials' configs, as its sampler draws them (with the
tiny backbones on the tiny dataset, one epoch), train in a real trainer, so the recipe keys it
searches (e.g. vmae_full's layer_decay, drop_path, weight_decay and model_ema) reach one. The
search machinery around a trial is tested on its own (test_search.py, test_journey.py); here a
trial is trained in-process, which keeps seven spaces within seconds each."""
from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
import torch

from headernet_core.backbones import create_backbone
from headernet_core.trainer import train
from tuning.space import load_space

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))


def tiny_csn_checkpoint(path: Path) -> Path:
    """An mmaction2-style ir-CSN file of the tiny architecture (stands in for IG65M weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = create_backbone("csn", "tiny")
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize("space", SPACES)
def test_shipped_space_trains_its_sampled_trials(space, tiny_data, tmp_path):
    sets = {"train_csv": tiny_data["train_csv"], "val_csv": tiny_data["val_csv"],
            "vmae_variant": "tiny", "csn_variant": "tiny", "num_frames": 4, "input_size": 32,
            "batch_size": 4, "grad_accum": 1, "gradient_checkpointing": "false", "epochs": 1,
            "cpu": "true", "num_workers": 0, "progress": "false", "plots": "false",
            "tensorboard": "false", "output_root": tmp_path / "runs", "scheduler.type": "none",
            "resources.gpu": 0}
    if space == "csn_ig65m":
        sets["backbone_ckpt"] = tiny_csn_checkpoint(tmp_path / "ircsn_tiny.pth")
    loaded = load_space(space, sets=[f"{key}={value}" for key, value in sets.items()])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for index in range(2):
        trial = study.ask()
        loaded.define_by_run(trial)
        config = loaded.trial_config(trial.params).replace(run_name=f"t{index}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # tiny random backbones, settings a choice ignores
            result = train(config, log=lambda _: None)
        assert result.epochs_done == 1 and (result.run_dir / "metrics_epoch.csv").is_file(), trial.params
