"""Finish a search: train the best trial's exact config again, then score it once on a test CSV.

    python -m tuning.retrain SEARCH_DIR --epochs N [--trial tNNN] [--test_csv CSV] [--train_on_val]
        [--name final] [--cpu | --gpus 0 1] [--num_workers N] [--views T --spatial_views S]

(`python -m tuning.search ... --retrain_best N --test_csv CSV` does the same right after the
search; a space's `retrain:` section does it by default, as the demo's does.)

1. The best trial is the one `SEARCH_DIR/search_summary.json` names (a multi-objective search:
   the front's best by the first objective metric); `--trial tNNN` picks any other trial. Its
   config is the resolved `config.yaml` of its run folder, so the retrained model is exactly
   what was searched.
2. It trains for N epochs as a normal run folder `SEARCH_DIR/<name>/` (default `final`): its own
   output root, never overwriting; a folder of that name already there is an error (pass another
   `--name`). Devices are chosen afresh: the trial's `cpu`, `gpus`, `num_workers`, `progress`
   (set per trial by Ray) come from the flags if given, else from the search space's own
   trainer settings (when run by the search), else the trainer's defaults (first GPU, else the
   CPU). `--train_on_val` trains on train + val (the combined CSV is written beside the run
   folder, `<name>_train_plus_val.csv`; validation metrics are then on seen data).
3. Scored on `--test_csv` at a threshold chosen on validation, never on the test set:
   - by default, the run's best epoch (by its `select_metric`, the search objective, on val)
     at that epoch's validation threshold, stored in its checkpoint;
   - with `--train_on_val`, the last epoch's weights (`checkpoints/last.pt`: there is no
     held-out validation to pick an epoch) at the best trial's validation threshold.
   It writes `<name>/test_metrics.json` (test_f1/precision/recall/accuracy at that threshold,
   test_auc/ap, confusion counts), `test_predictions.csv` and `test_per_video.csv` (errors per
   match), and adds them to the search's `search_summary.json` (`final`) and `summary.md`.

It holds the search folder's lock meanwhile (a search or another retrain refuses to start
there). An interrupted search can be retrained (its best trial so far); the resumed search
keeps that `final` record and retrains into the first free `final_N` name.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from headernet_core.artifacts import read_json_dict, write_csv, write_json
from headernet_core.config import TrainConfig, fields_with_role, load_yaml_mapping
from headernet_core.errors import CliParser, fail, first_paragraph, run_cli
from headernet_core.locks import FolderLock
from headernet_core.paths import check_name

from .summary import SUMMARY_JSON, add_final_model
from .trial import finite

FINAL = "final"
TEST_METRICS = "test_metrics.json"
TEST_PREDICTIONS = "test_predictions.csv"
TEST_PER_VIDEO = "test_per_video.csv"
COMBINED_CSV = "train_plus_val.csv"
# Trial settings that belong to the trial's Ray slot (devices, loader and torch threads) or
# its run folder, not to the model: a retrain chooses them afresh.
DEVICE_KEYS = fields_with_role("device")
RUN_KEYS = fields_with_role("run")
# evaluate()'s keys at the threshold and threshold-free ones -> test_metrics.json keys
TEST_KEYS = {"f1": "test_f1", "precision": "test_precision", "recall": "test_recall",
             "accuracy": "test_accuracy", "val_auc": "test_auc", "val_ap": "test_ap",
             "val_loss": "test_loss", "val_clips": "test_clips", "val_positives": "test_positives",
             "tp": "tp", "fp": "fp", "fn": "fn", "tn": "tn"}


def best_trial(search_dir: Path, trial: str | None = None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(trial folder name, its config.yaml, its best_metrics.json) of the search's best trial,
    or of `trial` (its folder name or just its `tNNN` prefix)."""
    summary_path = search_dir / SUMMARY_JSON
    if not summary_path.is_file():
        fail(f"{search_dir}: no {SUMMARY_JSON}; expected the folder of a search that has ended")
    summary = read_json_dict(summary_path)
    if not summary:
        fail(f"{summary_path}: not the JSON object a search writes")
    best = summary.get("best_trial")
    if trial is not None:
        names = [t.get("name") for t in summary.get("trials") or [] if isinstance(t, dict)]
        matches = [n for n in names if isinstance(n, str) and (n == trial or n.split("_", 1)[0] == trial)]
        if len(matches) != 1:
            fail(f"--trial {trial}: {'no such trial' if not matches else 'names several trials'} "
                 f"in {summary_path} (trials: {', '.join(n.split('_', 1)[0] for n in names[:20])})")
        best = {"name": matches[0]}
    elif summary.get("pareto_front"):
        best = {"name": summary["pareto_front"][0]}   # the front's best by the first metric
    if not best:
        fail(f"{summary_path}: the search has no best trial (no trial finished an epoch)")
    name = best.get("name") if isinstance(best, dict) else None
    # a trial folder of this search, never a path elsewhere (trial names hold '=')
    check_name(name, f"{summary_path}: best_trial.name", extra="=")
    folder = search_dir / name
    config = load_yaml_mapping(folder / "config.yaml")
    return name, config, read_json_dict(folder / "best_metrics.json")


def final_config(trial_config: Mapping[str, Any], *, search_dir: Path, name: str, epochs: int,
                 devices: Mapping[str, Any]) -> TrainConfig:
    """The trial's config for a fresh run `search_dir/name` of `epochs`, with `devices`
    (possibly empty: the trainer's defaults) instead of the trial's slot."""
    values = {k: v for k, v in trial_config.items() if k not in DEVICE_KEYS + RUN_KEYS}
    values.update({k: v for k, v in devices.items() if k in DEVICE_KEYS},
                  output_root=str(search_dir), run_name=name, epochs=epochs)
    return TrainConfig.from_dict(values, source=f"{search_dir / name} (retrained best trial)")


def combined_csv(config: TrainConfig, path: Path) -> str:
    """train + val rows in one CSV (absolute clip paths), for --train_on_val."""
    import pandas as pd

    from headernet_core.data import read_split

    frames = [read_split(getattr(config, key), key.removesuffix("_csv")) for key in ("train_csv", "val_csv")]
    both = pd.concat(frames, ignore_index=True)
    both["path"] = both.pop("clip_path")
    write_csv(both, path)
    return str(path)


def retrain(search_dir: str | Path, *, epochs: int, test_csv: str | Path | None = None,
            train_on_val: bool = False, name: str = FINAL, devices: Mapping[str, Any] | None = None,
            views: int = 1, spatial_views: int = 1, lock: bool = True,
            log: Callable[[str], None] = print, trial: str | None = None) -> dict[str, Any]:
    """Steps 1-3 of the module docstring; returns the record added to the summary.

    `lock`: hold the search folder's lock meanwhile, so that no search (`--resume`) rewrites
    the summary under it; False only for the search itself, which holds it already."""
    search_dir = Path(search_dir).absolute()
    check_name(name, "--name")
    if epochs < 1:
        fail(f"--epochs must be a positive integer, got {epochs}")
    from headernet_core.data import check_clips, read_split
    from headernet_core.evaluation import check_views, evaluate, per_video_errors
    from headernet_core.trainer import train

    check_views(views, spatial_views)
    best_trial(search_dir, trial)  # a search folder, before its lock is taken
    with FolderLock(search_dir, "a retrain") if lock else contextlib.nullcontext():
        trial, trial_config, trial_best = best_trial(search_dir, trial)
        if read_json_dict(search_dir / SUMMARY_JSON).get("state") != "finished":
            log(f"note: {search_dir.name} has not finished: {trial} is its best trial so far")
        run_dir = search_dir / name
        if run_dir.exists():
            fail(f"{run_dir} already exists (a model retrained earlier is never overwritten); "
                 f"choose another --name")
        config = final_config(trial_config, search_dir=search_dir, name=name, epochs=epochs,
                              devices=devices or {})
        config.validate()
        # The test split is scored at the best epoch's stored threshold; a model trained on
        # train + val has no validation of its own: at the trial's. Checked before hours of
        # training, not after.
        threshold = source = None
        if test_csv is not None:
            if train_on_val:
                threshold, source = finite(trial_best.get("val_threshold")), f"validation of trial {trial}"
                if threshold is None:
                    fail(f"{search_dir / trial}/best_metrics.json: no validation threshold to score "
                         f"the test split at")
            test_csv = str(Path(test_csv).absolute())
            check_clips(read_split(test_csv, "test"), test_csv)
        combined = search_dir / f"{name}_{COMBINED_CSV}"   # beside the run folder: inputs never live in one
        if train_on_val:
            config = config.replace(train_csv=combined_csv(config, combined))
        log(f"retraining {trial} for {epochs} epochs as {run_dir}")
        try:
            result = train(config, log=log)
        except BaseException:
            if not (run_dir / "status.json").exists():   # failed before writing the run: leave nothing
                shutil.rmtree(run_dir, ignore_errors=True)
                combined.unlink(missing_ok=True)
            raise
        record: dict[str, Any] = {
            "run_dir": str(run_dir), "trial": trial, "epochs": epochs, "train_on_val": train_on_val,
            "best_epoch": result.best_epoch, "val_metric": config.select_metric,
            "val_value": result.best_metrics.get(config.select_metric),
            "test_csv": test_csv}
        if test_csv is not None:
            checkpoint = run_dir / "checkpoints" / "last.pt" if train_on_val else result.best_checkpoint
            metrics, predictions = evaluate(checkpoint, test_csv, threshold=threshold, views=views,
                                            spatial_views=spatial_views, cpu=config.cpu)
            write_csv(predictions, run_dir / TEST_PREDICTIONS)
            write_csv(per_video_errors(predictions), run_dir / TEST_PER_VIDEO)
            if source is None:
                source = metrics["threshold_source"]
                if source.startswith("validation"):
                    source = f"validation, epoch {result.best_epoch}"
            record.update({"checkpoint": str(Path(checkpoint).relative_to(search_dir)),
                           "threshold": metrics["threshold"], "threshold_source": source,
                           "views": metrics["views"],
                           **{new: metrics[old] for old, new in TEST_KEYS.items()},
                           "per_video": str((run_dir / TEST_PER_VIDEO).relative_to(search_dir))})
            write_json(run_dir / TEST_METRICS, record)
            log(f"test ({Path(test_csv).name}, {record['test_clips']} clips) at threshold "
                f"{record['threshold']:.3f} from {record['threshold_source']}: f1 "
                f"{record['test_f1']:.4f}, precision {record['test_precision']:.4f}, recall "
                f"{record['test_recall']:.4f}, auc {record['test_auc']:.4f} -> {run_dir / TEST_METRICS}")
        add_final_model(search_dir, record)
        return record


def main(argv: Sequence[str] | None = None) -> None:
    parser = CliParser(prog="python -m tuning.retrain", description=first_paragraph(__doc__))
    parser.add_argument("search_dir", help="a search folder (holds search_summary.json)")
    parser.add_argument("--epochs", type=int, required=True, help="training epochs of the final model")
    parser.add_argument("--trial", help="the trial to retrain, e.g. t007 (default: the best; a "
                                        "multi-objective search's: the front's best by its first metric)")
    parser.add_argument("--test_csv", help="held-out labelled CSV to score the final model on, once")
    parser.add_argument("--train_on_val", action="store_true",
                        help="train on train + val (then the last epoch is scored)")
    parser.add_argument("--name", default=FINAL, help=f"run folder in the search folder (default: {FINAL})")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU")
    parser.add_argument("--gpus", type=int, nargs="+", help="GPU ids (several: DataParallel)")
    parser.add_argument("--num_workers", type=int, help="data-loader workers (default: the trainer's)")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU (default: the trainer's "
                                                    "policy, not the trial's 1-CPU slot)")
    parser.add_argument("--views", type=int, default=1, help="temporal test views per clip")
    parser.add_argument("--spatial_views", type=int, default=1, help="spatial test views (1-3)")
    args = parser.parse_args(argv)
    devices = {k: v for k, v in (("cpu", args.cpu or None), ("gpus", args.gpus),
                                 ("num_workers", args.num_workers), ("threads", args.threads))
               if v is not None}
    run_cli(lambda: retrain(args.search_dir, epochs=args.epochs, test_csv=args.test_csv,
                            train_on_val=args.train_on_val, name=args.name, devices=devices,
                            views=args.views, spatial_views=args.spatial_views, trial=args.trial))


if __name__ == "__main__":
    main()
