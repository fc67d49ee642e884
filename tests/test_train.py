"""The training loop end to end on tiny CPU runs: artifacts, resume, stop, safety of run folders."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from headernet_core.evaluation import evaluate, load_classifier
from headernet_core.errors import HeaderNetError
from headernet_core.config import TrainConfig
from headernet_core.metrics import MEASURED_METRICS
from headernet_core.trainer import LEADING_COLUMNS, main, prepare, train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("backbone", ["vmae", "csn"])
def test_run_writes_every_artifact(tiny_config, backbone):
    config = tiny_config(backbone=backbone, plots=True, tensorboard=True)
    result = train(config, log=lambda _: None)
    run = result.run_dir
    assert result.status == "finished" and result.epochs_done == 2

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["backbone"] == backbone and saved["lr_head"] == 1e-3 and saved["input_size"] == 32
    metrics = pd.read_csv(run / "metrics_epoch.csv")
    assert tuple(metrics.columns[:len(LEADING_COLUMNS)]) == LEADING_COLUMNS
    assert list(metrics["epoch"]) == [1, 2]
    for column in ("val_auc", "val_ap", "val_threshold", "val_f1_05", "val_weighted_f1",
                   "train_acc", "clips_per_s", "epoch_seconds"):
        assert column in metrics

    best = json.loads((run / "best_metrics.json").read_text())
    assert best["epoch"] == result.best_epoch
    assert best["checkpoint"] == f"checkpoints/best_epoch_{result.best_epoch}.pt"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        sorted([f"best_epoch_{result.best_epoch}.pt", "last.pt"])

    predictions = pd.read_csv(run / "val_predictions.csv")
    assert list(predictions.columns) == ["video_id", "path", "label", "prob_header",
                                         "prob_non_header", "pred_label", "half", "frame"]
    assert len(predictions) == 9
    np.testing.assert_allclose(predictions.prob_header + predictions.prob_non_header, 1.0, atol=1e-6)

    payload = torch.load(run / best["checkpoint"], weights_only=True)
    assert payload["epoch"] == result.best_epoch and payload["config"]["backbone"] == backbone
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "scaler", "rng", "history"} <= set(last)
    assert {p.name for p in (run / "plots").iterdir()} >= {"loss.png", "metrics.png"}
    assert any((run / "tb").iterdir())
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


def test_evaluate_reproduces_the_best_epoch(tiny_config, tiny_data):
    result = train(tiny_config(), log=lambda _: None)
    metrics, predictions = evaluate(result.best_checkpoint, tiny_data["val_csv"])
    for key in ("val_auc", "val_f1", "val_loss", "val_acc"):
        assert metrics[key] == pytest.approx(result.best_metrics[key], abs=1e-6, nan_ok=True)
    saved = pd.read_csv(result.run_dir / "val_predictions.csv")
    np.testing.assert_allclose(predictions.prob_header, saved.prob_header, atol=1e-6)


def test_resume_equals_uninterrupted(tiny_config):
    straight = train(tiny_config(epochs=3, run_name="straight"), log=lambda _: None)

    stopped = train(tiny_config(epochs=3, run_name="split"), on_epoch=lambda r: r.epoch == 2,
                    log=lambda _: None)
    assert stopped.status == "stopped" and stopped.epochs_done == 2
    stopped.run_dir.rename(stopped.run_dir.with_name("moved"))   # a run folder renamed meanwhile
    resumed = train(tiny_config(epochs=3, run_name="moved", resume=True), log=lambda _: None)
    assert resumed.status == "finished" and resumed.epochs_done == 3

    a = pd.read_csv(straight.run_dir / "metrics_epoch.csv")
    b = pd.read_csv(resumed.run_dir / "metrics_epoch.csv")
    measured = list(MEASURED_METRICS)   # wall time and the process's peak memory differ run to run
    pd.testing.assert_frame_equal(a.drop(columns=measured), b.drop(columns=measured), atol=1e-6)
    wa = torch.load(straight.run_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)["state_dict"]
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)


def test_on_epoch_receives_reports_and_can_stop(tiny_config):
    seen = []
    result = train(tiny_config(epochs=3), on_epoch=lambda r: seen.append(r) or True,
                   log=lambda _: None)
    assert [r.epoch for r in seen] == [1]
    assert seen[0].metrics["epoch"] == 1 and seen[0].last_checkpoint.is_file()
    assert result.status == "stopped"


@pytest.mark.parametrize("raised_at, exc, status", [
    (2, SystemExit(0), "finished"),      # Ray ends the process in the last epoch's report
    (1, SystemExit(0), "stopped"),       # ASHA stops the trial after epoch 1
    (1, RuntimeError("boom"), "failed"),
    (2, RuntimeError("boom"), "finished"),   # everything of the last epoch was written
])
def test_status_when_the_callback_ends_the_run(tiny_config, raised_at, exc, status):
    def on_epoch(report):
        if report.epoch == raised_at:
            raise exc
    config = tiny_config(epochs=2, run_name=f"cb_{raised_at}_{status}")
    with pytest.raises(type(exc)):
        train(config, on_epoch=on_epoch, log=lambda _: None)
    record = json.loads((Path(config.output_root) / config.run_name / "status.json").read_text())
    assert (record["state"], record["epochs_done"]) == (status, raised_at)


def test_existing_run_is_protected(tiny_config):
    train(tiny_config(epochs=1), log=lambda _: None)
    with pytest.raises(HeaderNetError, match="already exists"):
        train(tiny_config(epochs=1), log=lambda _: None)
    with pytest.raises(HeaderNetError, match="finished run and is never overwritten"):
        train(tiny_config(epochs=1, overwrite=True), log=lambda _: None)


def test_a_run_that_ended_before_its_first_epoch_starts_again_on_resume_or_overwrite(tiny_config):
    """No last.pt: a plain start points to --resume (its config.yaml, e.g. a micro-batch halved
    under DDP) and --overwrite (these settings); either starts it from its beginning. A finished
    run that lost its last.pt is not started again."""
    config = tiny_config(epochs=1)
    for name in ("again", "over"):
        run_dir = Path(config.output_root) / name
        run_dir.mkdir(parents=True)
        (run_dir / "status.json").write_text('{"state": "failed", "epochs_done": 0}')
    with pytest.raises(HeaderNetError, match="--resume to start it again with its config.yaml, or --overwrite"):
        train(config.replace(run_name="again"), log=lambda _: None)
    with pytest.raises(HeaderNetError, match="no such run folder"):
        train(config.replace(resume=True, run_name="never_ran"), log=lambda _: None)
    lines: list[str] = []
    resumed = train(config.replace(run_name="again", resume=True), log=lines.append)
    assert resumed.status == "finished" and resumed.epochs_done == 1
    assert any("no epoch was completed, so it starts again from epoch 1" in line for line in lines), lines
    assert train(config.replace(run_name="over", overwrite=True), log=lambda _: None).status == "finished"
    (resumed.run_dir / "checkpoints" / "last.pt").unlink()
    with pytest.raises(HeaderNetError, match="finished run without checkpoints/last.pt"):
        train(config.replace(run_name="again", resume=True), log=lambda _: None)


def test_overwrite_replaces_an_unfinished_run(tiny_config):
    train(tiny_config(epochs=3), on_epoch=lambda r: True, log=lambda _: None)
    result = train(tiny_config(epochs=1, overwrite=True), log=lambda _: None)
    assert result.status == "finished"
    assert len(pd.read_csv(result.run_dir / "metrics_epoch.csv")) == 1
    first_row = (result.run_dir / "metrics_epoch.csv").read_text().splitlines()[1]
    assert first_row.startswith("1,"), first_row  # epochs are integers, not 1.0


def test_resume_of_a_finished_run_can_extend_it(tiny_config):
    train(tiny_config(epochs=1), log=lambda _: None)
    result = train(tiny_config(epochs=2, resume=True), log=lambda _: None)
    assert result.epochs_done == 2
    assert list(pd.read_csv(result.run_dir / "metrics_epoch.csv")["epoch"]) == [1, 2]


def test_resume_refuses_changed_settings(tiny_config):
    train(tiny_config(epochs=2), on_epoch=lambda r: True, log=lambda _: None)
    with pytest.raises(HeaderNetError, match="lr_head"):
        train(tiny_config(epochs=2, resume=True, lr_head=5e-3), log=lambda _: None)


def test_frozen_backbone_does_not_change(tiny_config):
    result = train(tiny_config(finetune_mode="frozen", epochs=1, run_name="frozen"), log=lambda _: None)
    model, _, _ = load_classifier(result.run_dir / "checkpoints" / "last.pt")
    torch.manual_seed(tiny_config().seed)
    from headernet_core.backbones import create_backbone
    fresh, _ = create_backbone("vmae", "tiny")
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["lr_backbone"] is None  # a frozen backbone has no learning rate


def test_csn_partial_keeps_frozen_batchnorm_statistics(tiny_config):
    result = train(tiny_config(backbone="csn", finetune_mode="partial", unfreeze_blocks=1,
                               epochs=1, lr_backbone=1e-3), log=lambda _: None)
    model, _, _ = load_classifier(result.best_checkpoint)
    torch.manual_seed(tiny_config().seed)
    from headernet_core.backbones import create_backbone
    fresh, _ = create_backbone("csn", "tiny")
    trained, initial = model.backbone.state_dict(), fresh.state_dict()
    assert torch.equal(trained["conv1.bn.running_mean"], initial["conv1.bn.running_mean"])
    last_block = [k for k in trained if k.startswith("layer4.") and k.endswith("conv1.conv.weight")][0]
    assert not torch.equal(trained[last_block], initial[last_block])


# --- the CLI ------------------------------------------------------------------------------
def cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def test_cli_runs_and_config_yaml_reruns(tiny_data, tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["--train_csv", str(tiny_data["train_csv"]), "--val_csv", str(tiny_data["val_csv"]),
            "--vmae_variant", "tiny", "--num_frames", "4", "--input_size", "32", "--epochs", "1",
            "--batch_size", "4", "--num_workers", "0", "--no-progress", "--no-plots",
            "--no-tensorboard", "--output_root", str(out), "--run_name", "first",
            "--gradient_accumulation_steps", "2", "--layer_lr_decay", "0.75"]
    main(base)
    saved = yaml.safe_load((out / "first" / "config.yaml").read_text())
    assert saved["grad_accum"] == 2 and saved["layer_decay"] == 0.75
    main(["--config", str(out / "first" / "config.yaml"), "--run_name", "second"])
    again = yaml.safe_load((out / "second" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k != "run_name"} == \
        {k: v for k, v in saved.items() if k != "run_name"}
    main(["--output_root", str(out), "--run_name", "first", "--resume", "--epochs", "2"])
    resumed = pd.read_csv(out / "first" / "metrics_epoch.csv")
    assert list(resumed["epoch"]) == [1, 2]
    assert yaml.safe_load((out / "first" / "config.yaml").read_text())["epochs"] == 2


def test_cli_bad_input_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "headernet_core.train", "--train_csv",
                             str(tmp_path / "missing.csv"), "--val_csv", str(tmp_path / "v.csv"),
                             "--output_root", str(tmp_path / "runs"), "--run_name", "x"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.csv" in lines[0]
    assert not (tmp_path / "runs").exists()


def _write_csv(path: Path, rows: list[dict]) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def _bad_inputs(tiny_data, tmp_path) -> list[tuple[list[str], str]]:
    """(extra CLI args, expected message fragment) for every bad input of the issue's §5."""
    clips = tiny_data["root"] / "clips"
    good = pd.read_csv(tiny_data["train_csv"])
    no_label = _write_csv(tmp_path / "nolabel.csv", [{"path": p} for p in good.path])
    (tmp_path / "clips").symlink_to(clips)
    bad_label = _write_csv(tmp_path / "badlabel.csv", [{"path": good.path[0], "label": 2}])
    only_neg = _write_csv(tmp_path / "onlyneg.csv", [{"path": p, "label": 0} for p in good.path])
    only_pos = _write_csv(tmp_path / "onlypos.csv", [{"path": p, "label": 1} for p in good.path])
    missing = _write_csv(tmp_path / "missing.csv",
                         [{"path": f"clips/nope_{i}", "label": i % 2} for i in range(7)])
    np.save(tmp_path / "clips_bad_ndim_s.npy", np.zeros((4, 32, 32), np.uint8))
    np.save(tmp_path / "clips_bad_ch_s.npy", np.zeros((4, 32, 32, 4), np.uint8))
    np.save(tmp_path / "clips_bad_dtype_s.npy", np.zeros((4, 32, 32, 3), np.float32))
    bad_clip = {name: _write_csv(tmp_path / f"{name}.csv", [
        {"path": f"clips_{name}", "label": 1}, *[{"path": p, "label": 0} for p in good.path[:3]]])
        for name in ("bad_ndim", "bad_ch", "bad_dtype")}
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    corrupt = tmp_path / "corrupt_vmae"
    corrupt.mkdir()
    shutil.copy(FIXTURE_VMAE / "config.json", corrupt / "config.json")  # valid config, bad weights
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    shapes = tmp_path / "shapes_vmae"
    shapes.mkdir()
    fixture_cfg = json.loads((FIXTURE_VMAE / "config.json").read_text())
    cases = [
        (["--train_csv", str(tmp_path / "nope.csv")], "nope.csv"),
        (["--train_csv", no_label], "label"),
        (["--train_csv", bad_label], "2"),
        (["--train_csv", only_neg], "no positive clips"),
        (["--train_csv", only_pos], "no negative clips"),
        (["--train_csv", missing], "7 of 7 clips not found"),
        (["--train_csv", bad_clip["bad_ndim"]], "clips_bad_ndim"),
        (["--train_csv", bad_clip["bad_ch"]], "clips_bad_ch"),
        (["--train_csv", bad_clip["bad_dtype"]], "clips_bad_dtype"),
        (["--val_csv", str(empty)], "empty.csv"),
        (["--backbone", "resnet"], "--backbone"),
        (["--vmae_variant", "huge"], "--vmae_variant"),
        (["--backbone", "csn", "--csn_variant", "34"], "--csn_variant"),
        (["--num_frames", "7.5"], "--num_frames"),
        (["--no_such_flag", "1"], "--no_such_flag"),
        (["--input_size", "30"], "multiple of the VideoMAE patch size"),
        (["--vmae_variant", "base", "--checkpoint_root", str(tmp_path / "ckpts")], "VideoMAEv2-Base"),
        (["--backbone_ckpt", str(tmp_path / "no_such_folder")], "no_such_folder"),
        (["--backbone", "csn", "--backbone_ckpt", str(tmp_path / "no_such.pth")], "no_such.pth"),
        (["--backbone_ckpt", str(corrupt)], "cannot read safetensors"),
        (["--gpus", "7"], "--gpus"),
        (["--batch_size", "0"], "--batch_size"),
        (["--epochs", "-1"], "--epochs"),
        (["--num_frames", "0"], "--num_frames"),
        (["--num_frames", "5"], "multiple of the VideoMAE tubelet size"),
    ]
    shutil.copy(FIXTURE_VMAE / "model.safetensors", shapes / "model.safetensors")
    fixture_cfg["model_config"]["embed_dim"] = 48  # the weights no longer fit their config
    (shapes / "config.json").write_text(json.dumps(fixture_cfg))
    cases.append((["--backbone_ckpt", str(shapes)], "shapes_vmae"))
    return cases


FIXTURE_VMAE = Path(__file__).resolve().parent / "data" / "vmae_tiny"


def test_every_bad_input_is_one_clear_line_and_writes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "runs"
    base = {"--train_csv": str(tiny_data["train_csv"]), "--val_csv": str(tiny_data["val_csv"]),
            "--vmae_variant": "tiny", "--num_frames": "4", "--input_size": "32", "--epochs": "1",
            "--num_workers": "0", "--output_root": str(out), "--run_name": "bad", "--cpu": None}
    failures = []
    for extra, fragment in _bad_inputs(tiny_data, tmp_path):
        args = dict(base)
        if "--gpus" in extra:
            args.pop("--cpu")
        it = iter(extra)
        for flag in it:
            args[flag] = next(it)
        argv = [x for k, v in args.items() for x in ([k] if v is None else [k, v])]
        code, err = cli(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line and "warn" not in line]
        ok = code == 2 and len(lines) == 1 and fragment in lines[0] and "Traceback" not in err
        if not ok:
            failures.append(f"{extra}: code {code}, stderr {err!r}")
        assert not out.exists(), f"{extra} wrote {list(out.rglob('*'))}"
    assert not failures, "\n".join(failures)


def test_settings_a_frozen_backbone_ignores_are_warned_about(tiny_config):
    for flags, fragment in (({"layer_decay": 0.75}, "--layer_decay 0.75 has no effect"),
                            ({"gradient_checkpointing": True}, "--gradient_checkpointing has no effect")):
        with pytest.warns(UserWarning, match=fragment):
            prepare(tiny_config(finetune_mode="frozen", **flags))


def test_clip_geometry_is_checked_before_the_weights_are_loaded(tiny_config, monkeypatch):
    """A folder checkpoint's config.json says the tubelet and patch sizes: a --num_frames that
    cannot fit fails before a (possibly multi-GB) model.safetensors is read."""
    import headernet_core.backbones.videomae as videomae

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the geometry check")
    monkeypatch.setattr(videomae, "load_safetensors", must_not_load)
    for flags, fragment in (({"num_frames": 5}, "tubelet size 2"), ({"input_size": 30}, "patch size")):
        with pytest.raises(HeaderNetError, match=fragment):
            prepare(tiny_config(backbone_ckpt=str(FIXTURE_VMAE), **flags))


@pytest.mark.parametrize("key, optional", [("epochs", False), ("focal_alpha", False), ("betas", False),
                                           ("backbone", False), ("lr_head", True), ("threads", True)])
def test_none_is_refused_in_a_required_setting(key, optional):
    """From Python, `TrainConfig(epochs=None)` (or betas, which no range covers) is one clear
    error at validate(), not a TypeError later; an optional setting's None means unset."""
    config = TrainConfig(train_csv="t.csv", val_csv="v.csv").replace(**{key: None})
    if optional:
        config.validate(need_data=False)
    else:
        with pytest.raises(HeaderNetError, match=f"--{key} must be set, got None"):
            config.validate(need_data=False)
