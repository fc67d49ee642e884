"""The training step's performance features: device-side bookkeeping read every LOG_EVERY
steps (divergence still names its batch), fused AdamW, --compile with its fallback, the CPU
thread policy, and split checks a search driver hands to its trials."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from headernet_core import data, model as model_module, threads, trainer as train_module
from headernet_core.config import TrainConfig
from headernet_core.errors import HeaderNetError
from headernet_core.model import HeaderClassifier, build_optimizer
from headernet_core.trainer import RunState, train, train_one_epoch


class FeatureBatches:
    """A loader of ready-made (inputs, labels) batches, as the feature cache yields them."""

    def __init__(self, batches: int, batch_size: int = 4, features: int = 3) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(batch_size, features, generator=generator),
                         torch.arange(batch_size) % 2) for _ in range(batches)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def to_device(self, batch, device):
        return batch


class Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def run_epoch(loader, criterion, writer=None) -> dict:
    head = nn.Linear(3, 2)
    config = TrainConfig(progress=False, lr_head=1e-2)
    optimizer = torch.optim.SGD(head.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return train_one_epoch(head, loader, optimizer, None, scaler, criterion, config, RunState(),
                           torch.device("cpu"), None, writer, desc="test")


def test_losses_are_read_every_log_interval_and_each_step_is_logged(monkeypatch):
    reads = []
    real = train_module._read_losses
    monkeypatch.setattr(train_module, "_read_losses", lambda pending, *a: reads.append(len(pending)) or real(pending, *a))
    writer = Writer()
    steps = 2 * train_module.LOG_EVERY + 5
    stats = run_epoch(FeatureBatches(steps), nn.CrossEntropyLoss(), writer=writer)
    assert reads == [train_module.LOG_EVERY, train_module.LOG_EVERY, 5]  # not once per step
    assert [step for _, _, step in writer.scalars] == list(range(1, steps + 1))
    losses = [value for _, value, _ in writer.scalars]
    assert stats["train_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert stats["train_clips"] == 4 * steps and 0 <= stats["train_acc"] <= 1


def test_a_diverged_loss_names_its_batch_although_it_is_read_later():
    calls = {"n": 0}

    def criterion(logits, labels):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(logits, labels)
        return loss * math.nan if calls["n"] == 3 else loss

    with pytest.raises(HeaderNetError, match=r"training diverged: loss is nan at epoch 1, batch 3;"):
        run_epoch(FeatureBatches(train_module.LOG_EVERY - 2), criterion)
    assert calls["n"] == train_module.LOG_EVERY - 2  # noticed at the read, not per step


def test_fused_adamw_is_asked_for_only_when_told():
    head_model = _tiny_classifier()
    config = TrainConfig(finetune_mode="frozen", lr_head=1e-3)
    assert build_optimizer(head_model, config, fused=True).defaults["fused"] is True
    assert not build_optimizer(head_model, config).defaults["fused"]


def _tiny_classifier() -> HeaderClassifier:
    class Backbone(nn.Module):
        num_features = 3

        def forward(self, x):
            return x

    from headernet_core.model import configure_finetune

    classifier = HeaderClassifier(Backbone(), dropout=0.0)
    configure_finetune(classifier, "frozen", 1)
    return classifier


def failing_backend(graph, example_inputs):
    raise RuntimeError("no C compiler here")


def test_compile_falls_back_to_eager_with_one_message(tiny_config, monkeypatch):
    monkeypatch.setattr(model_module, "COMPILE_BACKEND", failing_backend)
    torch._dynamo.reset()
    lines: list[str] = []
    compiled = train(tiny_config(run_name="compiled", compile=True, head_dropout=0.0), log=lines.append)
    plain = train(tiny_config(run_name="plain", head_dropout=0.0), log=lambda _: None)
    warnings = [line for line in lines if "--compile failed" in line]
    assert len(warnings) == 1 and "no C compiler here" in warnings[0] and "without torch.compile" in warnings[0]
    a = pd.read_csv(compiled.run_dir / "metrics_epoch.csv")
    b = pd.read_csv(plain.run_dir / "metrics_epoch.csv")
    np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-5)  # eager = the same run
    torch._dynamo.reset()


def test_compile_runs_when_the_backend_works(tiny_config, monkeypatch):
    monkeypatch.setattr(model_module, "COMPILE_BACKEND", "eager")  # torch.compile minus codegen
    torch._dynamo.reset()
    lines: list[str] = []
    result = train(tiny_config(compile=True, epochs=1), log=lines.append)
    assert result.status == "finished" and not any("--compile failed" in line for line in lines)
    torch._dynamo.reset()


# --- threads ------------------------------------------------------------------------------
@pytest.mark.parametrize("idle,workers,expected", [(2.0, 0, 2), (1.92, 0, 2), (1.6, 0, 1), (1.1, 0, 1),
                                                   (0.2, 0, 1), (2.0, 1, 1), (None, 0, 2)])
def test_thread_policy_uses_the_idle_cores(monkeypatch, idle, workers, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads, "idle_cpus", lambda sample_s=0: idle)
    assert threads.choose_threads(None, workers)[0] == expected


def test_explicit_threads_and_omp_num_threads_win(monkeypatch):
    monkeypatch.setattr(threads, "idle_cpus", lambda sample_s=0: 0.0)
    assert threads.choose_threads(3, 0) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads(None, 0)[0] is None  # torch keeps what the variable set
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.choose_threads(None, 0)[0] == 1


def test_idle_cpus_reads_this_machine():
    idle = threads.idle_cpus(0.05)
    assert idle is None or 0 <= idle <= len(threads.usable_cpus()) + 0.01


def test_a_cpu_run_logs_and_applies_its_thread_count(tiny_config):
    before = torch.get_num_threads()
    lines: list[str] = []
    try:
        train(tiny_config(threads=1, epochs=1), log=lines.append)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "cpu threads: 1 (--threads)" in lines


def test_new_settings_are_validated():
    for bad in (dict(feature_cache_views=0), dict(threads=0)):
        with pytest.raises(HeaderNetError, match=next(iter(bad))):
            TrainConfig(train_csv="a", val_csv="b", **bad).validate()


# --- checked splits -------------------------------------------------------------------------
def test_checked_splits_are_reused_until_the_csv_changes(tiny_data, monkeypatch):
    checked = data.check_splits({"train": tiny_data["train_csv"], "val": tiny_data["val_csv"]})
    assert len(checked) == 2

    def must_not_read(*args, **kwargs):
        raise AssertionError("read again")

    monkeypatch.setattr(data, "read_split", must_not_read)
    frame = data.load_split(tiny_data["train_csv"], "train", checked)
    assert len(frame) == 18 and "clip_path" in frame
    with pytest.raises(AssertionError, match="read again"):
        data.load_split(tiny_data["val_csv"], "train", checked)  # another split: checked afresh
    stat = tiny_data["train_csv"].stat()
    os.utime(tiny_data["train_csv"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    try:
        with pytest.raises(AssertionError, match="read again"):
            data.load_split(tiny_data["train_csv"], "train", checked)  # the file changed
    finally:
        os.utime(tiny_data["train_csv"], ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_roc_and_pr_plots_are_redrawn_only_when_the_best_epoch_changes(tiny_config, monkeypatch):
    monkeypatch.setattr(train_module, "PLOT_EVERY_S", 0.0)   # every epoch, as a run of long epochs
    seen = []

    def on_epoch(report) -> None:
        plots = report.run_dir / "plots"
        seen.append((report.is_best, (plots / "roc.png").stat().st_mtime_ns,
                     (plots / "loss.png").stat().st_mtime_ns))

    train(tiny_config(epochs=4, plots=True, lr_head=3e-2, lr_backbone=3e-2), on_epoch=on_epoch,
          log=lambda _: None)
    assert seen[0][0] and not all(best for best, *_ in seen)  # both cases happen
    for (_, roc_before, loss_before), (is_best, roc, loss) in zip(seen, seen[1:]):
        assert loss > loss_before  # the curves gain an epoch every time
        assert (roc != roc_before) == is_best


def count_drawings(monkeypatch) -> list[list[int]]:
    """The epochs of metrics_epoch each plots/ drawing had."""
    import headernet_core.plots

    drawings: list[list[int]] = []
    real = headernet_core.plots.write_plots

    def write_plots(folder, epochs, *args):
        drawings.append(list(epochs["epoch"]))
        return real(folder, epochs, *args)
    monkeypatch.setattr(headernet_core.plots, "write_plots", write_plots)
    return drawings


@pytest.mark.parametrize("how", ["finished", "stopped", "interrupted"])
def test_short_epochs_draw_their_plots_once_when_the_run_ends(tiny_config, monkeypatch, how):
    """Within PLOT_EVERY_S of the last drawing no epoch draws: a search's tiny epochs would pay
    for it in every epoch of every trial. However the run ends, its plots show every epoch."""
    drawings = count_drawings(monkeypatch)

    def on_epoch(report):
        assert not (report.run_dir / "plots").exists() or report.epoch == 3
        if report.epoch == 2 and how == "stopped":
            return True                            # a scheduler's early stop
        if report.epoch == 2 and how == "interrupted":
            raise KeyboardInterrupt

    config = tiny_config(epochs=3, plots=True)
    if how == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            train(config, on_epoch=on_epoch, log=lambda _: None)
    else:
        train(config, on_epoch=on_epoch, log=lambda _: None)
    expected = [1, 2, 3] if how == "finished" else [1, 2]
    assert drawings == [expected]
    plots = Path(config.output_root) / config.run_name / "plots"
    assert {p.name for p in plots.iterdir()} == {"loss.png", "metrics.png", "roc.png", "pr.png"}


def test_a_long_run_redraws_its_plots_once_they_are_a_minute_old(tiny_config, monkeypatch):
    drawings = count_drawings(monkeypatch)
    clock = {"now": 0.0}
    monkeypatch.setattr(train_module.RunPlots, "clock", staticmethod(lambda: clock["now"]))

    def on_epoch(report):
        clock["now"] += 40.0 if report.epoch < 3 else 0.0   # epochs 1-2 take 40 s, 3 is quick

    train(tiny_config(epochs=4, plots=True), on_epoch=on_epoch, log=lambda _: None)
    # epoch 1 ends at 0 s (nothing due), 2 at 40, 3 at 80 (due: 80 >= 60), 4 is the run's end
    assert drawings == [[1, 2, 3], [1, 2, 3, 4]]


def test_the_search_driver_checks_csvs_and_clips_without_importing_torch(tiny_data):
    """Nor scikit-learn or matplotlib: what the driver imports delays the first trial."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys
from headernet_core.data import check_splits
checked = check_splits({{"train": {str(tiny_data["train_csv"])!r}, "val": {str(tiny_data["val_csv"])!r}}})
import tuning.search
assert len(checked) == 2
print(sorted(m for m in ("torch", "torchvision", "timm", "sklearn", "matplotlib") if m in sys.modules))
"""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
