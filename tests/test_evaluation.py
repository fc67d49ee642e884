"""Evaluate and predict: the checkpoint's validation threshold, test-time views, the per-match
error table, and predictions on clips without labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from headernet_core import checkpoints
from headernet_core.config import TrainConfig
from headernet_core.data import ClipDataset, ClipTransform, sample_frame_indices
from headernet_core.evaluation import (View, ViewDataset, checkpoint_threshold, evaluate, main,
                                       per_video_errors, view_frame_indices)
from headernet_core.prediction import main as predict_main
from headernet_core.prediction import predict
from headernet_core.trainer import train


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A tiny CSN run whose best epoch is not its last (so best and last thresholds differ)."""
    out = tmp_path_factory.mktemp("eval_runs")
    config = TrainConfig(train_csv=str(tiny_data["train_csv"]), val_csv=str(tiny_data["val_csv"]),
                         backbone="csn", csn_variant="tiny", num_frames=4, input_size=32,
                         batch_size=4, epochs=2, lr_backbone=1e-3, num_workers=0, cpu=True,
                         progress=False, plots=False, tensorboard=False, output_root=str(out),
                         run_name="run", warmup_epochs=0.5)
    torch.manual_seed(0)
    result = train(config, log=lambda _: None)
    return result


def test_the_default_threshold_is_the_validation_one_stored_in_the_checkpoint(trained, tiny_data):
    best = json.loads((trained.run_dir / "best_metrics.json").read_text())
    payload = checkpoints.load(trained.best_checkpoint)
    assert checkpoint_threshold(payload) == pytest.approx(best["val_threshold"])
    last = checkpoints.load(trained.run_dir / "checkpoints" / "last.pt")
    assert checkpoint_threshold(last) == pytest.approx(last["history"][-1]["val_threshold"])

    metrics, predictions = evaluate(trained.best_checkpoint, tiny_data["val_csv"])
    assert metrics["threshold"] == pytest.approx(best["val_threshold"])
    assert metrics["threshold_source"].startswith("validation")
    # one view is the trainer's own validation: its numbers come back exactly
    for key in ("val_f1", "val_auc", "val_loss", "val_threshold"):
        assert metrics[key] == pytest.approx(best[key], abs=1e-6), key
    expected = (predictions["prob_header"] >= metrics["threshold"]).astype(int)
    assert (predictions["pred_label"] == expected).all()
    assert metrics["tp"] + metrics["fn"] == predictions["label"].sum()
    assert metrics["tp"] == int(((expected == 1) & (predictions["label"] == 1)).sum())

    # a given threshold is used as is
    metrics, predictions = evaluate(trained.best_checkpoint, tiny_data["val_csv"], threshold=1.0)
    assert metrics["threshold_source"] == "given" and metrics["tp"] + metrics["fp"] == \
        int((predictions["prob_header"] >= 1.0).sum())


def test_temporal_views_shift_the_sampled_frames():
    # 16 frames, 4 sampled: the trainer takes 0 5 10 15 (spacing 5)
    assert view_frame_indices(16, 4, View()).tolist() == [0, 5, 10, 15]
    assert view_frame_indices(16, 4, View(0, 2)).tolist() == [0, 4, 9, 14]   # -1.25
    assert view_frame_indices(16, 4, View(1, 2)).tolist() == [1, 6, 11, 15]  # +1.25, kept inside
    assert view_frame_indices(16, 4, View(1, 3)).tolist() == [0, 5, 10, 15]  # the middle view
    for frames in (16, 15):   # one frame: the middle view is the trainer's centre frame too
        middle = view_frame_indices(frames, 1, View(1, 3)).tolist()
        assert middle == sample_frame_indices(frames, 1).tolist() == [(frames - 1) // 2]
    for count in (1, 3, 5):   # View.is_trainers: exactly the views that reuse the trainer's pass
        for t in range(count):
            same = view_frame_indices(16, 4, View(t, count)).tolist() == [0, 5, 10, 15]
            assert View(t, count).is_trainers == (t == count // 2) and (t != count // 2 or same)
    assert not View(0, 1, spatial=1).is_trainers


def test_spatial_views_are_the_frame_its_flip_and_the_centre_crop(tmp_path):
    """What the loader reads for each spatial view (the device resizes, and mirrors view 1)."""
    clip = np.random.default_rng(0).integers(0, 255, size=(6, 10, 12, 3), dtype=np.uint8)
    np.save(tmp_path / "c.npy", clip)
    base = ClipDataset([str(tmp_path / "c.npy")], [1], ClipTransform(num_frames=6, size=8, train=False))

    def read(spatial: int):
        batch = ViewDataset(base, View(spatial=spatial), 0.8).read_batch([0])
        height, width, flip = (int(v) for v in batch.aug[0, :3])
        return batch.frames[0, :, :height, :width].numpy(), flip

    assert all(np.array_equal(frames, clip) and flip == f for (frames, flip), f
               in ((read(0), 0), (read(1), 1)))
    crop, flip = read(2)   # side 8 of 10, centred
    assert np.array_equal(crop, clip[:, 1:9, 2:10]) and flip == 0


def test_views_average_the_probabilities_of_each_view(trained, tiny_data, tmp_path, monkeypatch):
    """--spatial_views 2 is the mean of the clip and its mirror image: check it against the
    same model on physically flipped copies of the clips."""
    val = pd.read_csv(tiny_data["val_csv"])
    flipped = val.copy()
    (tmp_path / "clips").mkdir()
    for i, path in enumerate(val["path"]):
        clip = np.load(tiny_data["root"] / f"{path}_s.npy")
        np.save(tmp_path / "clips" / f"f{i}.npy", clip[:, :, ::-1])
        flipped.loc[i, "path"] = f"clips/f{i}.npy"
    flipped.to_csv(tmp_path / "flipped.csv", index=False)
    _, plain = evaluate(trained.best_checkpoint, tiny_data["val_csv"])
    _, mirror = evaluate(trained.best_checkpoint, tmp_path / "flipped.csv")
    import headernet_core.evaluation as evaluation
    passes = []
    real_predict = evaluation.predict

    def counted(*args, **kwargs):
        passes.append(1)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict", counted)
    metrics, both = evaluate(trained.best_checkpoint, tiny_data["val_csv"], spatial_views=2)
    assert metrics["views"] == 2 and len(passes) == 2   # the plain view is not computed twice
    np.testing.assert_allclose(both["prob_header"], (plain["prob_header"] + mirror["prob_header"]) / 2,
                               atol=1e-6)
    passes.clear()
    metrics, _ = evaluate(trained.best_checkpoint, tiny_data["val_csv"], views=2, spatial_views=3)
    assert metrics["views"] == 6 and 0 <= metrics["f1"] <= 1 and len(passes) == 6  # one per view
    passes.clear()
    metrics, three = evaluate(trained.best_checkpoint, tiny_data["val_csv"], views=3)
    assert metrics["views"] == 3 and len(passes) == 3   # the middle view is the trainer's pass

def test_per_video_table_counts_each_matchs_errors():
    predictions = pd.DataFrame({"video_id": ["a", "a", "b", "b", "b"], "label": [1, 0, 1, 1, 0],
                                "pred_label": [0, 0, 1, 0, 1]})
    table = per_video_errors(predictions)
    assert table["video_id"].tolist() == ["b", "a"]    # most errors first
    b = table.iloc[0]
    assert (b["clips"], b["headers"], b["predicted"], b["false_alarms"], b["missed"], b["errors"]) == \
        (3, 2, 2, 1, 1, 2)
    assert b["error_rate"] == pytest.approx(2 / 3)


def test_evaluate_cli_writes_metrics_predictions_and_the_per_video_table(trained, tiny_data, tmp_path, capsys):
    main(["--checkpoint", str(trained.best_checkpoint), "--val_csv", str(tiny_data["val_csv"]),
          "--metrics", str(tmp_path / "m.json"), "--predictions", str(tmp_path / "p.csv"),
          "--per_video", str(tmp_path / "v.csv"), "--views", "2"])
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["views"] == 2 and "errors per video_id" in out and "at threshold" in out
    per_video = pd.read_csv(tmp_path / "v.csv")
    assert per_video["clips"].sum() == len(pd.read_csv(tmp_path / "p.csv"))
    assert per_video["errors"].sum() == metrics["fp"] + metrics["fn"]


@pytest.mark.parametrize("args, fragment", [
    (["--threshold", "1.5"], "--threshold must be between 0 and 1"),
    (["--views", "0"], "--views must be a positive integer"),
    (["--spatial_views", "4"], "--spatial_views must be 1"),
])
def test_bad_evaluate_flags_are_one_line(trained, tiny_data, tmp_path, capsys, args, fragment):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(trained.best_checkpoint), "--val_csv", str(tiny_data["val_csv"]),
              "--metrics", str(tmp_path / "m.json"), *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "m.json").exists()


def test_predict_on_a_csv_without_labels_and_on_a_folder(trained, tiny_data, tmp_path):
    _, reference = evaluate(trained.best_checkpoint, tiny_data["val_csv"])
    val = pd.read_csv(tiny_data["val_csv"]).drop(columns="label")
    val["path"] = [str(tiny_data["root"] / p) for p in val["path"]]
    val.to_csv(tmp_path / "unlabelled.csv", index=False)
    from_csv = predict(trained.best_checkpoint, tmp_path / "unlabelled.csv")
    assert "label" not in from_csv and list(from_csv["video_id"]) == list(val["video_id"])
    np.testing.assert_allclose(from_csv["prob_header"], reference["prob_header"], atol=1e-6)
    assert (from_csv["pred_label"] == reference["pred_label"]).all()   # the stored threshold

    folder = tmp_path / "folder"
    folder.mkdir()
    for p in pd.read_csv(tiny_data["val_csv"])["path"]:
        (folder / f"{Path(p).name}.npy").write_bytes((tiny_data["root"] / f"{p}_s.npy").read_bytes())
    predict_main(["--checkpoint", str(trained.best_checkpoint), "--clips", str(folder),
                  "--output", str(tmp_path / "out.csv"), "--views", "2"])
    from_folder = pd.read_csv(tmp_path / "out.csv")
    assert len(from_folder) == len(val) and set(from_folder.columns) == {"path", "prob_header", "pred_label"}


def test_predict_bad_input_is_one_line(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for clips, fragment in ((tmp_path / "empty", "no .npy clips"), (tmp_path / "nope", "no such CSV or folder")):
        with pytest.raises(SystemExit) as exc:
            predict_main(["--checkpoint", str(trained.best_checkpoint), "--clips", str(clips),
                          "--output", str(tmp_path / "o.csv")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("settings, fragment", [
    ({"num_workers": -1}, "--num_workers must be in"),
    ({"batch_size": 0}, "--batch_size must be a positive integer"),
    ({"threshold": 1.5}, "--threshold must be between 0 and 1"),
])
def test_the_python_api_checks_like_the_clis(trained, tiny_data, settings, fragment):
    """evaluate() and predict() check their numbers themselves, not only their CLIs."""
    from headernet_core.errors import HeaderNetError

    for call in (evaluate, predict):
        with pytest.raises(HeaderNetError, match=fragment):
            call(trained.best_checkpoint, tiny_data["val_csv"], **settings)
