"""Out-of-memory backoff (through the test seam that raises torch.OutOfMemoryError on the CPU)
and the per-epoch memory peak."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from headernet_core import artifacts
from headernet_core.memory import OOM_TEST_ENV, OutOfMemoryEnd, halved_batch, inject_oom, peak_gib, reset_peak
from headernet_core.metrics import MEASURED_METRICS
from headernet_core.status import read_status_record, recorded_end, write_status
from headernet_core.trainer import _peer_halving, config_for_cli, train

UNTIMED = list(MEASURED_METRICS)


def test_oom_in_epoch_2_backs_off_and_equals_a_run_resumed_at_that_batch(tiny_config, monkeypatch):
    monkeypatch.setenv(OOM_TEST_ENV, "2:2")    # epoch 2 runs out of memory above micro-batch 2
    lines: list[str] = []
    backed = train(tiny_config(epochs=3, batch_size=8, model_ema=True, run_name="oom"), log=lines.append)
    assert backed.status == "finished" and backed.epochs_done == 3
    assert (backed.config.batch_size, backed.config.grad_accum) == (2, 4)
    said = [line for line in lines if line.startswith("out of memory")]
    assert len(said) == 2 and "at batch 8" in said[0] and "at batch 2 x 4" in said[1]
    saved = yaml.safe_load((backed.run_dir / "config.yaml").read_text())
    last = torch.load(backed.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["batch_size"], saved["grad_accum"]) == (2, 4)
    assert (last["config"]["batch_size"], last["config"]["grad_accum"]) == (2, 4)

    monkeypatch.delenv(OOM_TEST_ENV)
    first = train(tiny_config(epochs=3, batch_size=8, model_ema=True, run_name="ref"),
                  on_epoch=lambda r: r.epoch == 1, log=lambda _: None)
    assert first.status == "stopped"
    resumed = train(tiny_config(epochs=3, batch_size=2, grad_accum=4, model_ema=True, run_name="ref",
                                resume=True), log=lambda _: None)
    a = pd.read_csv(backed.run_dir / "metrics_epoch.csv").drop(columns=UNTIMED)
    b = pd.read_csv(resumed.run_dir / "metrics_epoch.csv").drop(columns=UNTIMED)
    pd.testing.assert_frame_equal(a, b, atol=1e-5)
    wb = torch.load(resumed.run_dir / "checkpoints" / "last.pt", weights_only=True)
    for key, value in last["state_dict"].items():
        torch.testing.assert_close(value, wb["state_dict"][key], atol=1e-5, rtol=0)


def test_oom_in_epoch_1_restarts_from_the_runs_start(tiny_config, monkeypatch):
    plain = train(tiny_config(batch_size=2, grad_accum=2, run_name="plain"), log=lambda _: None)
    monkeypatch.setenv(OOM_TEST_ENV, "1:2")
    backed = train(tiny_config(batch_size=4, run_name="oom"), log=lambda _: None)
    assert (backed.config.batch_size, backed.config.grad_accum) == (2, 2)
    a = pd.read_csv(plain.run_dir / "metrics_epoch.csv").drop(columns=UNTIMED)
    b = pd.read_csv(backed.run_dir / "metrics_epoch.csv").drop(columns=UNTIMED)
    pd.testing.assert_frame_equal(a, b, atol=1e-5)


def test_oom_at_batch_1_ends_the_run(tiny_config, monkeypatch):
    monkeypatch.setenv(OOM_TEST_ENV, "1:0")
    with pytest.raises(OutOfMemoryEnd, match=r"^out of memory at batch 1 \(peak .* GiB\)$"):
        train(tiny_config(batch_size=2), log=lambda _: None)
    status = json.loads((Path(tiny_config().output_root) / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "out of memory at batch 1" in status["error"]
    assert status["out_of_memory"]["batch"] == 1 and status["out_of_memory"]["world"] == 1


def test_resume_refuses_another_effective_batch(tiny_config):
    from headernet_core.errors import HeaderNetError

    train(tiny_config(epochs=1), log=lambda _: None)
    with pytest.raises(HeaderNetError, match="batch_size"):
        train(tiny_config(epochs=2, batch_size=2, resume=True), log=lambda _: None)


# --- under DDP: a halving agreed through a restart (the torchrun run: tests/test_distributed.py) ----
def test_the_seam_raises_on_its_rank_only(tiny_config, monkeypatch):
    """"EPOCH:ABOVE:RANK" raises on DDP rank RANK alone (the rank read from the launcher's
    environment here, no process group); without RANK on every rank."""
    config = tiny_config(batch_size=4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for spec, rank, raises in (("2:2:1", "1", True), ("2:2:1", "0", False), ("2:2", "0", True),
                               ("2:2", "1", True), ("2:4:1", "1", False)):
        monkeypatch.setenv(OOM_TEST_ENV, spec)
        monkeypatch.setenv("RANK", rank)
        inject_oom(config, 2, 0)     # only the second micro-batch
        inject_oom(config, 1, 1)     # only epoch 2
        if raises:
            with pytest.raises(torch.OutOfMemoryError, match=spec):
                inject_oom(config, 2, 1)
        else:
            inject_oom(config, 2, 1)


def test_a_ddp_halving_stops_where_the_global_batch_no_longer_divides(tiny_config):
    smaller = halved_batch(tiny_config(batch_size=8), 1.0, world=2)
    assert (smaller.batch_size, smaller.grad_accum) == (4, 2)
    assert halved_batch(tiny_config(batch_size=4, grad_accum=3), 1.0, world=2).grad_accum == 6
    with pytest.raises(OutOfMemoryEnd, match=r"^out of memory at global batch 2 of 2 DDP processes "
                                             r"\(its half would not divide by them\) \(peak 1\.5 GiB\)$"):
        halved_batch(tiny_config(batch_size=2), 1.5, world=2)
    with pytest.raises(OutOfMemoryEnd, match="global batch 12 of 4"):
        halved_batch(tiny_config(batch_size=12), 1.5, world=4)   # 6 clips do not split over 4 ranks
    end = pickle.loads(pickle.dumps(OutOfMemoryEnd(2.5, 2, 2)))   # a Ray Train worker's error
    assert (end.peak, end.batch, end.world, str(end)) == (2.5, 2, 2, str(OutOfMemoryEnd(2.5, 2, 2)))


def test_rank_0_records_why_a_rank_ran_out_of_memory(tiny_config, tmp_path):
    """Rank 0 sees a peer's out-of-memory only as a vanished peer or torchrun's SIGTERM: it
    keeps the peer's `OutOfMemoryEnd` (status.json's `out_of_memory`) or records the halving
    the peer wrote (config.yaml)."""
    config = tiny_config(batch_size=4)
    artifacts.write_yaml(tmp_path / "config.yaml", config.to_dict())
    write_status(tmp_path, "running", 1, world_size=2)
    assert _peer_halving(tmp_path, config) is None and recorded_end(read_status_record(tmp_path)) is None
    artifacts.write_yaml(tmp_path / "config.yaml", config.replace(batch_size=2, grad_accum=2).to_dict())
    assert "config.yaml now holds batch 2 x 2 accumulation" in _peer_halving(tmp_path, config)
    end = OutOfMemoryEnd(0.5, 2, 2)
    write_status(tmp_path, "failed", 1, error=f"OutOfMemoryEnd: {end}", world_size=2, out_of_memory=end.record())
    recorded = recorded_end(read_status_record(tmp_path))
    assert (recorded.peak, recorded.batch, recorded.world, str(recorded)) == (0.5, 2, 2, str(end))
    write_status(tmp_path, "failed", 1, error=f"OutOfMemoryEnd: {end}", world_size=2,
                 out_of_memory={"peak_gib": 0.5, "batch": "two"})   # damaged: not an end
    assert recorded_end(read_status_record(tmp_path)) is None


def test_resume_without_last_pt_starts_the_run_again_at_its_recorded_micro_batch(tiny_config):
    """Out of memory in epoch 1 under DDP leaves config.yaml with the halved batch and no
    last.pt: `--resume` (each rank reads config.yaml) starts the run again from its beginning at
    that batch, clearing what the failed start left, and equals a run started at it."""
    plain = train(tiny_config(batch_size=2, grad_accum=2, run_name="plain"), log=lambda _: None)
    halved = tiny_config(batch_size=2, grad_accum=2, run_name="oom")
    run_dir = Path(halved.output_root) / "oom"
    artifacts.write_yaml(run_dir / "config.yaml", halved.to_dict())   # as the rank that ran out wrote it
    write_status(run_dir, "failed", 0, error="OutOfMemoryError: a DDP rank ran out of memory", world_size=2)
    (run_dir / "tb").mkdir()
    lines: list[str] = []
    resumed = train(config_for_cli(["--resume", "--run_name", "oom", "--output_root", halved.output_root]),
                    log=lines.append)
    assert resumed.status == "finished" and (resumed.config.batch_size, resumed.config.grad_accum) == (2, 2)
    assert any("no epoch was completed, so it starts again from epoch 1 at batch 2 x 2" in line for line in lines)
    assert not (run_dir / "tb").exists()
    a = pd.read_csv(plain.run_dir / "metrics_epoch.csv").drop(columns=UNTIMED)
    b = pd.read_csv(resumed.run_dir / "metrics_epoch.csv").drop(columns=UNTIMED)
    pd.testing.assert_frame_equal(a, b, atol=1e-5)


def test_a_retried_trial_starts_at_the_recorded_micro_batch_with_or_without_last_pt(tiny_config, tmp_path):
    """tuning.trial.starting_point: a halving recorded in config.yaml applies to the retry also
    without last.pt (N workers that ran out in epoch 1); another effective batch there is not
    taken. An N-worker trial's `OutOfMemoryEnd` is read back from status.json."""
    from tuning.trial import OOM_ENDED, recorded_out_of_memory_end, starting_point

    space = tiny_config(batch_size=8)
    assert starting_point(space, tmp_path) == (space, False)
    artifacts.write_yaml(tmp_path / "config.yaml", space.replace(batch_size=4, grad_accum=2).to_dict())
    config, resume = starting_point(space, tmp_path)
    assert (config.batch_size, config.grad_accum, resume) == (4, 2, False)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    assert starting_point(space, tmp_path)[1] is True
    artifacts.write_yaml(tmp_path / "config.yaml", space.replace(batch_size=4).to_dict())
    assert starting_point(space, tmp_path)[0].batch_size == 8

    write_status(tmp_path, "failed", 1, error="RuntimeError: boom", world_size=2)
    assert recorded_out_of_memory_end(tmp_path) is None
    write_status(tmp_path, "failed", 1, error="OutOfMemoryEnd: out of memory", world_size=2,
                 out_of_memory=OutOfMemoryEnd(0.5, 2, 2).record())
    assert recorded_out_of_memory_end(tmp_path) == {"epoch": 1, "peak_mem_gib": 0.5, OOM_ENDED: 1}


def test_peak_memory_is_per_epoch_on_the_cpu():
    import mmap

    cpu = torch.device("cpu")
    reset_peak(cpu)
    before = peak_gib(cpu)
    # 64 MiB of new pages, touched (a malloc'd block could reuse pages a process that ran other
    # tests already holds: then nothing grows, as seen under pytest-xdist)
    block, page = mmap.mmap(-1, 64 * 2**20), b"\1" * 2**20
    for _ in range(64):
        block.write(page)
    grown = peak_gib(cpu)
    block.close()
    reset_peak(cpu)
    after = peak_gib(cpu)
    if math.isnan(before):
        pytest.skip("no /proc/self/status here")
    assert grown >= before + 0.05 and after < grown - 0.03


def test_an_n_worker_trial_that_ran_out_of_memory_reports_an_end_not_a_failure(tiny_data, tmp_path, monkeypatch):
    """`tuning.trial.run_trial` with 2 workers: when Ray Train raises and the rank that ran out
    recorded an `OutOfMemoryEnd` in status.json, the trial reports what a one-process trial
    reports (ended out of memory: the study's PRUNED, infeasible) instead of failing; any other
    error is raised, for Tune's retry. Ray's context and Ray Train are stood in for."""
    from types import SimpleNamespace

    import ray
    from ray import tune

    import tuning.ddp_trial as ddp_trial
    from conftest import write_space
    from tuning.space import load_space
    from tuning.trial import OOM_ENDED, TRIAL_THREAD_WAIT, run_trial

    for name, value in ((TRIAL_THREAD_WAIT[0], TRIAL_THREAD_WAIT[1]), ("CUDA_VISIBLE_DEVICES", "")):
        monkeypatch.setenv(name, value)   # what run_trial sets in its actor stays in this test
    space = load_space(write_space(tmp_path, tiny_data, search={"lr_head": {"loguniform": [1e-3, 2e-3]}},
                                   resources={"cpu": 1, "gpu": 0, "workers": 2}))
    search_dir = tmp_path / "out" / "s"
    (search_dir / "t001_x").mkdir(parents=True)
    reports: list[dict] = []
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(
        get_trial_dir=lambda: str(tmp_path / "ray" / "t001_x"), get_trial_id=lambda: "id1"))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node1"))
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))

    def workers_end(error: str, end: OutOfMemoryEnd | None):
        def run_workers(config, resources, run_dir, *args):
            assert config.run_name == "t001_x" and resources["workers"] == 2
            write_status(run_dir, "failed", 1, error=error, world_size=2, out_of_memory=end and end.record())
            raise RuntimeError("a Ray Train worker failed")
        return run_workers

    monkeypatch.setattr(ddp_trial, "run_workers", workers_end("OutOfMemoryEnd: ...", OutOfMemoryEnd(0.5, 2, 2)))
    run_trial({"lr_head": 1.5e-3}, space=space, search_dir=str(search_dir))
    assert len(reports) == 1 and reports[0]["epoch"] == 1, reports
    assert reports[0][OOM_ENDED] == 1 and reports[0]["peak_mem_gib"] == 0.5

    monkeypatch.setattr(ddp_trial, "run_workers", workers_end("RuntimeError: boom", None))
    with pytest.raises(RuntimeError, match="a Ray Train worker failed"):
        run_trial({"lr_head": 1.5e-3}, space=space, search_dir=str(search_dir))
    assert len(reports) == 1
