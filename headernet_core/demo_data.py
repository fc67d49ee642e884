"""Synthetic demo dataset: cartoon soccer clips in exactly the legacy training format.

What it writes under `DIR`:
  all_clips.csv                one CSV to split: path,label,video_id,half,frame, then extra
                               columns the trainer ignores: kind, contact_frame, min_head_gap,
                               num_frames, grey
  clips/<video_id>_half<h>_<frame:06d>_<label>_s.npy    uint8 (T, S, S, 3) clip
  clips/<video_id>_half<h>_<frame:06d>_<label>_meta.json    per-frame ball and head geometry

`path` is relative to the CSV's folder and has no suffix (the loader appends `_s.npy`), as in
upstream's `train_cache_header.csv`; the meta file is `<path>_meta.json`, like upstream's.

Each clip is a crop around where the ball is at the middle ("contact") frame, the way
upstream's ball crops are: grass with stripes, noise and the odd faint line, one to three
players (body + head; the ball is about as big as a head), one ball that comes down into the
picture. At the contact frame one of these happens:

  header            (label 1) the ball meets a head and bounces back off it
  pass_behind       (label 0) the ball's straight path crosses a head (it passes behind the
                    player): at the contact frame it touches the head just like a header, so
                    one frame is not enough, what the ball does next is
  near_miss         (label 0) the ball passes close to a head without touching it
  bounce_elsewhere  (label 0) the ball turns like a header's, off a foot or the ground, far
                    from every head: the ball's motion alone is not enough either
  no_event          (label 0) the ball just travels, away from every head

1 positive per 3 negatives in every match; each match has its own kits, grass and lighting,
so a split grouped by video_id is a real (small) domain shift. A few clips are shorter (frames
dropped, like upstream's incomplete windows) and a few are grey (three identical channels,
like upstream's stacked-grey representation). Everything is deterministic from `seed`: clip i
of match m depends only on (seed, m, i).

The geometry (zoom, the ball coming down, the contact at the middle frame near the centre) is
deliberately regular: it is what lets the tiny random-init backbones learn the task from about
a thousand clips in 5 CPU epochs. Loosening it (any direction, a contact anywhere in time and
space, smaller objects) made a tiny ViT stall near AUC 0.5-0.8 in measurements.

Run:  python -m headernet_core.demo_data --out demo_data
then: python -m headernet_core.split_dataset --input_csv demo_data/all_clips.csv
          --output_dir demo_data/splits
"""
from __future__ import annotations

import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .artifacts import atomic_path, remove_stale_temps, write_csv, write_text
from .errors import CliParser, fail, run_cli
from .paths import check_writable_dir

CSV_NAME = "all_clips.csv"
CLIP_DIR = "clips"
MATCH_PREFIX = "demo-match-"      # every clip file name starts with it (--overwrite deletes only those)
POSITIVE_KINDS = ("header",)
NEGATIVE_KINDS = ("near_miss", "pass_behind", "bounce_elsewhere", "no_event")
KINDS = POSITIVE_KINDS + NEGATIVE_KINDS

POSITIVE_FRACTION = 0.25          # 1 positive per 3 negatives, like upstream's --negative-ratio 3
# Share of each negative kind among negatives. pass_behind is what a single frame at contact
# cannot tell from a header (it makes the task need motion); bounce_elsewhere is what the ball's
# motion alone cannot tell from one (it makes the task need the head).
NEGATIVE_MIX = {"near_miss": 0.20, "pass_behind": 0.30, "bounce_elsewhere": 0.35, "no_event": 0.15}
SHORT_CLIP_FRACTION = 0.10        # clips with 1-2 frames missing (upstream: undecoded offsets)
GREY_CLIP_FRACTION = 0.05         # clips with three identical grey channels
MIN_FRAMES, MIN_SIZE = 6, 32

# Geometry in pixels at size 64 (scaled by size/64). The view is a crop around the ball at the
# contact frame, like upstream's ball crops: the ball is about as big as a head and a player is
# about as tall as the frame. A "gap" is the distance between the ball's edge and a head's edge.
BALL_R = (6.5, 7.5)
HEAD_R = (7.5, 8.5)
BODY_RX, BODY_RY = (9.0, 11.0), (16.0, 19.0)
BALL_SPEED = (4.0, 5.5)           # px per frame
TOUCH_GAP = (-0.4, 0.6)           # header / pass_behind at the contact frame: touching
NEAR_MISS_GAP = (4.0, 9.0)        # near_miss at its closest approach
FAR_GAP = 12.0                    # the ball never comes nearer than this to any other head
CONTACT_CLEARANCE = 20.0          # ... nor nearer than this at the contact frame
CONTACT_JITTER = 3.0              # the ball at the contact frame is within this of the centre
INCOMING_ANGLE_DEG = 90.0         # direction the ball comes in (90 = straight down the image)
INCOMING_SPREAD_DEG = 25.0        # ... give or take this much
MAX_INCIDENCE_DEG = 35.0          # header / bounce: incoming ball vs surface normal (the
                                  # ball turns by at least 180 - 2 * 35 degrees)
RESTITUTION = (0.6, 1.0)          # outgoing / incoming speed of a bounce
BYSTANDERS = (0, 2)               # other players per clip: integers(lo, hi)
GRASS_NOISE, FRAME_NOISE = 4.0, 2.0
LINES = (0, 0, 1)                 # field lines per clip, drawn uniformly from this

# no white kit: nothing but the ball is white (lines are faint)
KITS = [(205, 35, 35), (35, 70, 205), (240, 205, 35), (25, 25, 30), (245, 130, 25),
        (125, 35, 155), (45, 165, 225), (150, 25, 45)]
SKINS = [(236, 196, 164), (212, 160, 120), (168, 116, 80), (108, 72, 46)]
HAIRS = [(35, 25, 20), (70, 45, 25), (200, 170, 95), (20, 20, 20)]


# --- scene description ------------------------------------------------------------------


@dataclass
class Player:
    head: np.ndarray              # (T, 2) head centre x, y per frame
    head_r: float
    body_rx: float
    body_ry: float
    kit: tuple[float, float, float]
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]


@dataclass
class Scene:
    kind: str
    contact_frame: int            # index in the full-length clip
    ball: np.ndarray              # (T, 2) ball centre per frame
    ball_r: float
    ball_color: tuple[float, float, float]
    ball_behind: bool             # drawn behind the players (pass_behind)
    players: list[Player]
    target: int | None            # index of the player whose head the event involves
    extra: dict = field(default_factory=dict)

    def head_gaps(self) -> np.ndarray:
        """(T, P): ball-edge to head-edge distance per frame and player."""
        gaps = [np.linalg.norm(self.ball - p.head, axis=1) - self.ball_r - p.head_r
                for p in self.players]
        return np.stack(gaps, axis=1)


@dataclass
class MatchStyle:
    grass: np.ndarray             # base RGB
    stripe_amp: float
    stripe_angle: float
    stripe_period: float
    kits: tuple[tuple, tuple]
    light: float
    line_alpha: float


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def _match_style(rng: np.random.Generator) -> MatchStyle:
    kit_a, kit_b = rng.choice(len(KITS), size=2, replace=False)
    grass = np.array([rng.uniform(40, 75), rng.uniform(105, 150), rng.uniform(30, 60)])
    return MatchStyle(
        grass=grass, stripe_amp=rng.uniform(4, 12), stripe_angle=rng.uniform(0, math.pi),
        stripe_period=rng.uniform(0.35, 0.7), kits=(KITS[kit_a], KITS[kit_b]),
        light=rng.uniform(0.85, 1.12), line_alpha=rng.uniform(0.25, 0.45))


def _jitter_color(rng: np.random.Generator, color, amount: float = 12.0):
    return tuple(np.clip(np.asarray(color, float) + rng.normal(0, amount, 3), 0, 255).tolist())


def _make_player(rng: np.random.Generator, style: MatchStyle | None, head0: np.ndarray,
                 frames: int, scale: float, velocity: np.ndarray | None = None) -> Player:
    """A player whose head starts at `head0`; `style=None` leaves the colours for `_dress`."""
    if velocity is None:
        velocity = rng.uniform(-0.5, 0.5, size=2) * scale
    t = np.arange(frames)[:, None]
    radii = rng.uniform(*zip(HEAD_R, BODY_RX, BODY_RY)) * scale
    player = Player(head=head0[None, :] + velocity[None, :] * t, head_r=float(radii[0]),
                    body_rx=float(radii[1]), body_ry=float(radii[2]),
                    kit=(0.0, 0.0, 0.0), skin=(0.0, 0.0, 0.0), hair=(0.0, 0.0, 0.0))
    if style is not None:
        _dress(rng, style, player)
    return player


def _dress(rng: np.random.Generator, style: MatchStyle, player: Player) -> None:
    player.kit = _jitter_color(rng, style.kits[rng.integers(2)])
    player.skin = _jitter_color(rng, SKINS[rng.integers(len(SKINS))], 8)
    player.hair = _jitter_color(rng, HAIRS[rng.integers(len(HAIRS))], 8)


def _ball_path(p_contact: np.ndarray, v_in: np.ndarray, v_out: np.ndarray, accel: np.ndarray,
               contact: int, frames: int) -> np.ndarray:
    """Ball centres: v_in up to the contact frame, v_out after it, plus a slight curve."""
    t = np.arange(frames, dtype=float) - contact
    v = np.where(t[:, None] <= 0, v_in[None, :], v_out[None, :])
    return p_contact[None, :] + v * t[:, None] + 0.5 * accel[None, :] * (t ** 2)[:, None]


def _reflect(v: np.ndarray, normal: np.ndarray) -> np.ndarray:
    return v - 2.0 * float(v @ normal) * normal


def _bounce(rng: np.random.Generator, v_in: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Outgoing velocity: mirrored about the surface normal, a little spin, some speed lost."""
    spin = rng.uniform(-0.2, 0.2)
    keep = rng.uniform(*RESTITUTION)
    return _rotate(_reflect(v_in, normal), spin) * keep


def _try_scene(rng: np.random.Generator, style: MatchStyle, kind: str, frames: int,
               size: int) -> Scene | None:
    """One random draw of a scene of `kind`; None when the draw breaks a rule (retry)."""
    s = size / 64.0
    contact = frames // 2             # the annotated frame is the middle of the window
    # the ball at the contact frame sits near the centre (upstream crops around the ball)
    p = np.full(2, size / 2.0) + rng.uniform(-CONTACT_JITTER, CONTACT_JITTER, size=2) * s
    ball_r = rng.uniform(*BALL_R) * s
    speed = rng.uniform(*BALL_SPEED) * s
    accel = _unit(rng.uniform(0, 2 * math.pi)) * rng.uniform(0, 0.08) * s
    ball_color = _jitter_color(rng, (245, 245, 240), 6)
    players: list[Player] = []
    target = None
    extra: dict = {}

    # the ball comes down into the picture (a cross, a high ball; image y points down)
    d_in = _unit(math.radians(INCOMING_ANGLE_DEG + rng.uniform(-1, 1) * INCOMING_SPREAD_DEG))
    v_in = d_in * speed

    if kind in ("header", "pass_behind", "near_miss"):
        head_r = rng.uniform(*HEAD_R) * s
        if kind == "near_miss":
            gap = rng.uniform(*NEAR_MISS_GAP) * s
            # passing by: the normal is perpendicular to the path (closest approach at contact)
            normal = _rotate(np.array([-d_in[1], d_in[0]]) * rng.choice([-1.0, 1.0]),
                             rng.uniform(-0.15, 0.15))
        else:
            gap = rng.uniform(*TOUCH_GAP) * s
            # pass_behind comes in straighter, so that its path crosses the head
            max_deg = MAX_INCIDENCE_DEG if kind == "header" else 20.0
            normal = _rotate(-d_in, math.radians(rng.uniform(-max_deg, max_deg)))
        if normal[1] > 0.3:
            return None                   # normal = head centre -> ball; not from below the head
        head_c = p - normal * (head_r + ball_r + gap)
        if kind == "header":
            v_out = _bounce(rng, v_in, normal)
        else:
            v_out = v_in
        head_v = rng.uniform(-0.4, 0.4, size=2) * s
        player = _make_player(rng, style, head_c - head_v * contact, frames, s, head_v)
        player.head_r = head_r
        players.append(player)
        target = 0
    elif kind == "bounce_elsewhere":
        # the same turn as a header's, but off a foot or the ground, away from every head
        normal = _rotate(-d_in, math.radians(rng.uniform(-MAX_INCIDENCE_DEG, MAX_INCIDENCE_DEG)))
        v_out = _bounce(rng, v_in, normal)
        where = "foot" if rng.random() < 0.5 else "ground"
        extra["where"] = where
        if where == "foot":
            # a player at whose feet the ball turns (head placed from the body's proportions)
            head_v = rng.uniform(-0.4, 0.4, size=2) * s
            player = _make_player(rng, style, np.zeros(2), frames, s, head_v)
            leg = 0.55 * player.body_ry
            foot_offset = np.array([rng.uniform(-1.5, 1.5) * s,
                                    player.head_r + 1.7 * player.body_ry + leg])
            head_c = p - normal * ball_r - foot_offset
            player.head = head_c[None, :] + head_v[None, :] * (np.arange(frames) - contact)[:, None]
            players.append(player)
    else:  # no_event
        v_out = v_in

    ball = _ball_path(p, v_in, v_out, accel, contact, frames)

    # other players: somewhere in the picture, never involved with the ball; one that finds
    # no free spot is left out
    for _ in range(int(rng.integers(*BYSTANDERS)) + (1 if not players else 0)):
        for _attempt in range(20):
            head0 = rng.uniform((-0.1, -0.3), (1.1, 0.9)) * size
            bystander = _make_player(rng, None, head0, frames, s)
            if _bystander_fits(bystander, ball, ball_r, contact, size):
                _dress(rng, style, bystander)
                players.append(bystander)
                break
    if not players:
        return None                       # every clip shows at least one player

    scene = Scene(kind=kind, contact_frame=contact, ball=ball, ball_r=ball_r,
                  ball_color=ball_color, ball_behind=(kind == "pass_behind"), players=players,
                  target=target, extra=extra)
    if not _valid(scene, size):
        return None
    return scene


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _bystander_fits(player: Player, ball: np.ndarray, ball_r: float, contact: int,
                    size: int) -> bool:
    s = size / 64.0
    gaps = np.linalg.norm(ball - player.head, axis=1) - ball_r - player.head_r
    body = player.head[contact] + np.array([0.0, player.head_r + 0.85 * player.body_ry])
    return bool(gaps.min() >= FAR_GAP * s and gaps[contact] >= CONTACT_CLEARANCE * s
                and (0 <= body).all() and (body <= size).all())


def _valid(scene: Scene, size: int) -> bool:
    """The rules that make the label true: who touches which head, and when."""
    s = size / 64.0
    gaps = scene.head_gaps()
    c = scene.contact_frame
    others = [i for i in range(len(scene.players)) if i != scene.target]
    if others and gaps[:, others].min() < FAR_GAP * s:
        return False                      # no accidental events with bystanders
    if others and gaps[c, others].min() < CONTACT_CLEARANCE * s:
        return False                      # only the target's head is near the ball at contact
    if scene.target is not None:
        g = gaps[:, scene.target]
        if scene.kind == "header":
            # touching at the contact frame only, clearly apart before and after
            if not TOUCH_GAP[0] * s - 0.05 <= g[c] <= TOUCH_GAP[1] * s + 0.05:
                return False
            if np.delete(g, c).min() < 1.0 * s:
                return False
        elif scene.kind == "near_miss":
            if g.min() < NEAR_MISS_GAP[0] * s - 0.05 or g[c] > NEAR_MISS_GAP[1] * s + 0.5:
                return False
        elif scene.kind == "pass_behind":
            if not TOUCH_GAP[0] * s - 0.05 <= g[c] <= TOUCH_GAP[1] * s + 0.05:
                return False
            after = g[c + 1:c + 4]
            if len(after) and after.min() > -scene.ball_r:
                return False              # its centre must go behind the head
    # the event must be on screen: the ball inside the frame around the contact
    lo, hi = max(0, c - 2), min(len(scene.ball), c + 3)
    inside = (scene.ball[lo:hi] > 1) & (scene.ball[lo:hi] < size - 1)
    if not inside.all():
        return False
    return True


def make_scene(rng: np.random.Generator, style: MatchStyle, kind: str, frames: int,
               size: int) -> Scene:
    for _ in range(500):
        scene = _try_scene(rng, style, kind, frames, size)
        if scene is not None:
            return scene
    fail(f"could not place a '{kind}' clip at --size {size} --frames {frames}; "
         f"try a larger --size or --frames")


# --- rendering ----------------------------------------------------------------------------


def _background(rng: np.random.Generator, style: MatchStyle, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    along = xx * math.cos(style.stripe_angle) + yy * math.sin(style.stripe_angle)
    period = style.stripe_period * size
    stripes = np.sign(np.sin(2 * math.pi * (along + rng.uniform(0, period)) / period))
    img = style.grass[None, None, :] * (1 + rng.normal(0, 0.04)) + (
        style.stripe_amp * stripes)[:, :, None]
    img = img + rng.normal(0, GRASS_NOISE, size=(size, size, 1))
    img = img + rng.normal(0, 2.5, size=(size, size, 3))
    # the odd field line: thin, faint, never as white as the ball
    for _ in range(int(rng.choice(LINES))):
        angle = rng.uniform(0, math.pi)
        offset = rng.uniform(0.1, 0.9) * size
        d = np.abs((xx - size / 2) * -math.sin(angle) + (yy - size / 2) * math.cos(angle)
                   - (offset - size / 2))
        width = rng.uniform(0.5, 1.0) * size / 64
        cover = np.clip(width + 0.5 - d, 0, 1) * style.line_alpha
        img = img * (1 - cover[:, :, None]) + 235.0 * cover[:, :, None]
    return img.astype(np.float32)


class _Canvas:
    """A float image plus pixel grids; shapes are painted only inside their bounding box."""

    def __init__(self, img: np.ndarray):
        self.img = img
        size = img.shape[0]
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def _box(self, x0, x1, y0, y1):
        n = self.img.shape[0]
        xa, xb = max(0, int(math.floor(x0)) - 1), min(n, int(math.ceil(x1)) + 2)
        ya, yb = max(0, int(math.floor(y0)) - 1), min(n, int(math.ceil(y1)) + 2)
        if xa >= xb or ya >= yb:
            return None
        return slice(ya, yb), slice(xa, xb)

    def paint(self, box, cover, color) -> None:
        cover = cover[:, :, None]
        region = self.img[box]
        region *= 1 - cover
        region += cover * np.asarray(color, dtype=np.float32)

    def disc(self, cx, cy, r, color, alpha=1.0) -> np.ndarray | None:
        box = self._box(cx - r, cx + r, cy - r, cy + r)
        if box is None:
            return None
        xx, yy = self.xx[box], self.yy[box]
        cover = np.clip(r + 0.5 - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2), 0.0, 1.0) * alpha
        self.paint(box, cover, color)
        return cover

    def ellipse(self, cx, cy, rx, ry, color) -> None:
        box = self._box(cx - rx, cx + rx, cy - ry, cy + ry)
        if box is None:
            return
        xx, yy = self.xx[box], self.yy[box]
        d = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        self.paint(box, np.clip((1.0 - d) * min(rx, ry) + 0.5, 0.0, 1.0), color)

    def bar(self, cx, y0, y1, half_width, color) -> None:
        box = self._box(cx - half_width, cx + half_width, y0, y1)
        if box is None:
            return
        xx, yy = self.xx[box], self.yy[box]
        cover = (np.clip(half_width + 0.5 - np.abs(xx - cx), 0, 1)
                 * np.clip(np.minimum(yy - y0, y1 - yy) + 0.5, 0, 1))
        self.paint(box, cover, color)

    def hair(self, cx, cy, r, color) -> None:
        """The top of a head disc (y above cy - 0.35 r)."""
        box = self._box(cx - r, cx + r, cy - r, cy)
        if box is None:
            return
        xx, yy = self.xx[box], self.yy[box]
        head = np.clip(r + 0.5 - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2), 0.0, 1.0)
        self.paint(box, head * np.clip((cy - 0.35 * r) - yy + 0.5, 0, 1), color)


def _draw_player(canvas: _Canvas, player: Player, t: int) -> None:
    hx, hy = player.head[t]
    body_cy = hy + player.head_r + 0.85 * player.body_ry
    leg_top = body_cy + 0.6 * player.body_ry
    leg_len = 0.55 * player.body_ry + player.head_r * 0.3
    for side in (-1, 1):
        canvas.bar(hx + side * 0.4 * player.body_rx, leg_top, leg_top + leg_len, 0.9, (30, 30, 35))
    canvas.ellipse(hx, body_cy, player.body_rx, player.body_ry, player.kit)
    canvas.disc(hx, hy, player.head_r, player.skin)
    canvas.hair(hx, hy, player.head_r, player.hair)


def _draw_ball(canvas: _Canvas, scene: Scene, t: int) -> None:
    bx, by = scene.ball[t]
    canvas.disc(bx, by, scene.ball_r, scene.ball_color)
    # a darker patch so the ball reads as a ball, not a dot of line paint
    canvas.disc(bx + 0.3 * scene.ball_r, by + 0.3 * scene.ball_r, 0.45 * scene.ball_r,
                (60, 60, 60), alpha=0.5)


def render(rng: np.random.Generator, style: MatchStyle, scene: Scene, size: int) -> np.ndarray:
    """uint8 (T, size, size, 3)."""
    frames = len(scene.ball)
    background = _background(rng, style, size)
    canvas = _Canvas(background.copy())
    out = np.empty((frames, size, size, 3), dtype=np.float32)
    for t in range(frames):
        canvas.img[:] = background
        if scene.ball_behind:
            _draw_ball(canvas, scene, t)
        for player in scene.players:
            _draw_player(canvas, player, t)
        if not scene.ball_behind:
            _draw_ball(canvas, scene, t)
        out[t] = canvas.img
    out *= style.light * rng.uniform(0.93, 1.07)
    out += rng.standard_normal(size=out.shape, dtype=np.float32) * np.float32(FRAME_NOISE)
    return np.clip(out, 0, 255).astype(np.uint8)


# --- dataset ------------------------------------------------------------------------------


def _kinds_for_match(rng: np.random.Generator, n: int) -> list[str]:
    n_pos = max(1, round(n * POSITIVE_FRACTION))
    n_neg = n - n_pos
    names = list(NEGATIVE_MIX)
    counts = np.floor(np.array([NEGATIVE_MIX[k] for k in names]) * n_neg).astype(int)
    for i in np.argsort(-np.array([NEGATIVE_MIX[k] for k in names]))[: n_neg - counts.sum()]:
        counts[i] += 1
    kinds = ["header"] * n_pos + [k for k, c in zip(names, counts) for _ in range(c)]
    return [kinds[i] for i in rng.permutation(len(kinds))]


def _check_args(seed: int, matches: int, clips_per_match: int, size: int, frames: int) -> None:
    if seed < 0:
        fail(f"--seed must be >= 0, got {seed}")
    if matches < 1:
        fail(f"--matches must be >= 1, got {matches}")
    if clips_per_match < 4:
        fail(f"--clips_per_match must be >= 4 (one positive per three negatives), "
             f"got {clips_per_match}")
    if size < MIN_SIZE:
        fail(f"--size must be >= {MIN_SIZE}, got {size}")
    if frames < MIN_FRAMES:
        fail(f"--frames must be >= {MIN_FRAMES}, got {frames}")


def _prepare_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        fail(f"{out_dir}: exists and is not a folder")
    check_writable_dir(out_dir, "--out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            fail(f"{out_dir}: folder exists and is not empty; pass --overwrite to replace "
                 f"the demo dataset in it, or choose another --out")
        # remove only what this generator writes (its own clip names); anything else stays
        (out_dir / CSV_NAME).unlink(missing_ok=True)
        clip_dir = out_dir / CLIP_DIR
        if clip_dir.is_dir():
            # clips, their meta files, and temp files an interrupted run left behind
            for pattern in (f"{MATCH_PREFIX}*_s.npy", f"{MATCH_PREFIX}*_meta.json"):
                for f in clip_dir.glob(pattern):
                    f.unlink()
            remove_stale_temps(clip_dir)
    (out_dir / CLIP_DIR).mkdir(parents=True, exist_ok=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def generate(out_dir: Path, *, seed: int = 0, matches: int = 8, clips_per_match: int = 100,
             size: int = 64, frames: int = 12, overwrite: bool = False) -> Path:
    """Write the demo dataset into `out_dir`; return the path of `all_clips.csv`.

    Refuses (HeaderNetError) a non-empty `out_dir` unless `overwrite`, which deletes only the
    files this generator writes (all_clips.csv, clips/demo-match-*_s.npy and _meta.json). The CSV is
    written last, so its presence means the dataset is complete.
    """
    out_dir = Path(out_dir)
    _check_args(seed, matches, clips_per_match, size, frames)
    _prepare_dir(out_dir, overwrite)
    rows = []
    for m in range(matches):
        style = _match_style(np.random.default_rng([seed, m, 1_000_003]))
        video_id = f"{MATCH_PREFIX}{m:02d}"
        kinds = _kinds_for_match(np.random.default_rng([seed, m, 1_000_033]), clips_per_match)
        # frame numbers like upstream's samples: increasing, well apart, two halves
        layout = np.random.default_rng([seed, m, 1_000_037])
        n_first = clips_per_match // 2
        frame_no = {1: 0, 2: 0}
        for i, kind in enumerate(kinds):
            rng = np.random.default_rng([seed, m, i])
            scene = make_scene(rng, style, kind, frames, size)
            clip = render(rng, style, scene, size)
            keep = np.arange(frames)
            if rng.random() < SHORT_CLIP_FRACTION:
                droppable = [t for t in range(frames) if t != scene.contact_frame]
                drop = rng.choice(droppable, size=int(rng.integers(1, 3)), replace=False)
                keep = np.setdiff1d(keep, drop)
                clip = clip[keep]
            grey = bool(rng.random() < GREY_CLIP_FRACTION)
            if grey:
                lum = clip.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
                clip = np.repeat(np.clip(lum + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=3)
            half = 1 if i < n_first else 2
            frame_no[half] += int(layout.integers(60, 400))
            label = int(kind in POSITIVE_KINDS)
            base = f"{CLIP_DIR}/{video_id}_half{half}_{frame_no[half]:06d}_{label}"
            contact = int(np.searchsorted(keep, scene.contact_frame))
            gaps = scene.head_gaps()[keep]
            meta = {
                "video_id": video_id, "half": half, "frame": frame_no[half], "label": label,
                "kind": kind, "contact_frame": contact, "grey": grey,
                "kept_frames": keep.tolist(), "size": size,
                "ball": {"r": scene.ball_r, "centers": scene.ball[keep].round(3).tolist(),
                         "drawn_behind_players": scene.ball_behind},
                "heads": [{"r": p.head_r, "centers": p.head[keep].round(3).tolist()}
                          for p in scene.players],
                "target_player": scene.target, **scene.extra,
            }
            _save_npy(out_dir / f"{base}_s.npy", clip)
            write_text(out_dir / f"{base}_meta.json", json.dumps(meta) + "\n")
            rows.append({"path": base, "label": label, "video_id": video_id, "half": half,
                         "frame": frame_no[half], "kind": kind, "contact_frame": contact,
                         "min_head_gap": round(float(gaps.min()), 3), "num_frames": len(keep),
                         "grey": int(grey)})
    csv_path = out_dir / CSV_NAME
    write_csv(pd.DataFrame(rows), csv_path)
    return csv_path


# --- CLI ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(
        prog="python -m headernet_core.demo_data",
        description="Write a small synthetic header dataset (legacy .npy clips + one CSV "
                    "to split).")
    parser.add_argument("--out", required=True, help="output folder (must be empty or new)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    parser.add_argument("--matches", type=int, default=8,
                        help="number of matches (video_id values)")
    parser.add_argument("--clips_per_match", type=int, default=100, help="clips per match")
    parser.add_argument("--size", type=int, default=64, help="frame side S in pixels")
    parser.add_argument("--frames", type=int, default=12,
                        help="frames T per clip (a few get fewer)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the demo files in a non-empty --out")
    args = parser.parse_args(argv)

    def body() -> None:
        start = time.perf_counter()
        csv_path = generate(Path(args.out), seed=args.seed, matches=args.matches,
                            clips_per_match=args.clips_per_match, size=args.size,
                            frames=args.frames, overwrite=args.overwrite)
        df = pd.read_csv(csv_path)
        kinds = ", ".join(f"{k} {int((df['kind'] == k).sum())}" for k in KINDS)
        print(f"wrote {len(df)} clips ({int(df['label'].sum())} positives, "
              f"{int((df['label'] == 0).sum())} negatives) from {df['video_id'].nunique()} "
              f"matches in {time.perf_counter() - start:.1f}s")
        print(f"  kinds: {kinds}")
        print(f"  clips: uint8 (T, {args.size}, {args.size}, 3), T={args.frames} "
              f"({int((df['num_frames'] < args.frames).sum())} shorter), "
              f"{int(df['grey'].sum())} grey")
        print(f"  csv: {csv_path}")
        print("next: python -m headernet_core.split_dataset "
              f"--input_csv {shlex.quote(str(csv_path))} "
              f"--output_dir {shlex.quote(str(Path(args.out) / 'splits'))}")

    run_cli(body)


if __name__ == "__main__":
    main()
