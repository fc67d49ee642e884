"""Mixup/cutmix and the EMA of weights, tested by their properties: the same cutmix box on every
frame, box area = 1 - λ, targets mixed by λ, draws reproducible from (seed, epoch, batch); the
EMA equals the closed-form average of the recorded weights, validation and the best checkpoint
use it, and a run with both resumes bit for bit."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from headernet_core.metrics import MEASURED_METRICS
from headernet_core import trainer as trainer_module
from headernet_core.config import TrainConfig
from headernet_core.ema import ema_decay
from headernet_core.errors import HeaderNetError
from headernet_core.evaluation import evaluate
from headernet_core.losses import FocalLoss
from headernet_core.mixup import ClipMix, mix_targets
from headernet_core.trainer import main, train

LABELS = torch.tensor([1, 0, 0, 0, 0])   # clip 0 (a header) is paired with clip 4: λ = targets[0, 1]


def clips(batch: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, 3, 4, 16, 12), generator=torch.Generator().manual_seed(seed))


def test_cutmix_pastes_one_box_on_every_frame_with_area_one_minus_lambda():
    mix = ClipMix(mixup=0.0, cutmix=1.0, prob=1.0, switch_prob=0.5, seed=3)
    x = clips()
    boxes = set()
    for batch in range(30):
        mixed, targets = mix(x, LABELS, epoch=1, batch=batch)
        lam = float(targets[0, 1])
        assert torch.allclose(targets.sum(1), torch.ones(5))
        assert targets[0, 0] == pytest.approx(1 - lam)   # the partner's label gets 1 - λ
        changed = (mixed[0] != x[0])                      # (C, T, H, W)
        assert (changed == changed[0, 0]).all()           # the same pixels of every channel and frame
        rows, cols = changed[0, 0].any(1).nonzero(), changed[0, 0].any(0).nonzero()
        if len(rows):
            box = changed[0, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()                              # one rectangle
            boxes.add((int(rows.min()), int(cols.min())))
        assert changed[0, 0].sum().item() / (16 * 12) == pytest.approx(1 - lam, abs=1e-6)
        assert lam == pytest.approx(mix.draw(1, batch, 16, 12).lam, abs=1e-6)   # float32 targets
        torch.testing.assert_close(mixed[0][changed], x[4][changed], rtol=0, atol=0)
    assert len(boxes) > 5                                 # boxes move between batches


def test_mixup_blends_clips_and_targets_by_the_same_lambda():
    mix = ClipMix(mixup=0.8, cutmix=0.0, prob=1.0, switch_prob=0.5, seed=3)
    x = clips()
    lams = []
    for batch in range(20):
        mixed, targets = mix(x, LABELS, epoch=2, batch=batch)
        lam = float(targets[0, 1])
        torch.testing.assert_close(mixed[0], lam * x[0] + (1 - lam) * x[4])
        torch.testing.assert_close(mixed[1], lam * x[1] + (1 - lam) * x[3])
        lams.append(lam)
    assert len(set(lams)) == 20 and 0 < min(lams) and max(lams) < 1


def test_an_odd_batch_leaves_its_middle_clip_and_label_unmixed():
    mix = ClipMix(mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5, seed=0)
    x = clips()
    for batch in range(10):
        mixed, targets = mix(x, LABELS, epoch=1, batch=batch)
        torch.testing.assert_close(mixed[2], x[2])
        assert targets[2].tolist() == [1.0, 0.0]


def test_draws_are_reproducible_from_seed_epoch_and_batch():
    x = clips()
    a = ClipMix(mixup=0.8, cutmix=1.0, prob=0.7, switch_prob=0.5, seed=11)
    b = ClipMix(mixup=0.8, cutmix=1.0, prob=0.7, switch_prob=0.5, seed=11)
    for epoch, batch in ((1, 0), (1, 5), (3, 2)):
        ma, ta = a(x, LABELS, epoch, batch)
        a(x, LABELS, epoch + 1, batch)                      # other draws in between change nothing
        mb, tb = b(x, LABELS, epoch, batch)
        assert torch.equal(ma, mb) and torch.equal(ta, tb)
    draws = {a.draw(e, i, 16, 12) for e in (1, 2) for i in range(20)}
    assert len(draws) > 20                                 # ~30% of batches are not mixed
    assert a.draw(1, 0, 16, 12) != ClipMix(0.8, 1.0, 0.7, 0.5, seed=12).draw(1, 0, 16, 12)


def test_probability_and_switch_follow_the_official_meaning():
    both = ClipMix(mixup=0.8, cutmix=1.0, prob=0.5, switch_prob=0.25, seed=0)
    draws = [both.draw(1, i, 16, 12) for i in range(2000)]
    mixed = [d for d in draws if d.lam != 1.0 or d.box is not None]
    cut = [d for d in mixed if d.box is not None]
    assert len(mixed) / len(draws) == pytest.approx(0.5, abs=0.05)
    assert len(cut) / len(mixed) == pytest.approx(0.25, abs=0.05)
    off = ClipMix(mixup=0.8, cutmix=1.0, prob=0.0, switch_prob=0.5, seed=0)
    x = clips()
    mixed_x, targets = off(x, LABELS, 1, 0)
    assert torch.equal(mixed_x, x) and torch.equal(targets, mix_targets(LABELS, 1.0))


def test_focal_loss_of_soft_targets():
    """A soft target (B, 2) gives sum_c y_c alpha_c (1 - p_c)^gamma (-log p_c), checked against
    that sum written out with the math module (the loss shares one formula for labels and soft
    targets, so comparing it with its own hard-label value would prove nothing)."""
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)) * 3
    hard = torch.tensor([1, 0, 1, 1, 0, 0])
    lam, alpha, gamma = 0.3, 0.7, 2.0
    targets = mix_targets(hard, lam)   # lam of each clip's own label, 1 - lam of its partner's

    def term(l0: float, l1: float, c: int) -> float:
        log_p = (l1 if c == 1 else l0) - math.log(math.exp(l0) + math.exp(l1))
        return (alpha if c == 1 else 1 - alpha) * (1 - math.exp(log_p)) ** gamma * -log_p

    expected = sum(float(y0) * term(l0, l1, 0) + float(y1) * term(l0, l1, 1)
                   for (l0, l1), (y0, y1) in zip(logits.tolist(), targets.tolist())) / len(hard)
    assert targets[:, 1].tolist() != hard.tolist()   # really mixed
    assert FocalLoss(alpha=alpha, gamma=gamma)(logits, targets).item() == pytest.approx(expected, rel=1e-5)


def test_a_frozen_feature_cache_refuses_mixing(tiny_data, tmp_path, capsys):
    with pytest.raises(HeaderNetError, match="--no-feature_cache"):
        TrainConfig(finetune_mode="frozen", cutmix=1.0).validate(need_data=False)
    TrainConfig(finetune_mode="frozen", cutmix=1.0, feature_cache=False).validate(need_data=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--train_csv", str(tiny_data["train_csv"]), "--val_csv", str(tiny_data["val_csv"]),
              "--finetune_mode", "frozen", "--mixup", "0.8", "--output_root", str(tmp_path / "runs"),
              "--cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: --mixup/--cutmix")
    assert not (tmp_path / "runs").exists()


# --- in the trainer -----------------------------------------------------------------------
def test_soft_targets_reach_the_loss_with_neg_pos_ratio(tiny_config, monkeypatch):
    seen: list[torch.Tensor] = []
    real = trainer_module.build_loss

    def spy(*args, **kwargs):
        loss = real(*args, **kwargs)
        return lambda logits, target: seen.append(target) or loss(logits, target)
    monkeypatch.setattr(trainer_module, "build_loss", spy)
    result = train(tiny_config(epochs=1, mixup=0.8, cutmix=1.0, neg_pos_ratio="1", batch_size=5,
                               loss="ce"), log=lambda _: None)
    train_targets = seen[:3]      # 6 positives + 6 negatives in batches of 5, 5, 2
    assert [t.shape for t in train_targets] == [(5, 2), (5, 2), (2, 2)]
    assert all(t.is_floating_point() for t in train_targets)
    assert any(((t > 0) & (t < 1)).any() for t in train_targets)
    assert all(t.dtype == torch.long for t in seen[3:])   # validation: hard labels
    assert result.best_metrics["train_clips"] == 12


def _recording_steps(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Every optimizer step's model state, recorded by a hook on the run's optimizer."""
    states: list[dict[str, torch.Tensor]] = []
    real = trainer_module.build_optimizer

    def build(model, *args, **kwargs):
        optimizer = real(model, *args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: states.append(
            {k: v.detach().clone().double() for k, v in model.state_dict().items()}))
        return optimizer
    monkeypatch.setattr(trainer_module, "build_optimizer", build)
    return states


@pytest.mark.parametrize("cap", [0.999, 0.5])   # 0.5: the cap binds from step 3 on
def test_ema_is_the_closed_form_average_of_the_recorded_weights(tiny_config, monkeypatch, cap):
    states = _recording_steps(monkeypatch)
    result = train(tiny_config(epochs=1, model_ema=True, model_ema_decay=cap), log=lambda _: None)
    assert len(states) == 5                                        # 18 clips in batches of 4
    expected = dict(states[0])
    for step, state in enumerate(states[1:], start=2):
        d = ema_decay(step, cap)
        assert d == (min(cap, 1 - step ** -0.75))
        expected = {k: d * expected[k] + (1 - d) * state[k] for k in expected}
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(last["model_ema"][key].double(), value, rtol=0, atol=1e-6)
    torch.testing.assert_close(last["state_dict"], {k: v.float() for k, v in states[-1].items()})


def test_validation_and_the_best_checkpoint_use_the_ema(tiny_config, tiny_data):
    result = train(tiny_config(epochs=1, model_ema=True), log=lambda _: None)
    last = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(result.best_checkpoint, weights_only=True)
    for key, value in last["model_ema"].items():
        assert torch.equal(best["state_dict"][key], value)
    assert any(not torch.equal(last["state_dict"][k], v) for k, v in last["model_ema"].items())
    metrics, _ = evaluate(result.best_checkpoint, tiny_data["val_csv"])
    for key in ("val_loss", "val_auc", "val_f1", "val_acc"):
        assert metrics[key] == pytest.approx(result.best_metrics[key], abs=1e-6, nan_ok=True)
    csv = pd.read_csv(result.run_dir / "metrics_epoch.csv")
    assert list(csv["eval_weights"]) == ["ema"]
    plain = train(tiny_config(epochs=1, run_name="plain"), log=lambda _: None)
    assert list(pd.read_csv(plain.run_dir / "metrics_epoch.csv")["eval_weights"]) == ["model"]


def test_mixup_cutmix_ema_run_resumes_bit_for_bit(tiny_config):
    knobs = {"epochs": 3, "mixup": 0.8, "cutmix": 1.0, "model_ema": True, "batch_size": 5,
             "neg_pos_ratio": "2"}
    straight = train(tiny_config(run_name="straight", **knobs), log=lambda _: None)
    stopped = train(tiny_config(run_name="split", **knobs), on_epoch=lambda r: r.epoch == 2,
                    log=lambda _: None)
    assert stopped.epochs_done == 2
    resumed = train(tiny_config(run_name="split", resume=True, **knobs), log=lambda _: None)
    timing = list(MEASURED_METRICS)
    a = pd.read_csv(straight.run_dir / "metrics_epoch.csv").drop(columns=timing)
    b = pd.read_csv(resumed.run_dir / "metrics_epoch.csv").drop(columns=timing)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    wa = torch.load(straight.run_dir / "checkpoints" / "last.pt", weights_only=True)
    wb = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)
    for part in ("state_dict", "model_ema"):
        assert wa[part].keys() == wb[part].keys()
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part])


def test_no_new_flag_leaves_mixing_and_ema_off():
    config = TrainConfig()
    assert (config.mixup, config.cutmix, config.model_ema) == (0.0, 0.0, False)
    assert ClipMix.from_config(config) is None
