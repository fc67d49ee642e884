"""Validation metrics: names, agreement with scikit-learn, the threshold sweep's tie-breaks,
one-class and bad-input behaviour, and best-epoch selection."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from headernet_core.config import SELECTABLE_METRICS
from headernet_core.metrics import METRIC_KEYS, best_threshold, classification_metrics, is_improvement

# 12 clips, 4 headers. Pairs (pos, neg) ranked right: 4 + 7 + 7 + 8 = 26 of 32 -> AUC 0.8125.
# Sweep (positive when p >= t): t=0.65 gives tp=3, fp=1, fn=1 -> P = R = F1 = 0.75, the best.
# 0.5 rule (p > 0.5): tp=3, fp=3 (0.55, 0.60, 0.80), fn=1 -> P 0.5, R 0.75, F1 0.6, acc 8/12.
LABELS_12 = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
PROBS_12 = np.array([0.05, 0.10, 0.20, 0.30, 0.40, 0.55, 0.60, 0.80, 0.35, 0.65, 0.70, 0.90])


def test_keys_are_metric_keys_and_cover_selectable_metrics():
    out = classification_metrics(LABELS_12, PROBS_12, loss=0.5)
    assert tuple(out) == METRIC_KEYS
    assert set(SELECTABLE_METRICS) <= set(METRIC_KEYS)


def test_hand_built_example_known_values():
    out = classification_metrics(LABELS_12, PROBS_12, loss=0.42)
    assert out["val_loss"] == 0.42
    assert out["val_auc"] == pytest.approx(26 / 32)
    # AP = mean precision at each positive's rank: (1 + 2/3 + 3/4 + 4/8) / 4
    assert out["val_ap"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 8) / 4)
    assert out["val_threshold"] == 0.65
    assert (out["val_precision"], out["val_recall"], out["val_f1"]) == pytest.approx((0.75, 0.75, 0.75))
    assert (out["val_precision_05"], out["val_recall_05"], out["val_f1_05"]) == pytest.approx((0.5, 0.75, 0.6))
    assert out["val_acc"] == pytest.approx(8 / 12)
    assert out["val_clips"] == 12 and out["val_positives"] == 4


def test_hand_built_example_matches_sklearn():
    out = classification_metrics(LABELS_12, PROBS_12)
    pred_05 = (PROBS_12 > 0.5).astype(int)
    assert out["val_auc"] == pytest.approx(roc_auc_score(LABELS_12, PROBS_12))
    assert out["val_ap"] == pytest.approx(average_precision_score(LABELS_12, PROBS_12))
    assert out["val_acc"] == pytest.approx(accuracy_score(LABELS_12, pred_05))
    wp, wr, wf, _ = precision_recall_fscore_support(LABELS_12, pred_05, average="weighted")
    assert (out["val_weighted_precision"], out["val_weighted_recall"], out["val_weighted_f1"]) == \
        pytest.approx((wp, wr, wf))
    # Weighted F1 (upstream's legacy val_f1) is a different number from the positive-class F1.
    assert out["val_weighted_f1"] != pytest.approx(out["val_f1_05"])


def test_random_predictions_match_sklearn_and_brute_force_sweep():
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.2).astype(int)
    probs = np.clip(rng.normal(0.3 + 0.3 * labels, 0.2), 0, 1).round(3)  # rounding makes ties
    out = classification_metrics(labels, probs, loss=None)
    assert math.isnan(out["val_loss"])
    assert out["val_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert out["val_ap"] == pytest.approx(average_precision_score(labels, probs))
    # The sweep's F1 is the best sklearn F1 over every distinct score.
    best = max(f1_score(labels, (probs >= t).astype(int), zero_division=0) for t in np.unique(probs))
    assert out["val_f1"] == pytest.approx(best)
    p, r, f, _ = precision_recall_fscore_support(
        labels, (probs >= out["val_threshold"]).astype(int), average="binary")
    assert (out["val_precision"], out["val_recall"], out["val_f1"]) == pytest.approx((p, r, f))
    p, r, f, _ = precision_recall_fscore_support(labels, (probs > 0.5).astype(int), average="binary")
    assert (out["val_precision_05"], out["val_recall_05"], out["val_f1_05"]) == pytest.approx((p, r, f))


def test_threshold_is_inclusive():
    # The best cut puts exactly the clip scored 0.65 on the positive side.
    threshold, precision, recall, f1 = best_threshold(LABELS_12, PROBS_12)
    assert threshold == 0.65
    assert (precision, recall, f1) == pytest.approx((0.75, 0.75, 0.75))


def test_f1_tie_goes_to_higher_recall_even_when_farther_from_half():
    # t=0.55: P=1, R=0.5, F1=2/3 (near 0.5). t=0.1: P=0.5, R=1, F1=2/3 (far). Recall wins.
    labels = np.array([1, 0, 0, 1])
    probs = np.array([0.55, 0.30, 0.20, 0.10])
    threshold, precision, recall, f1 = best_threshold(labels, probs)
    assert threshold == 0.10
    assert (precision, recall, f1) == pytest.approx((0.5, 1.0, 2 / 3))


def test_f1_and_recall_tie_goes_to_threshold_closest_to_half(monkeypatch):
    # Distinct scores never give two cuts with equal F1 and recall, so feed the sweep a curve
    # that has them (as a grid sweep would) to check the last tie-break on its own.
    def fake_curve(y, p):
        return (np.array([0.5, 0.5, 0.5, 1.0]), np.array([1.0, 1.0, 1.0, 0.0]),
                np.array([0.2, 0.45, 0.7]))

    import sklearn.metrics
    monkeypatch.setattr(sklearn.metrics, "precision_recall_curve", fake_curve)  # imported at call time
    threshold, *_ = best_threshold(np.array([0, 1]), np.array([0.2, 0.7]))
    assert threshold == 0.45


def test_half_rule_ties_go_to_class_zero_like_argmax():
    logits = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.3, 0.3]])
    probs = torch.softmax(logits, dim=1)[:, 1].numpy()
    labels = np.array([1, 0, 1, 0])
    argmax = logits.argmax(dim=1).numpy()
    out = classification_metrics(labels, probs)
    assert out["val_acc"] == pytest.approx(accuracy_score(labels, argmax)) == pytest.approx(0.75)


@pytest.mark.parametrize("value", [0, 1])
def test_one_class_gives_nan_and_exactly_one_warning(value):
    labels = np.full(5, value)
    probs = np.array([0.1, 0.4, 0.5, 0.7, 0.9])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = classification_metrics(labels, probs, loss=1.0)
    assert len(caught) == 1 and "only one class" in str(caught[0].message)
    for key in ("val_auc", "val_ap", "val_precision", "val_recall", "val_f1", "val_threshold"):
        assert math.isnan(out[key]), key
    pred = (probs > 0.5).astype(int)
    assert out["val_acc"] == pytest.approx(accuracy_score(labels, pred))
    p, r, f, _ = precision_recall_fscore_support(labels, pred, average="binary", zero_division=0)
    assert (out["val_precision_05"], out["val_recall_05"], out["val_f1_05"]) == pytest.approx((p, r, f))
    assert not math.isnan(out["val_weighted_f1"])
    assert out["val_positives"] == 5 * value


def test_best_threshold_one_class_is_nan_with_warning():
    with pytest.warns(UserWarning, match="only one class"):
        result = best_threshold(np.zeros(3, dtype=int), np.array([0.1, 0.2, 0.3]))
    assert all(math.isnan(v) for v in result)


@pytest.mark.parametrize("labels, probs, match", [
    ([], [], "empty"),
    ([0, 1], [0.5], "differ in length"),
    ([0, 2], [0.1, 0.9], "0/1"),
    ([0, 1], [0.1, float("nan")], "NaN"),
    ([[0, 1]], [[0.1, 0.9]], "1-D"),
])
def test_bad_inputs_raise_value_error(labels, probs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(np.array(labels), np.array(probs))


# --- is_improvement ------------------------------------------------------------------------
NAN = float("nan")


@pytest.mark.parametrize("candidate, incumbent, metric, mode, expected", [
    ({"val_f1": 0.5}, None, "val_f1", "max", True),
    ({"val_f1": NAN}, None, "val_f1", "max", True),                      # nothing better exists
    ({"val_f1": 0.8}, {"val_f1": 0.7}, "val_f1", "max", True),
    ({"val_f1": 0.7}, {"val_f1": 0.8}, "val_f1", "max", False),
    ({"val_loss": 0.3}, {"val_loss": 0.4}, "val_loss", "min", True),
    ({"val_loss": 0.5}, {"val_loss": 0.4}, "val_loss", "min", False),
    ({"val_f1": 0.7, "val_recall": 0.9}, {"val_f1": 0.7, "val_recall": 0.8}, "val_f1", "max", True),
    ({"val_f1": 0.7, "val_recall": 0.8}, {"val_f1": 0.7, "val_recall": 0.8}, "val_f1", "max", False),
    ({"val_f1": 0.7, "val_recall": 0.7}, {"val_f1": 0.7, "val_recall": 0.8}, "val_f1", "max", False),
    ({"val_loss": 0.4, "val_recall": 0.9}, {"val_loss": 0.4, "val_recall": 0.1}, "val_loss", "min", True),
    ({"val_f1": NAN}, {"val_f1": 0.1}, "val_f1", "max", False),         # NaN never beats a number
    ({"val_loss": NAN}, {"val_loss": 9.0}, "val_loss", "min", False),
    ({"val_f1": 0.0}, {"val_f1": NAN}, "val_f1", "max", True),          # a number beats NaN
    ({"val_f1": NAN, "val_recall": 0.5}, {"val_f1": NAN, "val_recall": 0.4}, "val_f1", "max", True),
    ({"val_f1": NAN, "val_recall": NAN}, {"val_f1": NAN, "val_recall": NAN}, "val_f1", "max", False),
    ({"val_f1": 0.7, "val_recall": NAN}, {"val_f1": 0.7, "val_recall": 0.1}, "val_f1", "max", False),
    ({"val_f1": 0.7, "val_recall": 0.1}, {"val_f1": 0.7, "val_recall": NAN}, "val_f1", "max", True),
    ({"val_f1": 0.7}, {"val_f1": 0.7}, "val_f1", "max", False),         # no recall to break the tie
])
def test_is_improvement(candidate, incumbent, metric, mode, expected):
    assert is_improvement(candidate, incumbent, metric, mode) is expected


@pytest.mark.parametrize("metric, mode", sorted(SELECTABLE_METRICS.items()))
def test_is_improvement_follows_config_directions(metric, mode):
    base = classification_metrics(LABELS_12, PROBS_12, loss=0.5)
    step = 0.01 if mode == "max" else -0.01
    better = {**base, metric: base[metric] + step}
    worse = {**base, metric: base[metric] - step}
    assert is_improvement(better, base, metric, mode)
    assert not is_improvement(worse, base, metric, mode)


def test_is_improvement_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        is_improvement({"val_f1": 1.0}, None, "val_f1", "up")
    with pytest.raises(KeyError, match="val_auc"):
        is_improvement({"val_f1": 1.0}, None, "val_auc", "max")
