"""Validation metrics of the binary header classifier, all computed with scikit-learn.

Upstream used one name, `val_f1`, for two different numbers (weighted F1 at argmax in the
legacy trainer, positive-class F1 at a swept threshold in the parquet trainer). Here every
number has its own key: `val_f1` is the positive-class F1 at the F1-best threshold,
`val_f1_05` the positive-class F1 at the 0.5 rule, and `val_weighted_f1` the legacy meaning.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import numpy as np

# scikit-learn is imported where it is used: the search driver imports this module only for
# the metric names, and scikit-learn costs it a second of start-up before any trial runs.

# Keys of `classification_metrics`, in the column order the trainer writes them.
METRIC_KEYS: tuple[str, ...] = (
    "val_loss", "val_acc", "val_auc", "val_ap",
    "val_precision", "val_recall", "val_f1", "val_threshold",
    "val_precision_05", "val_recall_05", "val_f1_05",
    "val_weighted_precision", "val_weighted_recall", "val_weighted_f1",
    "val_clips", "val_positives",
)

# Per-epoch numbers the trainer reports besides the validation metrics.
TRAIN_METRICS: tuple[str, ...] = ("train_loss", "train_acc", "train_clips", "train_seconds",
                                  "clips_per_s", "epoch_seconds", "peak_mem_gib", "lr_backbone", "lr_head")
# Those that measure the machine, not the model: they differ between two runs of the same config.
MEASURED_METRICS: tuple[str, ...] = ("train_seconds", "clips_per_s", "epoch_seconds", "peak_mem_gib")


def reported_metrics() -> tuple[str, ...]:
    """Every key of a metrics_epoch.csv row (what a Tune objective may name)."""
    return ("epoch", *TRAIN_METRICS, *METRIC_KEYS)

# F1 / recall values closer than this count as equal: the curve's F1 comes from float
# division, so two thresholds with the same exact F1 can differ in the last bit.
_TIE_TOL = 1e-12

_ONE_CLASS_MESSAGE = ("validation set has only one class ({what}); AUC, AP and the swept "
                      "threshold metrics are NaN")

NAN = float("nan")


def _check_inputs(labels: np.ndarray, prob_header: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten to (int labels, float scores); bad input is a caller bug."""
    y = np.asarray(labels)
    p = np.asarray(prob_header, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1:
        raise ValueError(f"labels and prob_header must be 1-D, got shapes {y.shape} and {p.shape}")
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.shape[0]}) and prob_header ({p.shape[0]}) differ in length")
    if y.size == 0:
        raise ValueError("cannot compute metrics of an empty validation set")
    if not np.all(np.isfinite(p)):
        raise ValueError("prob_header contains NaN or inf")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"labels must be 0/1, got values {sorted(set(np.unique(y).tolist()))}")
    return y.astype(np.int64), p


def _sweep(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float, float]:
    """F1-best threshold over every distinct score (positive when p >= threshold).

    Ties: higher recall, then the threshold closest to 0.5 (then the higher threshold, so the
    choice is deterministic). Assumes both classes are present.
    """
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, p)
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    candidates = np.flatnonzero(f1 >= f1.max() - _TIE_TOL)
    candidates = candidates[recall[candidates] >= recall[candidates].max() - _TIE_TOL]
    distance = np.abs(thresholds[candidates] - 0.5)
    candidates = candidates[distance <= distance.min() + _TIE_TOL]
    threshold = float(thresholds[candidates].max())
    # Report sklearn's own P/R/F1 at that threshold rather than the curve's arithmetic.
    return (threshold, *_binary_prf(y, (p >= threshold).astype(np.int64), "binary"))


def best_threshold(labels: np.ndarray, prob_header: np.ndarray) -> tuple[float, float, float, float]:
    """(threshold, precision, recall, f1) of the positive class at the F1-best threshold.

    A clip counts as positive when prob_header >= threshold. With one class only there is no
    meaningful threshold: all four values are NaN and a warning says why.
    """
    y, p = _check_inputs(labels, prob_header)
    if np.unique(y).size < 2:
        warnings.warn(_ONE_CLASS_MESSAGE.format(what=f"all labels are {int(y[0])}"), stacklevel=2)
        return NAN, NAN, NAN, NAN
    return _sweep(y, p)


def _binary_prf(y: np.ndarray, pred: np.ndarray, average: str) -> tuple[float, float, float]:
    from sklearn.metrics import precision_recall_fscore_support

    prec, rec, f, _ = precision_recall_fscore_support(
        y, pred, average=average, labels=[0, 1] if average != "binary" else None,
        pos_label=1, zero_division=0)
    return float(prec), float(rec), float(f)


def classification_metrics(labels: np.ndarray, prob_header: np.ndarray,
                           loss: float | None = None) -> dict[str, float]:
    """Every validation number the trainer logs, keyed as in `METRIC_KEYS`.

    `prob_header` is softmax[:, 1]. The 0.5 rule (prob_header > 0.5) equals the argmax of a
    2-class softmax with ties going to class 0. With one class only, AUC, AP and the swept
    values are NaN (one warning), the rest are defined with zero_division=0.
    """
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

    y, p = _check_inputs(labels, prob_header)
    pred_05 = (p > 0.5).astype(np.int64)
    two_classes = np.unique(y).size == 2

    out: dict[str, float] = {
        "val_loss": NAN if loss is None else float(loss),
        "val_acc": float(accuracy_score(y, pred_05)),
    }
    if two_classes:
        out["val_auc"] = float(roc_auc_score(y, p))
        out["val_ap"] = float(average_precision_score(y, p))
        threshold, prec, rec, f1 = _sweep(y, p)
    else:
        warnings.warn(_ONE_CLASS_MESSAGE.format(what=f"all {y.size} labels are {int(y[0])}"),
                      stacklevel=2)
        out["val_auc"] = out["val_ap"] = NAN
        threshold = prec = rec = f1 = NAN
    out.update(val_precision=prec, val_recall=rec, val_f1=f1, val_threshold=threshold)

    prec, rec, f1 = _binary_prf(y, pred_05, "binary")
    out.update(val_precision_05=prec, val_recall_05=rec, val_f1_05=f1)
    prec, rec, f1 = _binary_prf(y, pred_05, "weighted")
    out.update(val_weighted_precision=prec, val_weighted_recall=rec, val_weighted_f1=f1)

    out["val_clips"] = int(y.size)
    out["val_positives"] = int(y.sum())
    return {key: out[key] for key in METRIC_KEYS}


def metrics_at_threshold(labels: np.ndarray, prob_header: np.ndarray,
                         threshold: float) -> dict[str, float]:
    """Positive-class precision/recall/F1, accuracy and the confusion counts when a clip is a
    header iff prob_header >= `threshold` (a threshold fixed beforehand, e.g. on validation:
    the honest numbers for a test set, unlike the swept `val_f1`)."""
    from sklearn.metrics import accuracy_score, confusion_matrix

    y, p = _check_inputs(labels, prob_header)
    pred = (p >= threshold).astype(np.int64)
    prec, rec, f1 = _binary_prf(y, pred, "binary")
    tn, fp, fn, tp = (int(n) for n in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    return {"threshold": float(threshold), "precision": prec, "recall": rec, "f1": f1,
            "accuracy": float(accuracy_score(y, pred)), "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _value(metrics: Mapping[str, float], key: str) -> float:
    """A metric as float; missing or None counts as NaN (the worst value)."""
    value = metrics.get(key)
    return NAN if value is None else float(value)


def _beats(a: float, b: float, mode: str) -> bool:
    """Strictly better by `mode`, where NaN is worse than every number."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if mode == "max" else a < b


def is_improvement(candidate: Mapping[str, float], incumbent: Mapping[str, float] | None,
                   metric: str, mode: str) -> bool:
    """Should `candidate` replace `incumbent` as the best epoch?

    Yes when there is no incumbent, when `metric` is strictly better by `mode`, or when it is
    equal and `val_recall` is higher (upstream's tie rule: a missed header costs more than a
    false alarm). NaN is the worst value, so a NaN never beats a number; two NaNs are equal.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if metric not in candidate:
        raise KeyError(f"metric {metric!r} is not among the candidate's keys {sorted(candidate)}")
    if incumbent is None:
        return True
    new, old = _value(candidate, metric), _value(incumbent, metric)
    if _beats(new, old, mode):
        return True
    equal = new == old or (math.isnan(new) and math.isnan(old))
    return equal and _beats(_value(candidate, "val_recall"), _value(incumbent, "val_recall"), "max")
