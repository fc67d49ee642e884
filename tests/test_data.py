"""headernet_core.data: CSV validation, path resolution, clip checks, sampling, augmentation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from headernet_core.config import TrainConfig
from headernet_core.data import (
    ClipDataset,
    ClipTransform,
    EpochSampler,
    check_clips,
    check_has_both_classes,
    epoch_indices,
    load_clip_frames,
    normalize,
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


# --- transform ----------------------------------------------------------------------------
def test_augmentation_is_reproducible_from_seed_epoch_index(tmp_path):
    frames = np.load(save_clip(tmp_path / "c.npy", frames=4, side=32))
    transform = ClipTransform(num_frames=4, size=24, train=True, seed=5, jitter=0.3)
    a = transform(frames, epoch=2, index=9)
    assert a.shape == (3, 4, 24, 24) and a.dtype == torch.uint8 and a.is_contiguous()
    assert torch.equal(a, ClipTransform(num_frames=4, size=24, train=True, seed=5, jitter=0.3)(
        frames, epoch=2, index=9))
    others = [transform(frames, epoch=3, index=9), transform(frames, epoch=2, index=10),
              ClipTransform(num_frames=4, size=24, train=True, seed=6, jitter=0.3)(frames, epoch=2, index=9)]
    assert all(not torch.equal(a, other) for other in others)


def test_augmentation_is_the_same_for_every_frame(tmp_path):
    still = np.repeat(np.load(save_clip(tmp_path / "c.npy", frames=1, side=32)), 6, axis=0)
    transform = ClipTransform(num_frames=6, size=20, train=True, jitter=0.3, crop_scale=0.5)
    for index in range(8):
        clip = transform(still, epoch=0, index=index)
        assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(6))


def test_flip_applies_to_all_frames():
    # each frame is dark on the left and bright on the right, with a different level per frame
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    for t in range(5):
        frames[t, :, 8:] = 100 + 20 * t
    plain = ClipTransform(num_frames=5, size=16, train=True, flip=0.0, jitter=0.0, crop_scale=1.0)
    flipped = ClipTransform(num_frames=5, size=16, train=True, flip=1.0, jitter=0.0, crop_scale=1.0)
    assert torch.equal(plain(frames), torch.from_numpy(frames).permute(3, 0, 1, 2))
    assert torch.equal(flipped(frames), torch.from_numpy(frames[:, :, ::-1].copy()).permute(3, 0, 1, 2))
    coin = ClipTransform(num_frames=5, size=16, train=True, flip=0.5, jitter=0.0, crop_scale=1.0)
    outcomes = set()
    for index in range(20):
        left_bright = (coin(frames, index=index)[0, :, :, 0] > 0).all(dim=1)  # per frame
        assert left_bright.all() or not left_bright.any()
        outcomes.add(bool(left_bright.all()))
    assert outcomes == {True, False}


def test_grey_channels_stay_identical(tmp_path):
    frames = np.load(save_clip(tmp_path / "g.npy", frames=5, side=32, grey=True))
    transform = ClipTransform(num_frames=5, size=24, train=True, jitter=0.5)
    for index in range(5):
        clip = transform(frames, epoch=1, index=index)
        assert torch.equal(clip[0], clip[1]) and torch.equal(clip[1], clip[2])


def test_validation_transform_only_resizes(tmp_path):
    frames = np.load(save_clip(tmp_path / "c.npy", frames=3, side=32))
    transform = ClipTransform(num_frames=3, size=24, train=False, flip=1.0, jitter=1.0)
    expected = TF.resize(torch.from_numpy(frames).permute(0, 3, 1, 2), [24, 24], antialias=True)
    for epoch, index in [(0, 0), (5, 3)]:
        assert torch.equal(transform(frames, epoch=epoch, index=index), expected.permute(1, 0, 2, 3))


def test_transform_from_config():
    config = TrainConfig(input_size=32, num_frames=8, augment=False, seed=1)
    transform = ClipTransform.from_config(config, train=True)
    assert (transform.size, transform.num_frames, transform.train, transform.seed) == (32, 8, False, 1)
    assert ClipTransform.from_config(config.replace(augment=True), train=True).train


def test_normalize_math():
    clips = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1, 1).expand(2, 3, 2, 2, 2)
    out = normalize(clips, mean=[0.0, 0.2, 0.5], std=[1.0, 0.5, 0.25])
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2, 2)
    expected = torch.tensor([0.0, (0.2 - 0.2) / 0.5, (1.0 - 0.5) / 0.25])
    torch.testing.assert_close(out[0, :, 0, 0, 0], expected)
    assert clips.dtype == torch.uint8  # the input is untouched
    with pytest.raises(ValueError, match="uint8"):
        normalize(out, mean=[0.5] * 3, std=[0.5] * 3)


# --- dataset and loader -------------------------------------------------------------------
def test_dataset_items(tmp_path):
    paths = [str(save_clip(tmp_path / f"c{i}.npy", frames=7 + i, side=20, seed=i)) for i in range(3)]
    dataset = ClipDataset(paths, [1, 0, 1], ClipTransform(num_frames=8, size=16, train=True))
    assert len(dataset) == 3
    clip, label, index = dataset[(2, 5)]
    assert clip.shape == (3, 8, 16, 16) and clip.dtype == torch.uint8 and clip.is_contiguous()
    assert (label, index) == (1, 2)
    assert torch.equal(dataset[1][0], dataset[(1, 0)][0])
    with pytest.raises(IndexError):
        dataset[3]


def test_dataloader_workers_match_single_process(tmp_path):
    paths = [str(save_clip(tmp_path / f"c{i}.npy", frames=9, side=24, seed=i)) for i in range(12)]
    labels = [1, 0, 0, 0] * 3
    dataset = ClipDataset(paths, labels, ClipTransform(num_frames=4, size=16, train=True, jitter=0.3))

    def run(workers: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        sampler = EpochSampler(labels, neg_pos_ratio=2, seed=1, shuffle=True)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)
        batches = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches += list(loader)
        return batches

    single, multi = run(0), run(2)
    assert len(single) == len(multi) == 6  # 3 pos + 6 neg = 9 keys = 3 batches, 2 epochs
    for (c0, l0, i0), (c1, l1, i1) in zip(single, multi):
        assert c0.shape[1:] == (3, 4, 16, 16)
        assert torch.equal(c0, c1) and torch.equal(l0, l1) and torch.equal(i0, i1)
