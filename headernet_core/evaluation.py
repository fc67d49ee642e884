"""Evaluate a trained checkpoint on a split CSV: the same metrics the trainer reported.

    python -m headernet_core.evaluate --checkpoint report/header_experiments/RUN/checkpoints/best_epoch_3.pt \
        --val_csv splits/val.csv [--predictions out.csv] [--metrics out.json]

The model is rebuilt from the architecture stored in the checkpoint, so the original backbone
checkpoint folder is not needed; preprocessing (frames, size, normalisation) comes from the
checkpoint's config.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd

from . import artifacts, checkpoints
from .backbones import build_backbone
from .config import TrainConfig
from .data import check_clips, read_split
from .errors import CliParser, fail, run_cli
from .losses import build_loss
from .metrics import classification_metrics
from .model import HeaderClassifier
from .trainer import make_loader, predict, predictions_frame, resolve_amp, resolve_devices


def load_classifier(checkpoint: str | Path) -> tuple[HeaderClassifier, TrainConfig, dict]:
    """A trained classifier (eval mode, CPU), its run config and the raw checkpoint payload."""
    payload = checkpoints.load(checkpoint)
    config = TrainConfig.from_dict(payload["config"], source=f"{checkpoint} config")
    backbone_meta = payload.get("backbone") or {}
    if "arch" not in backbone_meta:
        fail(f"{checkpoint}: no backbone architecture stored; was it written by headernet_core.train?")
    backbone = build_backbone(backbone_meta["family"], backbone_meta["arch"])
    model = HeaderClassifier(backbone, config.head_dropout)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        fail(f"{checkpoint}: weights do not fit the stored architecture ({str(exc).splitlines()[0]})")
    return model.eval(), config, payload


def evaluate(checkpoint: str | Path, val_csv: str | Path, *, batch_size: int | None = None,
             num_workers: int = 0, cpu: bool = False) -> tuple[dict[str, float], pd.DataFrame]:
    """Metrics (same keys as metrics_epoch.csv's val_* columns) and per-clip predictions."""
    model, config, _ = load_classifier(checkpoint)
    config = config.replace(val_csv=str(val_csv), num_workers=num_workers, progress=False,
                            batch_size=batch_size or config.batch_size, cpu=cpu or config.cpu,
                            gpus=None if cpu else config.gpus)
    val_df = read_split(val_csv, "val")
    check_clips(val_df, val_csv)
    device, _ = resolve_devices(config)
    amp_dtype = resolve_amp(config.amp, device)
    loader, _ = make_loader(val_df, config, train=False, pin=device.type == "cuda")
    criterion = build_loss(config.loss, focal_alpha=config.focal_alpha, focal_gamma=config.focal_gamma)
    prob, labels, loss = predict(model.to(device), loader, config, device, amp_dtype, criterion)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-class split is reported as NaN metrics
        metrics = classification_metrics(labels, prob, loss=loss)
    return metrics, predictions_frame(val_df, prob, metrics["val_threshold"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = CliParser(prog="python -m headernet_core.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a best_epoch_<N>.pt or last.pt")
    parser.add_argument("--val_csv", required=True, help="split CSV to evaluate on")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU")
    parser.add_argument("--predictions", help="write per-clip predictions CSV here")
    parser.add_argument("--metrics", help="write metrics JSON here")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.batch_size is not None and args.batch_size < 1:
            fail(f"--batch_size must be a positive integer, got {args.batch_size}")
        metrics, predictions = evaluate(args.checkpoint, args.val_csv, batch_size=args.batch_size,
                                        num_workers=args.num_workers, cpu=args.cpu)
        if args.predictions:
            with artifacts.atomic_path(args.predictions) as tmp:
                predictions.to_csv(tmp, index=False)
        if args.metrics:
            artifacts.write_json(args.metrics, metrics)
        width = max(map(len, metrics))
        for key, value in metrics.items():
            print(f"{key:<{width}}  {value:.6g}" if isinstance(value, float) else f"{key:<{width}}  {value}")

    run_cli(body)


if __name__ == "__main__":
    main()
