"""headernet_core.augment: the device half of the input pipeline does what its docstring says
(crop-resize, flip, brightness/contrast, normalisation) for whole batches, reproducibly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as TF

from headernet_core.augment import DeviceTransform, normalize, resize_weights
from headernet_core.data import ClipBatch, ClipDataset, ClipTransform, sample_frame_indices

CPU = torch.device("cpu")


def pixels(size: int) -> DeviceTransform:
    """mean 0, std 1/255: the output is in grey levels 0..255."""
    return DeviceTransform(size, mean=[0.0] * 3, std=[1 / 255] * 3)


def batch_of(frames: np.ndarray | torch.Tensor, *aug_rows: tuple[float, ...]) -> ClipBatch:
    frames = torch.as_tensor(frames)
    if frames.ndim == 4:
        frames = frames[None].expand(len(aug_rows), *frames.shape).contiguous()
    n = len(aug_rows)
    return ClipBatch(frames, torch.tensor(aug_rows, dtype=torch.float32), torch.zeros(n, dtype=torch.int64),
                     torch.arange(n))


def random_clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("length,out", [(256, 224), (205, 224), (64, 64), (100, 32), (37, 64), (512, 224)])
def test_resize_weights_equal_torch_antialiased_bilinear(length, out):
    x = torch.rand(1, 3, 2, 50, length, dtype=torch.float64) * 255
    weights = resize_weights(torch.tensor([length]), out, length).to(torch.float64)
    ours = torch.einsum("bcthw,bvw->bcthv", x, weights)
    ref = nnf.interpolate(x.reshape(1, 6, 50, length), size=(50, out), mode="bilinear",
                          antialias=True, align_corners=False).reshape(1, 3, 2, 50, out)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=0)


def test_padding_never_contributes_and_a_batch_equals_its_clips_alone():
    small, large = random_clip(3, 20, 20, seed=1), random_clip(3, 30, 30, seed=2)
    padded = np.zeros((2, 3, 30, 30, 3), np.uint8)
    padded[0, :, :20, :20], padded[1] = small, large
    padded[0, :, 20:] = 255  # garbage in the padding must not leak in
    together = pixels(16)(batch_of(padded, (20, 20, 1, 1.1, 0.9), (30, 30, 0, 0.9, 1.2)), CPU)
    alone = [pixels(16)(batch_of(small, (20, 20, 1, 1.1, 0.9)), CPU),
             pixels(16)(batch_of(large, (30, 30, 0, 0.9, 1.2)), CPU)]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-3, rtol=0)


def test_eval_resize_is_the_antialiased_resize_of_the_whole_frame_and_deterministic():
    clip = random_clip(4, 40, 30)
    batch = batch_of(clip, (40, 30, 0, 1, 1))
    out = pixels(24)(batch, CPU)
    assert out.shape == (1, 3, 4, 24, 24) and out.dtype == torch.float32
    ref = nnf.interpolate(torch.from_numpy(clip).permute(3, 0, 1, 2).float(), size=(24, 24),
                          mode="bilinear", antialias=True)
    torch.testing.assert_close(out[0], ref, atol=1e-3, rtol=0)
    assert torch.equal(out, pixels(24)(batch, CPU))
    # a clip already at the input size passes through untouched
    same = random_clip(2, 24, 24)
    torch.testing.assert_close(pixels(24)(batch_of(same, (24, 24, 0, 1, 1)), CPU)[0],
                               torch.from_numpy(same).permute(3, 0, 1, 2).float(), atol=1e-4, rtol=0)


def test_a_flip_flips_every_frame():
    clip = random_clip(5, 16, 16)
    plain = pixels(12)(batch_of(clip, (16, 16, 0, 1, 1)), CPU)
    flipped = pixels(12)(batch_of(clip, (16, 16, 1, 1, 1)), CPU)
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-4, rtol=0)
    same_size = pixels(16)(batch_of(clip, (16, 16, 1, 1, 1)), CPU)
    torch.testing.assert_close(same_size[0], torch.from_numpy(clip[:, :, ::-1].copy()).permute(3, 0, 1, 2).float(),
                               atol=1e-4, rtol=0)


def test_a_crop_crops(tmp_path):
    """Loader + device together: the output is the resize of exactly the drawn crop box."""
    clip = random_clip(6, 48, 40, seed=3)
    np.save(tmp_path / "c.npy", clip)
    transform = ClipTransform(num_frames=3, size=20, train=True, seed=1, crop_scale=0.5, flip=0.0, jitter=0.0)
    dataset = ClipDataset([str(tmp_path / "c.npy")], [1], transform)
    out = pixels(20)(dataset[(0, 4)], CPU)
    top, left, side = transform.params(4, 0).crop_box(48, 40)
    assert side < 40
    box = clip[sample_frame_indices(6, 3), top:top + side, left:left + side]
    ref = nnf.interpolate(torch.from_numpy(box).permute(3, 0, 1, 2).float(), size=(20, 20),
                          mode="bilinear", antialias=True)
    torch.testing.assert_close(out[0], ref, atol=1e-3, rtol=0)


def test_brightness_scales_and_contrast_keeps_each_frames_grey_mean():
    rng = np.random.default_rng(0)
    clip = rng.integers(60, 140, (3, 8, 8, 3), dtype=np.uint8)  # nothing clamps at 1.2x
    clip[1] //= 2  # another mean per frame
    plain = pixels(8)(batch_of(clip, (8, 8, 0, 1, 1)), CPU)[0]
    bright = pixels(8)(batch_of(clip, (8, 8, 0, 1.2, 1)), CPU)[0]
    torch.testing.assert_close(bright, plain * 1.2, atol=1e-3, rtol=0)
    assert bright.mean() > plain.mean() * 1.19

    flat = pixels(8)(batch_of(clip, (8, 8, 0, 1, 0.5)), CPU)[0]
    grey = torch.tensor([0.2989, 0.587, 0.114]).view(3, 1, 1, 1)
    grey_mean = (plain * grey).sum(0).mean(dim=(-2, -1))  # per frame
    # (torchvision's grey weights sum to 0.9999, hence the small tolerance)
    torch.testing.assert_close((flat * grey).sum(0).mean(dim=(-2, -1)), grey_mean, atol=0, rtol=1e-4)
    torch.testing.assert_close(flat, 0.5 * plain + 0.5 * grey_mean.view(1, 3, 1, 1), atol=1e-3, rtol=0)
    dark = pixels(8)(batch_of(clip, (8, 8, 0, 0.0, 1)), CPU)  # clamped into range, never negative
    assert dark.min() >= 0 and dark.max() == 0


def test_matches_torchvisions_uint8_pipeline_within_a_few_grey_levels():
    """The documented difference to the old CPU transform: float throughout vs rounding and
    truncating to uint8 after each torchvision op."""
    frames = torch.from_numpy(random_clip(4, 96, 96, seed=5)).permute(0, 3, 1, 2)
    top, left, side = 5, 9, 80
    old = TF.resized_crop(frames, top, left, side, side, [64, 64], antialias=True)
    old = TF.adjust_contrast(TF.adjust_brightness(TF.horizontal_flip(old), 1.08), 0.93).float()
    crop = frames[:, :, top:top + side, left:left + side].permute(0, 2, 3, 1)
    new = pixels(64)(batch_of(crop, (side, side, 1, 1.08, 0.93)), CPU)[0].permute(1, 0, 2, 3)
    difference = (new - old).abs()
    assert difference.max() < 3 and difference.mean() < 1.5


def test_grey_clips_stay_grey_and_every_frame_gets_the_same_augmentation():
    still = np.repeat(np.repeat(random_clip(1, 32, 32)[..., :1], 3, axis=-1), 6, axis=0)
    out = pixels(20)(batch_of(still, (24, 24, 1, 1.2, 0.8)), CPU)[0]
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert all(torch.equal(out[:, 0], out[:, t]) for t in range(6))


def test_normalisation_and_the_uint8_helper():
    clip = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1, 1).expand(2, 3, 2, 2, 2)
    out = normalize(clip, mean=[0.0, 0.2, 0.5], std=[1.0, 0.5, 0.25])
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2, 2)
    expected = torch.tensor([0.0, (0.2 - 0.2) / 0.5, (1.0 - 0.5) / 0.25])
    torch.testing.assert_close(out[0, :, 0, 0, 0], expected)
    with pytest.raises(ValueError, match="uint8"):
        normalize(out, mean=[0.5] * 3, std=[0.5] * 3)
    frames = clip.permute(0, 2, 3, 4, 1)[:, :, :1, :1].contiguous()  # (B, n, 1, 1, 3)
    device = DeviceTransform(1, mean=[0.0, 0.2, 0.5], std=[1.0, 0.5, 0.25])(
        batch_of(frames, (1, 1, 0, 1, 1), (1, 1, 0, 1, 1)), CPU)
    torch.testing.assert_close(device[0, :, 0, 0, 0], expected)


def test_same_draw_same_output_other_epoch_other_output(tmp_path):
    np.save(tmp_path / "c.npy", random_clip(8, 32, 32, seed=9))
    transform = ClipTransform(num_frames=4, size=24, train=True, seed=5, jitter=0.3)
    dataset = ClipDataset([str(tmp_path / "c.npy")], [1], transform)
    run = DeviceTransform(24, mean=[0.5] * 3, std=[0.5] * 3)
    a = run(dataset[(0, 2)], CPU)
    assert torch.equal(a, run(ClipDataset([str(tmp_path / "c.npy")], [1], transform)[(0, 2)], CPU))
    assert not torch.equal(a, run(dataset[(0, 3)], CPU))
