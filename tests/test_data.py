"""headernet_core.data: CSV validation, path resolution, clip checks, sampling, augmentation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from headernet_core.config import TrainConfig
from headernet_core.data import (
    BatchLoader,
    ClipDataset,
    ClipTransform,
    EpochSampler,
    check_clips,
    check_has_both_classes,
    epoch_indices,
    load_clip_frames,
    read_split,
    sample_frame_indices,
)
from headernet_core.errors import HeaderNetError


# --- helpers ------------------------------------------------------------------------------
def save_clip(path: Path, frames: int = 8, side: int = 16, seed: int = 0, grey: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    channels = 1 if grey else 3
    clip = rng.integers(0, 256, size=(frames, side, side, channels), dtype=np.uint8)
    if grey:
        clip = np.repeat(clip, 3, axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, clip)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- path resolution ----------------------------------------------------------------------
def test_path_as_written_absolute_npy(tmp_path):
    clip = save_clip(tmp_path / "clips" / "a.npy")
    csv = write_csv(tmp_path / "csv" / "train.csv", [{"path": str(clip), "label": 1}])
    df = read_split(csv, "train")
    assert df["clip_path"].tolist() == [str(clip)]


def test_path_relative_to_working_directory_wins_over_csv_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    in_cwd = save_clip(tmp_path / "clips" / "a_s.npy")
    save_clip(tmp_path / "csv" / "clips" / "a_s.npy")  # same relative path under the CSV folder
    csv = write_csv(tmp_path / "csv" / "train.csv", [{"path": "clips/a", "label": 0}])
    df = read_split(csv, "train")
    assert df["clip_path"].tolist() == [str(in_cwd)]
    assert Path(df["clip_path"][0]).is_absolute()


def test_path_relative_to_csv_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clip = save_clip(tmp_path / "data" / "clips" / "a.npy")
    csv = write_csv(tmp_path / "data" / "train.csv", [{"path": "clips/a.npy", "label": 0}])
    assert read_split(csv, "train")["clip_path"].tolist() == [str(clip)]


def test_upstream_s_suffix_preferred_then_plain_npy(tmp_path):
    s_clip = save_clip(tmp_path / "x_s.npy")
    save_clip(tmp_path / "x.npy")
    plain = save_clip(tmp_path / "y.npy")
    csv = write_csv(tmp_path / "train.csv", [{"path": str(tmp_path / "x"), "label": 1},
                                             {"path": str(tmp_path / "y"), "label": 0}])
    assert read_split(csv, "train")["clip_path"].tolist() == [str(s_clip), str(plain)]


def test_basename_fallback_for_paths_of_another_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clip = save_clip(tmp_path / "elsewhere" / "game_half1_000123_1_s.npy")
    csv = write_csv(tmp_path / "elsewhere" / "train.csv",
                    [{"path": "/scratch/other/cache/game_half1_000123_1", "label": 1, "video_id": "g",
                      "half": 1, "frame": 123}])
    df = read_split(csv, "train")
    assert df["clip_path"].tolist() == [str(clip)]
    # extra columns are kept with their types, label is an int
    assert df.loc[0, "video_id"] == "g" and df.loc[0, "frame"] == 123
    assert df["label"].dtype == np.int64


def test_missing_clips_one_error_with_count_and_first_five(tmp_path):
    save_clip(tmp_path / "ok_s.npy")
    rows = [{"path": str(tmp_path / "ok"), "label": 1}]
    rows += [{"path": f"missing/m{i}", "label": 0} for i in range(7)]
    csv = write_csv(tmp_path / "val.csv", rows)
    with pytest.raises(HeaderNetError) as excinfo:
        read_split(csv, "val")
    message = one_line_error(excinfo)
    assert message.startswith(f"{csv}: 7 of 8 clips not found, e.g. missing/m0, missing/m1, "
                              "missing/m2, missing/m3, missing/m4")
    assert "m5" not in message


# --- CSV validation -----------------------------------------------------------------------
@pytest.mark.parametrize("value", ["2", "yes", "0.5", "", "-1"])
def test_bad_label_names_csv_row_and_value(tmp_path, value):
    save_clip(tmp_path / "a_s.npy")
    csv = tmp_path / "train.csv"
    csv.write_text(f"path,label\n{tmp_path / 'a'},1\n{tmp_path / 'a'},{value}\n")
    with pytest.raises(HeaderNetError) as excinfo:
        read_split(csv, "train")
    assert one_line_error(excinfo) == f"{csv}: row 3: label must be 0 or 1, got {value!r}"


def test_integral_float_labels_are_accepted(tmp_path):
    save_clip(tmp_path / "a_s.npy")
    csv = tmp_path / "train.csv"
    csv.write_text(f"path,label\n{tmp_path / 'a'},1.0\n{tmp_path / 'a'},0\n")
    assert read_split(csv, "train")["label"].tolist() == [1, 0]


@pytest.mark.parametrize("text, expected", [
    ("path,frame\na,1\n", "missing column(s) label; expected path,label"),
    ("clip,label\na,1\n", "missing column(s) path; expected path,label"),
    ("", "train CSV is empty"),
    ("path,label\n", "train CSV has a header but no rows"),
    ("path,label\n,1\n", "row 2: path is empty"),
])
def test_bad_csv_files(tmp_path, text, expected):
    csv = tmp_path / "train.csv"
    csv.write_text(text)
    with pytest.raises(HeaderNetError) as excinfo:
        read_split(csv, "train")
    message = one_line_error(excinfo)
    assert message.startswith(f"{csv}: ") and expected in message


def test_missing_csv_names_the_flag(tmp_path):
    with pytest.raises(HeaderNetError, match=r"val CSV not found \(--val_csv\)"):
        read_split(tmp_path / "nope.csv", "val")


def test_check_has_both_classes(tmp_path):
    check_has_both_classes(pd.DataFrame({"label": [0, 1]}), "t.csv")
    with pytest.raises(HeaderNetError, match="t.csv: no positive clips"):
        check_has_both_classes(pd.DataFrame({"label": [0, 0]}), "t.csv")
    with pytest.raises(HeaderNetError, match="t.csv: no negative clips"):
        check_has_both_classes(pd.DataFrame({"label": [1]}), "t.csv")


# --- clip checks --------------------------------------------------------------------------
def _bad_clip_cases(tmp_path: Path) -> list[tuple[Path, str]]:
    cases = {
        "ndim.npy": (np.zeros((4, 8, 8), np.uint8), "has shape (4, 8, 8); expected (T, H, W, 3)"),
        "channels.npy": (np.zeros((4, 8, 8, 4), np.uint8), "has shape (4, 8, 8, 4); expected (T, H, W, 3)"),
        "dtype.npy": (np.zeros((4, 8, 8, 3), np.float32), "has dtype float32; expected uint8"),
        "empty.npy": (np.zeros((0, 8, 8, 3), np.uint8), "has 0 frames"),
    }
    out = []
    for name, (array, expected) in cases.items():
        np.save(tmp_path / name, array)
        out.append((tmp_path / name, expected))
    (tmp_path / "text.npy").write_text("not numpy")
    out.append((tmp_path / "text.npy", "is not a valid .npy file"))
    np.save(tmp_path / "full.npy", np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:-10])
    out.append((tmp_path / "cut.npy", "is truncated"))
    return out


def test_check_clips_names_the_first_bad_clip(tmp_path):
    good = save_clip(tmp_path / "good.npy")
    for bad, expected in _bad_clip_cases(tmp_path):
        df = pd.DataFrame({"clip_path": [str(good), str(bad)], "label": [1, 0]})
        with pytest.raises(HeaderNetError) as excinfo:
            check_clips(df, "train.csv")
        message = one_line_error(excinfo)
        assert message.startswith(f"train.csv: row 3: clip {bad} ") and expected in message, message


def test_check_clips_accepts_short_grey_clips(tmp_path):
    clip = save_clip(tmp_path / "short.npy", frames=7, grey=True)
    check_clips(pd.DataFrame({"clip_path": [str(clip)], "label": [1]}), "train.csv")


# --- frame sampling -----------------------------------------------------------------------
@pytest.mark.parametrize("available, wanted, expected", [
    (7, 16, [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6]),
    (11, 16, [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 10]),
    (16, 8, [0, 2, 4, 6, 9, 11, 13, 15]),
    (1, 4, [0, 0, 0, 0]),
    (16, 16, list(range(16))),
    (11, 11, list(range(11))),
    (11, 1, [5]),
])
def test_sample_frame_indices(available, wanted, expected):
    indices = sample_frame_indices(available, wanted)
    assert indices.tolist() == expected
    assert indices.dtype == np.int64


def test_sample_frame_indices_rejects_empty_clip():
    with pytest.raises(ValueError):
        sample_frame_indices(0, 16)


def test_load_clip_frames_reads_the_sampled_frames(tmp_path):
    clip = save_clip(tmp_path / "c.npy", frames=11)
    frames = load_clip_frames(str(clip), 16)
    assert frames.shape == (16, 16, 16, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, np.load(clip)[sample_frame_indices(11, 16)])


# --- epoch sampling -----------------------------------------------------------------------
LABELS = np.array([1] * 10 + [0] * 100)


def test_epoch_indices_counts_and_determinism():
    first = epoch_indices(LABELS, 3, seed=7, epoch=0)
    assert len(first) == 40 and set(np.flatnonzero(LABELS == 1)) <= set(first.tolist())
    assert (LABELS[first] == 0).sum() == 30 and len(set(first.tolist())) == 40
    np.testing.assert_array_equal(first, epoch_indices(LABELS, 3, seed=7, epoch=0))
    second = epoch_indices(LABELS, 3, seed=7, epoch=1)
    assert set(second.tolist()) != set(first.tolist())
    # upstream's rule: the RNG only depends on seed + epoch
    np.testing.assert_array_equal(epoch_indices(LABELS, 3, seed=6, epoch=1), first)


def test_epoch_indices_is_shuffled_not_grouped():
    order = epoch_indices(LABELS, 3, seed=0, epoch=0)
    assert not (LABELS[order][:10] == 1).all()
    assert order.tolist() != sorted(order.tolist())


def test_epoch_indices_all_and_too_few_negatives():
    everything = epoch_indices(LABELS, None, seed=0, epoch=0)
    assert sorted(everything.tolist()) == list(range(len(LABELS)))
    assert len(epoch_indices(LABELS, 30, seed=0, epoch=0)) == len(LABELS)
    assert len(epoch_indices(LABELS, 2.5, seed=0, epoch=0)) == 35
    with pytest.raises(HeaderNetError):
        epoch_indices(np.zeros(5, int), 2, seed=0, epoch=0)


def test_epoch_sampler_train_and_eval():
    sampler = EpochSampler(LABELS, neg_pos_ratio=2, seed=3, shuffle=True)
    keys = list(sampler)
    assert len(sampler) == len(keys) == 30
    assert [i for i, _ in keys] == epoch_indices(LABELS, 2, 3, 0).tolist()
    assert {e for _, e in keys} == {0}
    sampler.set_epoch(4)
    keys = list(sampler)
    assert [i for i, _ in keys] == epoch_indices(LABELS, 2, 3, 4).tolist()
    assert {e for _, e in keys} == {4}

    evaluation = EpochSampler(LABELS, neg_pos_ratio=None, seed=3, shuffle=False)
    evaluation.set_epoch(2)
    assert list(evaluation) == [(i, 2) for i in range(len(LABELS))]
    assert len(evaluation) == len(LABELS)


# --- augmentation draws and the loader side -------------------------------------------------
def test_augmentation_draw_is_reproducible_from_seed_epoch_index():
    transform = ClipTransform(num_frames=4, size=24, train=True, seed=5, jitter=0.3)
    a = transform.params(2, 9)
    assert a == ClipTransform(num_frames=4, size=24, train=True, seed=5, jitter=0.3).params(2, 9)
    others = [transform.params(3, 9), transform.params(2, 10),
              ClipTransform(num_frames=4, size=24, train=True, seed=6, jitter=0.3).params(2, 9)]
    assert all(a != other for other in others)
    assert 0.7 <= a.brightness <= 1.3 and 0.7 <= a.contrast <= 1.3 and 0.8 <= a.crop_side <= 1
    assert transform.epoch_params(2, 9) == a
    assert ClipTransform(num_frames=4, size=24, train=False).epoch_params(2, 9) is None


def test_cached_views_are_fixed_draws_and_epochs_pick_among_them():
    transform = ClipTransform(num_frames=4, size=24, train=True, seed=5)
    assert transform.view_params(0, 3) is None  # view 0: the clip as validation sees it
    assert transform.view_params(1, 3) == transform.view_params(1, 3) != transform.view_params(2, 3)
    assert transform.view_params(1, 3) not in {transform.params(e, 3) for e in range(5)}
    picks = transform.epoch_views(epoch=1, clips=500, views=4)
    assert picks.shape == (500,) and set(picks.tolist()) == {0, 1, 2, 3}
    assert np.array_equal(picks, transform.epoch_views(epoch=1, clips=500, views=4))
    assert not np.array_equal(picks, transform.epoch_views(epoch=2, clips=500, views=4))
    assert not transform.epoch_views(epoch=1, clips=10, views=1).any()


def test_transform_from_config():
    config = TrainConfig(input_size=32, num_frames=8, augment=False, seed=1)
    transform = ClipTransform.from_config(config, train=True)
    assert (transform.size, transform.num_frames, transform.train, transform.seed) == (32, 8, False, 1)
    assert ClipTransform.from_config(config.replace(augment=True), train=True).train


def test_train_batch_holds_the_crop_box_of_the_sampled_frames(tmp_path):
    paths = [str(save_clip(tmp_path / f"c{i}.npy", frames=9, side=40, seed=i)) for i in range(3)]
    transform = ClipTransform(num_frames=4, size=24, train=True, seed=3, crop_scale=0.5, jitter=0.2)
    dataset = ClipDataset(paths, [1, 0, 1], transform)
    batch = dataset.read_batch([(0, 7), (2, 7), (1, 8)])
    assert batch.frames.dtype == torch.uint8 and batch.frames.shape[:2] == (3, 4)
    assert batch.labels.tolist() == [1, 1, 0] and batch.indices.tolist() == [0, 2, 1]
    for b, (index, epoch) in enumerate([(0, 7), (2, 7), (1, 8)]):
        params = transform.params(epoch, index)
        top, left, side = params.crop_box(40, 40)
        clip = np.load(paths[index])[sample_frame_indices(9, 4)]
        expected = clip[:, top:top + side, left:left + side]
        assert np.array_equal(batch.frames[b, :, :side, :side].numpy(), expected)
        assert not batch.frames[b, :, side:].any() and not batch.frames[b, :, :, side:].any()  # padding
        assert batch.aug[b].tolist() == pytest.approx([side, side, float(params.flip), params.brightness,
                                                       params.contrast])


def test_eval_batch_holds_whole_frames_of_any_size(tmp_path):
    paths = [str(save_clip(tmp_path / "a.npy", frames=5, side=20)),
             str(save_clip(tmp_path / "b.npy", frames=3, side=12, seed=1))]
    dataset = ClipDataset(paths, [0, 1], ClipTransform(num_frames=5, size=16, train=False, flip=1.0))
    batch = dataset.read_batch([0, 1])
    assert batch.frames.shape == (2, 5, 20, 20, 3)
    assert np.array_equal(batch.frames[1, :, :12, :12].numpy(), np.load(paths[1])[sample_frame_indices(3, 5)])
    assert batch.aug.tolist() == [[20, 20, 0, 1, 1], [12, 12, 0, 1, 1]]
    one = dataset[1]  # a single key is a batch of one
    assert one.frames.shape == (1, 5, 12, 12, 3) and torch.equal(one.frames[0], batch.frames[1, :, :12, :12])
    with pytest.raises(IndexError):
        dataset[2]


def test_view_keys_read_the_cached_views(tmp_path):
    path = str(save_clip(tmp_path / "a.npy", frames=5, side=30))
    transform = ClipTransform(num_frames=2, size=16, train=True, seed=4)
    dataset = ClipDataset([path], [1], transform, views=True)
    assert dataset.aug_params((0, 0)) == (0, None)
    assert dataset.aug_params((0, 2)) == (0, transform.view_params(2, 0))
    assert dataset[(0, 0)].aug[0].tolist() == [30, 30, 0, 1, 1]


def test_loader_threads_match_the_single_threaded_order(tmp_path):
    paths = [str(save_clip(tmp_path / f"c{i}.npy", frames=9, side=24, seed=i)) for i in range(12)]
    labels = [1, 0, 0, 0] * 3
    dataset = ClipDataset(paths, labels, ClipTransform(num_frames=4, size=16, train=True, jitter=0.3))

    def run(threads: int) -> list:
        sampler = EpochSampler(labels, neg_pos_ratio=2, seed=1, shuffle=True)
        loader = BatchLoader(dataset, sampler, batch_size=4, threads=threads)
        assert len(loader) == 3
        batches = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches += list(loader)
        return batches

    single, threaded = run(0), run(2)
    assert len(single) == len(threaded) == 6  # 3 pos + 6 neg = 9 keys = 3 batches, 2 epochs
    for a, b in zip(single, threaded):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sorted(i for batch in single[:3] for i in batch.indices.tolist()) == \
        sorted(epoch_indices(np.array(labels), 2, 1, 0).tolist())


def test_a_bad_clip_stops_the_loader_with_one_line(tmp_path):
    good = str(save_clip(tmp_path / "good.npy"))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 8, 8), np.uint8))
    dataset = ClipDataset([good, str(bad)], [0, 1], ClipTransform(num_frames=2, size=8, train=False))
    loader = BatchLoader(dataset, EpochSampler([0, 1], neg_pos_ratio=None, seed=0, shuffle=False), 1, threads=2)
    with pytest.raises(HeaderNetError, match="bad.npy has shape"):
        list(loader)


def test_a_clip_rewritten_between_epochs_is_read_as_it_is_now(tmp_path):
    path = save_clip(tmp_path / "c.npy", frames=4, side=12, seed=1)
    dataset = ClipDataset([str(path)], [1], ClipTransform(num_frames=2, size=8, train=False))
    assert dataset[0].frames.shape == (1, 2, 12, 12, 3)
    np.save(path, np.full((6, 10, 14, 3), 7, np.uint8))  # another shape: the cached header is stale
    batch = dataset[0]
    assert batch.frames.shape == (1, 2, 10, 14, 3) and (batch.frames == 7).all()
    np.save(path, np.zeros((6, 10, 14), np.uint8))
    with pytest.raises(HeaderNetError, match=r"c.npy has shape \(6, 10, 14\)"):
        dataset[0]
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(HeaderNetError, match="c.npy"):
        dataset[0]
