"""The synthetic demo dataset: training format, determinism, CLI refusal, and that the labels
are physically true (headers touch a head and bounce, near misses never touch)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headernet_core import demo_data as dd
from headernet_core.errors import HeaderNetError

SMALL = dict(seed=0, matches=3, clips_per_match=24, size=64, frames=12)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    csv_path = dd.generate(tmp_path_factory.mktemp("demo") / "data", **SMALL)
    return csv_path, pd.read_csv(csv_path)


def _clip(csv_path: Path, row) -> np.ndarray:
    return np.load(csv_path.parent / f"{row.path}_s.npy")


def _meta(csv_path: Path, row) -> dict:
    return json.loads((csv_path.parent / f"{row.path}_meta.json").read_text())


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headernet_core.demo_data", *args],
                          capture_output=True, text=True, timeout=120)


# --- format ---------------------------------------------------------------------------------


def test_csv_schema_and_paths(small):
    csv_path, df = small
    assert csv_path.name == "all_clips.csv"
    assert list(df.columns[:5]) == ["path", "label", "video_id", "half", "frame"]
    assert len(df) == SMALL["matches"] * SMALL["clips_per_match"]
    assert set(df.label) == {0, 1}
    assert set(df.half) <= {1, 2}
    assert not df.duplicated(["video_id", "half", "frame"]).any()
    for row in df.itertuples():
        # upstream naming, relative to the CSV's folder, no suffix; the clip is <path>_s.npy
        expected = f"clips/{row.video_id}_half{row.half}_{row.frame:06d}_{row.label}"
        assert row.path == expected
        assert not row.path.endswith(".npy") and not Path(row.path).is_absolute()
        assert (csv_path.parent / f"{row.path}_s.npy").is_file()
        assert (csv_path.parent / f"{row.path}_meta.json").is_file()
        assert row.label == int(row.kind == "header")
    # nothing half-written is left behind
    assert not list(csv_path.parent.rglob("*.tmp"))


def test_clips_are_uint8_thwc(small):
    csv_path, df = small
    for row in df.itertuples():
        clip = _clip(csv_path, row)
        assert clip.dtype == np.uint8
        assert clip.ndim == 4 and clip.shape[1:] == (64, 64, 3)
        assert clip.shape[0] == row.num_frames
        assert SMALL["frames"] - 2 <= clip.shape[0] <= SMALL["frames"]
        assert 0 <= row.contact_frame < clip.shape[0]


def test_short_and_grey_clips_exist(small):
    csv_path, df = small
    short = df[df.num_frames < SMALL["frames"]]
    grey = df[df.grey == 1]
    assert len(short) >= 1 and len(grey) >= 1
    assert len(short) < len(df) / 3 and len(grey) < len(df) / 3
    for row in grey.itertuples():
        clip = _clip(csv_path, row)
        assert np.array_equal(clip[..., 0], clip[..., 1])
        assert np.array_equal(clip[..., 0], clip[..., 2])
    colour = _clip(csv_path, next(df[df.grey == 0].itertuples()))
    assert not np.array_equal(colour[..., 0], colour[..., 1])


def test_class_balance_per_match(small):
    _, df = small
    assert df.video_id.nunique() == SMALL["matches"]
    for _, match in df.groupby("video_id"):
        assert set(match.label) == {0, 1}
        assert 0.2 <= match.label.mean() <= 0.3          # about 1 positive per 3 negatives
    assert set(df.kind) == set(dd.KINDS)


def test_other_sizes(tmp_path):
    csv_path = dd.generate(tmp_path / "d", seed=3, matches=1, clips_per_match=8, size=32, frames=8)
    df = pd.read_csv(csv_path)
    for row in df.itertuples():
        clip = _clip(csv_path, row)
        assert clip.shape[1:] == (32, 32, 3) and 6 <= clip.shape[0] <= 8


# --- determinism ----------------------------------------------------------------------------


def _fingerprint(csv_path: Path) -> tuple[str, list[bytes]]:
    df = pd.read_csv(csv_path)
    return csv_path.read_text(), [_clip(csv_path, r).tobytes() for r in df.itertuples()]


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    args = dict(matches=2, clips_per_match=8)
    a = _fingerprint(dd.generate(tmp_path / "a", seed=5, **args))
    b = _fingerprint(dd.generate(tmp_path / "b", seed=5, **args))
    c = _fingerprint(dd.generate(tmp_path / "c", seed=6, **args))
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


# --- refusal and CLI ------------------------------------------------------------------------


def test_refuses_non_empty_dir_then_overwrites_only_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    small_args = ["--matches", "1", "--clips_per_match", "8"]

    refused = _run_cli("--out", str(out), *small_args)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    done = _run_cli("--out", str(out), "--overwrite", "--seed", "1", *small_args)
    assert done.returncode == 0, done.stderr
    csv_path = out / "all_clips.csv"
    assert f"csv: {csv_path}" in done.stdout
    assert "8 clips (2 positives" in done.stdout
    assert ("python -m headernet_core.split_dataset "
            f"--input_csv {csv_path} --output_dir {out / 'splits'}") in done.stdout
    assert (out / "notes.txt").read_text() == "mine"
    first = set((out / "clips").iterdir())

    # overwrite again with another seed: old clips are replaced, not accumulated
    again = _run_cli("--out", str(out), "--overwrite", "--seed", "2", *small_args)
    assert again.returncode == 0, again.stderr
    df = pd.read_csv(csv_path)
    assert len(list((out / "clips").glob("*_s.npy"))) == len(df) == 8
    assert set((out / "clips").iterdir()) != first


@pytest.mark.parametrize("kwargs, flag", [
    (dict(seed=-1), "--seed"),
    (dict(matches=0), "--matches"),
    (dict(clips_per_match=3), "--clips_per_match"),
    (dict(size=16), "--size"),
    (dict(frames=3), "--frames"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, kwargs, flag):
    with pytest.raises(HeaderNetError, match=re.escape(flag)):
        dd.generate(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_refuses_a_file_as_out(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(HeaderNetError, match="not a folder"):
        dd.generate(target, matches=1, clips_per_match=4)


# --- physics: the label is true -----------------------------------------------------------


def _turn_degrees(ball: np.ndarray, c: int) -> float:
    """Angle between the ball's way in (first frame -> contact) and out (contact -> last)."""
    v_in, v_out = ball[c] - ball[0], ball[-1] - ball[c]
    cos = float(v_in @ v_out) / (np.linalg.norm(v_in) * np.linalg.norm(v_out))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _gaps(meta: dict) -> np.ndarray:
    """(T, players): ball edge to head edge per kept frame."""
    ball = np.array(meta["ball"]["centers"])
    return np.stack([np.linalg.norm(ball - np.array(h["centers"]), axis=1)
                     - meta["ball"]["r"] - h["r"] for h in meta["heads"]], axis=1)


def _probe(x: float, y: float, r: float) -> tuple[int, int]:
    """A pixel inside the ball, away from its dark patch (which sits down-right)."""
    return int(round(x - 0.35 * r)), int(round(y - 0.35 * r))


def _ball_visible(frame: np.ndarray, x: float, y: float, r: float) -> bool:
    """The probe pixel is ball-white: bright and neutral (kits, skin, grass and lines are not)."""
    px, py = _probe(x, y, r)
    if not (0 <= px < frame.shape[1] and 0 <= py < frame.shape[0]):
        return True  # off screen: nothing to check
    rgb = frame[py, px].astype(int)
    return rgb.mean() >= 150 and rgb.max() - rgb.min() <= 40


def test_headers_touch_a_head_and_bounce_off_it(small):
    csv_path, df = small
    s = SMALL["size"] / 64
    for row in df[df.kind == "header"].itertuples():
        meta = _meta(csv_path, row)
        c, target = meta["contact_frame"], meta["target_player"]
        gaps = _gaps(meta)
        ball = np.array(meta["ball"]["centers"])
        assert gaps[c, target] <= dd.TOUCH_GAP[1] * s + 0.1          # touching at contact
        assert np.delete(gaps[:, target], c).min() > 0                 # and only then
        assert _turn_degrees(ball, c) >= 60                            # it bounces back
        assert row.min_head_gap <= dd.TOUCH_GAP[1] * s + 0.1
        if not meta["grey"]:
            clip = _clip(csv_path, row)
            assert _ball_visible(clip[c], *ball[c], meta["ball"]["r"])


def test_near_misses_never_touch_and_go_straight(small):
    csv_path, df = small
    s = SMALL["size"] / 64
    rows = df[df.kind == "near_miss"]
    assert len(rows) > 0
    for row in rows.itertuples():
        meta = _meta(csv_path, row)
        assert _gaps(meta).min() >= dd.NEAR_MISS_GAP[0] * s - 0.1
        assert _turn_degrees(np.array(meta["ball"]["centers"]), meta["contact_frame"]) <= 20
        assert row.min_head_gap >= dd.NEAR_MISS_GAP[0] * s - 0.1


def test_pass_behind_looks_like_a_header_at_contact_but_goes_through(small):
    csv_path, df = small
    s = SMALL["size"] / 64
    rows = df[df.kind == "pass_behind"]
    assert len(rows) > 0
    hidden = 0
    for row in rows.itertuples():
        meta = _meta(csv_path, row)
        c, target = meta["contact_frame"], meta["target_player"]
        gaps = _gaps(meta)
        ball = np.array(meta["ball"]["centers"])
        assert dd.TOUCH_GAP[0] * s - 0.1 <= gaps[c, target] <= dd.TOUCH_GAP[1] * s + 0.1
        assert _turn_degrees(ball, c) <= 20                            # no deflection
        assert meta["ball"]["drawn_behind_players"]
        head = meta["heads"][target]
        inside = np.linalg.norm(ball - np.array(head["centers"]), axis=1) <= head["r"] - 1.5
        assert inside.any()                                            # it crosses the head
        if not meta["grey"]:
            clip = _clip(csv_path, row)
            for t in range(len(ball)):                                 # ... hidden behind it
                probe = np.array(_probe(*ball[t], meta["ball"]["r"]))
                if np.linalg.norm(probe - np.array(head["centers"][t])) <= head["r"] - 1.5:
                    assert not _ball_visible(clip[t], *ball[t], meta["ball"]["r"])
                    hidden += 1
    assert hidden > 0


def test_bounces_elsewhere_and_no_events_stay_away_from_heads(small):
    csv_path, df = small
    s = SMALL["size"] / 64
    for kind, turns in (("bounce_elsewhere", True), ("no_event", False)):
        rows = df[df.kind == kind]
        assert len(rows) > 0
        for row in rows.itertuples():
            meta = _meta(csv_path, row)
            assert _gaps(meta).min() >= dd.FAR_GAP * s - 0.1
            turn = _turn_degrees(np.array(meta["ball"]["centers"]), meta["contact_frame"])
            assert turn >= 60 if turns else turn <= 20
