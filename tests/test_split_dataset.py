"""headernet_core.split_dataset: stratified, video-grouped train/val split CLI."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headernet_core import split_dataset
from headernet_core.data import read_split
from headernet_core.errors import HeaderNetError
from headernet_core.split_dataset import fold_plan, split_frame

COLUMNS = ["path", "label", "video_id", "half", "frame", "metadata"]


def clip_table(videos: int = 12, clips_per_video: int = 10, seed: int = 0) -> pd.DataFrame:
    """Upstream-like rows: absolute paths of another machine, ~20% positives, every video has one."""
    rng = np.random.default_rng(seed)
    rows = []
    for v in range(videos):
        for c in range(clips_per_video):
            label = int(c == 0 or rng.random() < 0.12)
            base = f"/scratch/other/cache/match{v:02d}_half1_{c:06d}_{label}"
            rows.append({"path": base, "label": label, "video_id": f"match{v:02d}", "half": 1,
                         "frame": c * 50, "metadata": f"{base}_meta.json"})
    return pd.DataFrame(rows, columns=COLUMNS)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "headernet_core.split_dataset", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


# --- end to end ---------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path):
    source = clip_table()
    source.to_csv(tmp_path / "all.csv", index=False)
    result = run_cli("--input_csv", "all.csv", "--output_dir", "splits", "--seed", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train = pd.read_csv(tmp_path / "splits" / "train.csv")
    val = pd.read_csv(tmp_path / "splits" / "val.csv")
    assert list(train.columns) == list(val.columns) == COLUMNS  # no index column
    assert len(train) + len(val) == len(source)
    assert sorted(pd.concat([train, val])["path"]) == sorted(source["path"])
    assert not set(train["video_id"]) & set(val["video_id"])
    assert train["label"].sum() > 0 and val["label"].sum() > 0
    assert f"train: {len(train)} clips, {train['label'].sum()} positives, " in result.stdout
    assert f"val: {len(val)} clips, {val['label'].sum()} positives, " in result.stdout
    assert "video_id groups" in result.stdout
    assert not list((tmp_path / "splits").glob(".*tmp"))  # temp files were renamed away


def test_cli_missing_file_is_one_line_exit_2(tmp_path):
    result = run_cli("--input_csv", "nope.csv", "--output_dir", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: nope.csv: input CSV not found (--input_csv)\n"
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# --- in-process (same code, faster) -------------------------------------------------------
def run_main(tmp_path: Path, *args: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    split_dataset.main(["--input_csv", str(tmp_path / "all.csv"), "--output_dir", str(tmp_path / "out"), *args])
    return (pd.read_csv(tmp_path / "out" / "train.csv", keep_default_na=False),
            pd.read_csv(tmp_path / "out" / "val.csv", keep_default_na=False))


def test_absolute_root_dir_gives_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clips").mkdir()
    clip_table(videos=4).to_csv(tmp_path / "all.csv", index=False)
    train, val = run_main(tmp_path, "--root_dir", str(tmp_path / "clips"))
    paths = pd.concat([train, val])["path"]
    assert all(Path(p).parent == tmp_path / "clips" and Path(p).name.startswith("match") for p in paths)
    assert all(m.startswith("/scratch/other/") for m in train["metadata"])  # other columns untouched


def test_relative_root_dir_is_written_relative_to_the_output_folder(tmp_path, monkeypatch):
    """`--root_dir ../clips` typed in one folder must not mean "../clips from wherever the
    trainer runs": the CSV holds the clips' place relative to itself."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "clips").mkdir()
    table = clip_table(videos=4, clips_per_video=5)
    for p in table["path"]:
        np.save(tmp_path / "clips" / f"{Path(p).name}_s.npy", np.zeros((2, 4, 4, 3), np.uint8))
    table.to_csv(tmp_path / "all.csv", index=False)
    train, _ = run_main(tmp_path, "--root_dir", "../clips")   # output: tmp_path/out
    assert train["path"][0] == f"../clips/{Path(train['path'][0]).name}"
    monkeypatch.chdir(tmp_path / "clips")                      # read from anywhere else
    assert len(read_split(tmp_path / "out" / "train.csv", "train")) == len(train)


def test_paths_relative_to_input_csv_still_resolve_from_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    table = clip_table(videos=4, clips_per_video=5)
    table["path"] = [f"clips/{Path(p).name}" for p in table["path"]]  # relative to the CSV folder
    for p in table["path"]:
        np.save(data / f"{p}_s.npy", np.zeros((2, 4, 4, 3), np.uint8))
    table.loc[0, "path"] = str(data / "clips" / Path(table.loc[0, "path"]).name)  # absolute: kept
    table.to_csv(data / "all.csv", index=False)
    split_dataset.main(["--input_csv", "data/all.csv", "--output_dir", "data/splits"])
    before = read_split(data / "all.csv", "input")
    after = pd.concat([read_split(data / "splits" / name, name[:-4]) for name in ("train.csv", "val.csv")])
    assert sorted(after["clip_path"]) == sorted(before["clip_path"])
    assert set(after["path"]) - {table.loc[0, "path"]} == {f"../{p}" for p in table["path"][1:]}


def test_paths_relative_to_the_working_directory_work_from_any_folder(tmp_path, monkeypatch):
    """Paths written relative to where the split was made (the loader finds them from there)
    are rewritten relative to the output folder; read from another folder they find the same
    clips."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "clips").mkdir(parents=True)
    table = clip_table(videos=4, clips_per_video=5)
    table["path"] = [f"data/clips/{Path(p).name}" for p in table["path"]]  # relative to the cwd
    for p in table["path"]:
        np.save(tmp_path / f"{p}_s.npy", np.zeros((2, 4, 4, 3), np.uint8))
    (tmp_path / "lists").mkdir()
    table.to_csv(tmp_path / "lists" / "all.csv", index=False)
    split_dataset.main(["--input_csv", "lists/all.csv", "--output_dir", "splits"])
    expected = sorted(str(tmp_path / f"{p}_s.npy") for p in table["path"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    after = pd.concat([read_split(tmp_path / "splits" / f"{name}.csv", name) for name in ("train", "val")])
    assert sorted(after["clip_path"]) == expected
    assert all(p.startswith("../data/clips/") for p in after["path"])


def test_test_split_is_a_third_grouped_stratified_split(tmp_path, capsys):
    clip_table(videos=20, clips_per_video=10, seed=4).to_csv(tmp_path / "all.csv", index=False)
    split_dataset.main(["--input_csv", str(tmp_path / "all.csv"), "--output_dir", str(tmp_path / "out"),
                        "--val_split", "0.2", "--test_split", "0.2", "--seed", "1"])
    parts = {name: pd.read_csv(tmp_path / "out" / f"{name}.csv") for name in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 200
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(parts[a]["video_id"]) & set(parts[b]["video_id"]), (a, b)
    for name in ("val", "test"):  # each about a fifth of ALL clips, with positives
        assert abs(len(parts[name]) - 40) <= 10 and parts[name]["label"].sum() > 0, name
    assert "test: " in capsys.readouterr().out
    # without --test_split nothing changes: two files, the same train/val as before
    split_dataset.main(["--input_csv", str(tmp_path / "all.csv"), "--output_dir", str(tmp_path / "two")])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["train.csv", "val.csv"]


def test_a_new_split_over_an_old_one_leaves_no_stale_test_csv(tmp_path, capsys):
    """An old test.csv beside a new train.csv would share matches with it (a silent leak)."""
    clip_table(videos=20, clips_per_video=5, seed=4).to_csv(tmp_path / "all.csv", index=False)
    base = ["--input_csv", str(tmp_path / "all.csv"), "--output_dir", str(tmp_path / "out")]
    split_dataset.main([*base, "--test_split", "0.2", "--seed", "1"])
    (tmp_path / "out" / "train.csv").unlink()
    (tmp_path / "out" / "val.csv").unlink()
    with pytest.raises(HeaderNetError, match="test.csv already exists"):
        split_dataset.main([*base, "--seed", "2"])   # the old test split is still there
    split_dataset.main([*base, "--seed", "2", "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.csv", "val.csv"]
    assert "removed " in capsys.readouterr().out


@pytest.mark.parametrize("args, expected", [
    (["--test_split", "0"], "--test_split must be in (0, 1)"),
    (["--val_split", "0.5", "--test_split", "0.5"], "--val_split + --test_split < 1"),
])
def test_bad_test_split(tmp_path, args, expected):
    clip_table(videos=8).to_csv(tmp_path / "all.csv", index=False)
    with pytest.raises(HeaderNetError, match=re.escape(expected)):
        run_main(tmp_path, *args)
    assert not (tmp_path / "out").exists()


def test_cells_are_copied_as_written(tmp_path):
    table = clip_table(videos=4)
    table["label"] = table["label"].map({0: "0.0", 1: "1"})
    table.loc[0, "metadata"] = ""
    table.to_csv(tmp_path / "all.csv", index=False)
    run_main(tmp_path)
    both = pd.concat([pd.read_csv(tmp_path / "out" / name, dtype=str, keep_default_na=False)
                      for name in ("train.csv", "val.csv")])
    assert set(both["label"]) == {"0.0", "1"}
    assert (both["metadata"] == "").sum() == 1


def test_no_group_lets_videos_share_splits(tmp_path, capsys):
    clip_table(videos=6, clips_per_video=20).to_csv(tmp_path / "all.csv", index=False)
    train, val = run_main(tmp_path, "--no_group", "--val_split", "0.25")
    assert len(val) == 30  # clip-level: exactly ceil(0.25 * 120)
    assert set(train["video_id"]) & set(val["video_id"])
    assert "appear in both splits" in capsys.readouterr().out


@pytest.mark.parametrize("args, expected", [
    (["--val_split", "0"], "--val_split must be between 0 and 1"),
    (["--val_split", "1.5"], "--val_split must be between 0 and 1"),
    (["--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
    (["--root_dir", "/definitely/not/here"], "--root_dir /definitely/not/here: not a directory"),
])
def test_bad_arguments(tmp_path, args, expected):
    clip_table(videos=4).to_csv(tmp_path / "all.csv", index=False)
    with pytest.raises(HeaderNetError, match=expected):
        run_main(tmp_path, *args)


@pytest.mark.parametrize("table, expected", [
    (pd.DataFrame({"path": ["a", "b"], "video_id": ["x", "y"]}), "missing column(s) label"),
    (pd.DataFrame({"path": ["a", "b", "c"], "label": [0, 0, 0]}), "no positive clips"),
    (pd.DataFrame({"path": ["a", "b", "c"], "label": [0, 1, 0]}), "each class present needs at least 2"),
    (pd.DataFrame({"path": list("abcd"), "label": [1, 0, 1, 0], "video_id": ["v"] * 4}),
     "a single group cannot be split"),
    (pd.DataFrame({"path": list("abcd"), "label": [1, 1, 0, 0], "video_id": list("vvwx")}),
     "all positives come from one video_id"),
    (pd.DataFrame({"path": list("abcd"), "label": [1, 2, 0, 0]}), "row 3: label must be 0 or 1, got '2'"),
    (pd.DataFrame({"path": list("abcd"), "label": [1, 1, 0, 0]}), "too few clips (4) for --val_split 0.2"),
])
def test_bad_input_tables(tmp_path, table, expected):
    table.to_csv(tmp_path / "all.csv", index=False)
    with pytest.raises(HeaderNetError) as excinfo:
        run_main(tmp_path)
    message = str(excinfo.value)
    assert expected in message and "\n" not in message
    assert str(tmp_path / "all.csv") in message


# --- split_frame ----------------------------------------------------------------------------
@pytest.mark.parametrize("val_split", [0.1, 0.2, 0.3, 0.5, 0.8])
def test_grouped_split_is_stratified_and_close_to_val_split(val_split):
    table = clip_table(videos=30, clips_per_video=10, seed=1)
    train, val = split_frame(table, val_split, seed=42, group=True)
    assert len(train) + len(val) == len(table)
    assert not set(train["video_id"]) & set(val["video_id"])
    assert train["label"].sum() > 0 and val["label"].sum() > 0
    assert abs(len(val) / len(table) - val_split) <= 0.05
    rate = table["label"].mean()
    assert abs(val["label"].mean() - rate) < 0.1


def test_split_is_seeded():
    table = clip_table(videos=20)
    a, _ = split_frame(table, 0.2, seed=1, group=True)
    b, _ = split_frame(table, 0.2, seed=1, group=True)
    c, _ = split_frame(table, 0.2, seed=2, group=True)
    assert a.equals(b) and not a.equals(c)
    assert a.index.tolist() == list(range(len(a)))


def test_ungrouped_split_is_stratified():
    table = clip_table(videos=10).drop(columns="video_id")
    train, val = split_frame(table, 0.2, seed=0, group=True)  # no video_id: clip-level split
    assert len(val) == 20 and val["label"].sum() > 0 and train["label"].sum() > 0


def test_fold_plan():
    assert fold_plan(0.2, 100) == (1, 5)
    assert fold_plan(0.3, 100) == (3, 10)
    assert fold_plan(0.25, 100) == (1, 4)
    assert fold_plan(0.2, 3) == (1, 3)  # at most one fold per group
