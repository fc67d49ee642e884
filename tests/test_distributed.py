"""DDP (headernet_core/distributed.py): a run under `torchrun --nproc_per_node 2` (gloo, CPU)
trains on the same global batches as one process, so its per-epoch metrics match one
process's to 1e-4, and its run folder is written once, by rank 0."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from headernet_core import distributed
from headernet_core.distributed import Ranks, batch_shares, rank_part
from headernet_core.errors import HeaderNetError, interrupts_held
from headernet_core.trainer import RUN_ARTIFACTS, prepare, train

REPO = Path(__file__).resolve().parents[1]
# Compared per epoch: the loss and every validation metric (not timings).
COMPARED = ("train_loss", "train_acc", "val_loss", "val_auc", "val_ap", "val_f1", "val_threshold",
            "val_acc", "lr_backbone", "lr_head")


@pytest.fixture
def torchrun(tmp_path_factory):
    """Starts `torchrun --standalone --nproc_per_node 2 ...` (a free port each); whatever is
    left of a launch when the test ends is killed (its own process group). Its temp folder is
    pytest's: torchrun leaves a `torchelastic_*` log folder behind at every launch."""
    started: list[subprocess.Popen] = []
    tmp = tmp_path_factory.mktemp("torchrun_tmp")

    def launch(*args: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node", "2", *args], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        started.append(proc)
        return proc
    yield launch
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cli_args(config) -> list[str]:
    """The flags of a config's non-default values (what the test sets)."""
    flags = []
    for key, value in config.to_dict().items():
        if key in ("train_csv", "val_csv", "output_root", "run_name", "epochs", "batch_size",
                   "num_frames", "input_size", "backbone", "vmae_variant", "lr_backbone", "lr_head",
                   "warmup_epochs", "head_dropout", "num_workers"):
            flags += [f"--{key}", str(value)]
    return flags + ["--cpu", "--no-progress", "--no-augment"]


def assert_same_epochs(run: Path, reference: Path) -> None:
    got, want = pd.read_csv(run / "metrics_epoch.csv"), pd.read_csv(reference / "metrics_epoch.csv")
    assert list(got["epoch"]) == list(want["epoch"])
    for column in COMPARED:
        assert np.allclose(got[column], want[column], rtol=0, atol=1e-4, equal_nan=True), \
            (column, list(got[column]), list(want[column]))


def assert_written_once(run: Path, world: int) -> None:
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["world_size"] == world
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "status.json", "metrics_epoch.csv",
                                               "best_metrics.json", "val_predictions.csv", "checkpoints"}
    assert max(p.name for p in (run / "checkpoints").iterdir()) == "last.pt"
    assert len(list((run / "checkpoints").iterdir())) == 2      # last.pt and one best
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


# --- the arithmetic of shares: no clip lost or counted twice, the global mean kept -----------------
@pytest.mark.parametrize("clips,batch", [(18, 4), (9, 4), (17, 8), (1, 2)])
def test_shares_cover_each_global_batch_once(clips, batch):
    world = 2
    keys = list(range(clips))
    groups = [keys[i:i + batch] for i in range(0, clips, batch)]
    per_rank = [batch_shares(clips, batch, Ranks(r, world)) for r in range(world)]
    for b, group in enumerate(groups):
        parts = [rank_part(group, Ranks(r, world))[:per_rank[r][b].real] for r in range(world)]
        assert [key for part in parts for key in part] == group   # in order, each once (no pads)
        # DDP averages over ranks: sum_r scale_r / world weights every real clip 1/len(group)
        assert sum(per_rank[r][b].loss_scale for r in range(world)) / world == pytest.approx(1.0)
    assert batch_shares(clips, batch, Ranks()) is None


def test_bad_ddp_inputs_fail_before_anything_is_written(tiny_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(HeaderNetError, match="--batch_size 4 is the global batch and must divide by the 3"):
        prepare(tiny_config())
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HeaderNetError, match="--gpus .*does not combine"):
        prepare(tiny_config(cpu=False, gpus=[0]))


# --- BatchNorm over the global batch on the CPU (torch's SyncBatchNorm refuses CPU tensors) ---------
def test_global_batchnorm_in_two_gloo_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    """Two spawned gloo ranks take parts of 3 and 2 clips of each batch through a converted
    BatchNorm1d, 2d and 3d (training mode, two steps, momentum 0.1 and None): the parts'
    outputs and input gradients, the weight/bias gradients summed over the ranks, and every
    rank's running_mean, running_var and num_batches_tracked equal the torch BatchNorm's on the
    whole batch to 1e-5."""
    import torch
    import torch.multiprocessing as mp

    sys.path.insert(0, str(REPO / "tests"))
    from ddp_runs import global_batchnorm_rank

    mp.spawn(global_batchnorm_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sorted(dims for dims, _ in ranks[0]) == [1, 1, 2, 2, 3, 3]
    for (dims, momentum), first in ranks[0].items():
        reference = getattr(torch.nn, f"BatchNorm{dims}d")(3, momentum=momentum)
        reference.load_state_dict(first["start"])
        for step, (x, mix) in enumerate(first["steps"]):
            whole = x.clone().requires_grad_(True)
            reference.zero_grad()
            out = reference(whole)
            (out * mix).sum().backward()
            saved = [rank[dims, momentum]["saved"][step] for rank in ranks]
            got = {"out": torch.cat([s["out"] for s in saved]), "grad": torch.cat([s["grad"] for s in saved]),
                   "weight": saved[0]["weight"] + saved[1]["weight"], "bias": saved[0]["bias"] + saved[1]["bias"]}
            want = {"out": out.detach(), "grad": whole.grad, "weight": reference.weight.grad,
                    "bias": reference.bias.grad}
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                want[name] = getattr(reference, name)
                assert torch.equal(saved[0][name], saved[1][name]), (dims, momentum, step, name)
                got[name] = saved[0][name]
            for name, value in want.items():
                assert torch.allclose(got[name].double(), value.double(), rtol=0, atol=1e-5), \
                    (dims, momentum, step, name, got[name], value)
        assert int(reference.num_batches_tracked) == 2


def test_a_rank_removes_the_interrupt_markers_of_launchers_that_have_exited(tmp_path, monkeypatch):
    """`LauncherInterrupts` marks, per launcher, that a rank told it of a Ctrl-C; the next run
    under torchrun removes the marks of launchers that are gone and keeps a running one's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    prefix = distributed.LauncherInterrupts.MARKER_PREFIX
    gone, running = tmp_path / f"{prefix}{exited.pid}-x.interrupted", tmp_path / f"{prefix}{os.getpid()}-x.interrupted"
    other = tmp_path / f"{prefix}notapid.interrupted"
    for marker in (gone, running, other):
        marker.touch()
    with distributed.LauncherInterrupts():
        assert signal.getsignal(signal.SIGTERM).__func__ is distributed.LauncherInterrupts._handle
    assert not gone.exists() and running.exists() and other.exists()


@pytest.fixture
def rank_0_interrupts(tmp_path, monkeypatch):
    """(rank 0's LauncherInterrupts, its launcher): a stand-in launcher (`sleep`) that rank 0
    tells, not pytest."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    launcher = subprocess.Popen(["sleep", "60"])
    monkeypatch.setattr(os, "getppid", lambda: launcher.pid)
    interrupts = distributed.LauncherInterrupts()
    interrupts.launcher = launcher.pid
    yield interrupts, launcher
    launcher.kill()


def test_a_rank_acts_on_its_first_signal_only(rank_0_interrupts):
    """A peer's failure makes torchrun signal rank 0, and signal it again once rank 0 tells it:
    the second signal must not interrupt rank 0 while it records the end (status.json stayed
    `running` under load)."""
    interrupts, launcher = rank_0_interrupts
    recorded = []
    with pytest.raises(KeyboardInterrupt), interrupts:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)   # the handler raises here
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGTERM)   # the launcher's second SIGTERM
            time.sleep(0.2)
            recorded.append("interrupted")
            raise
    assert launcher.wait(timeout=10) == -signal.SIGTERM   # told
    assert recorded == ["interrupted"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # restored on exit


def test_a_signal_while_rank_0_records_an_error_waits_for_the_record(rank_0_interrupts):
    """A peer's failure reaches rank 0 as a broken collective and, at about the same time, as
    the launcher's SIGTERM: the signal, landing while rank 0 records the first, must not cut
    the record off (status.json stayed `running` under load); it acts right after it."""
    interrupts, launcher = rank_0_interrupts
    recorded = []
    with pytest.raises(KeyboardInterrupt), interrupts:
        try:
            raise RuntimeError("Connection closed by peer")   # the broken collective
        except RuntimeError:
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGTERM)   # the launcher's, mid-record
                time.sleep(0.2)
                recorded.append("failed")
            recorded.append("not reached: the held signal acts here")
    assert launcher.wait(timeout=10) == -signal.SIGTERM   # rank 0 still tells the launcher
    assert recorded == ["failed"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # restored on exit


def test_the_trainer_records_a_failure_before_a_signal_that_lands_meanwhile(tiny_config, tmp_path):
    """The trainer holds interrupts while it records how a run ended: a SIGINT that lands
    inside the record (the launcher's, or a Ctrl-C) acts once status.json says `failed`."""
    config = tiny_config(epochs=2)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    code = f"""
import json, os, signal
import headernet_core.trainer as trainer
from headernet_core.config import TrainConfig

real_write = trainer.write_status

def write_status(run_dir, state, *args, **kwargs):
    if state == "failed":
        os.kill(os.getpid(), signal.SIGINT)   # lands mid-record
    return real_write(run_dir, state, *args, **kwargs)

def peer_failed(report):
    raise RuntimeError("Connection closed by peer")

trainer.write_status = write_status
try:
    trainer.train(TrainConfig.from_dict(json.load(open({str(tmp_path / "config.json")!r}))), on_epoch=peer_failed)
except KeyboardInterrupt:
    print("KeyboardInterrupt after the record")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert "KeyboardInterrupt after the record" in done.stdout, done.stderr[-2000:]
    status = json.loads((Path(config.output_root) / config.run_name / "status.json").read_text())
    assert status["state"] == "failed" and "Connection closed by peer" in status["error"], status


def test_global_batchnorm_keeps_frozen_batchnorm_frozen_and_is_batchnorm_without_a_group():
    """The converter swaps every BatchNorm3d of ir-CSN, keeping its tensors (so requires_grad)
    and training flag; `--bn_frozen`'s BatchNorm stays in eval mode under the model's train(),
    a trained one follows it. Without a process group it computes what BatchNorm3d does."""
    import torch

    from headernet_core.backbones import create_backbone
    from headernet_core.distributed import GlobalBatchNorm3d, convert_global_batchnorm
    from headernet_core.model import HeaderClassifier, freeze_batchnorm

    for frozen in (True, False):
        model = HeaderClassifier(create_backbone("csn", "tiny")[0], dropout=0.0)
        if frozen:
            freeze_batchnorm(model)
        model.eval()
        before = [(m, m.weight, m.running_mean) for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
        assert before and convert_global_batchnorm(model) is model
        after = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
        assert len(after) == len(before) and all(type(m) is GlobalBatchNorm3d for m in after)
        assert all(m.weight is w and m.running_mean is r and not m.training
                   for m, (_, w, r) in zip(after, before))
        model.train()
        assert all(m.training != frozen and m.weight.requires_grad != frozen for m in after)

    torch.manual_seed(0)
    plain, x = torch.nn.BatchNorm3d(4, momentum=None), torch.randn(3, 4, 2, 3, 3)
    converted = convert_global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm3d(4, momentum=None)))[0]
    for _ in range(2):
        assert torch.equal(converted(x), plain(x))
    assert torch.equal(converted.running_var, plain.running_var)
    assert int(converted.num_batches_tracked) == 2


# --- torchrun on the CPU ---------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_matches_one_process_interrupts_and_resumes(tiny_config, torchrun):
    """Augmentation off, dropout 0, 18 train clips in batches of 4 (a short last batch) and 9
    val clips (a last batch of 1: rank 1 pads). SIGTERM to rank 1 ends both ranks, the run
    `interrupted`; `--resume` under torchrun finishes it exactly as one uninterrupted process."""
    config = tiny_config(augment=False, head_dropout=0.0, epochs=8, run_name="ddp")
    reference = train(config.replace(run_name="one"), log=lambda _: None).run_dir

    proc = torchrun("-m", "headernet_core.train", *cli_args(config))
    run = Path(config.output_root) / "ddp"
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True,
                           check=False).stdout.split()
    assert len(ranks) == 2, proc.communicate()
    os.kill(max(map(int, ranks)), signal.SIGTERM)   # the later-started rank (rank 1)
    _, err = proc.communicate(timeout=120)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and 1 <= status["epochs_done"] < 8, (status, err)
    assert proc.returncode != 0

    proc = torchrun("-m", "headernet_core.train", "--resume", "--run_name", "ddp", "--output_root",
                    config.output_root, "--no-progress")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.count("finished: best epoch") == 1 and "resuming" in out   # rank 0 alone prints
    assert_same_epochs(run, reference)
    assert_written_once(run, world=2)

    bad = torchrun("-m", "headernet_core.train", *cli_args(config.replace(run_name="bad", batch_size=3)))
    _, err = bad.communicate(timeout=120)
    assert bad.returncode != 0 and err.count("error: --batch_size 3 is the global batch") == 1, err


@pytest.mark.slow
def test_torchrun_augmented_csn_and_feature_cache_runs_match_one_process(tiny_config, torchrun):
    """Augmentation on; a tiny ir-CSN whose BatchNorm trains on the global batch's statistics
    (GlobalBatchNorm3d, gloo); a frozen VideoMAE on the feature cache (rank 0 fills it, rank 1
    reads it) in batches of 8 (8, 8, 2)."""
    configs = [tiny_config(augment=True, head_dropout=0.0, run_name="aug"),
               tiny_config(backbone="csn", head_dropout=0.0, run_name="csn"),
               tiny_config(finetune_mode="frozen", head_dropout=0.0, batch_size=8, epochs=3,
                           run_name="frozen", feature_cache_dir=str(Path(tiny_config().output_root) / "cache_ddp"))]
    for config in configs:
        train(config.replace(run_name=f"{config.run_name}-one", feature_cache_dir=None), log=lambda _: None)
    proc = torchrun(str(REPO / "tests" / "ddp_runs.py"), json.dumps([c.to_dict() for c in configs]))
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("computed by the backbone") == 1    # the cache filled once, logged by rank 0
    for config in configs:
        run = Path(config.output_root) / config.run_name
        assert_same_epochs(run, run.with_name(f"{config.run_name}-one"))
        assert_written_once(run, world=2)
    assert set(RUN_ARTIFACTS) >= {p.name for p in run.iterdir()} - {".lock"}


@pytest.mark.slow
def test_torchrun_out_of_memory_on_rank_1_halves_the_batch_through_a_resume(tiny_config, torchrun, monkeypatch):
    """Rank 1 alone runs out of memory in epoch 2 at the initial global batch 4: the run ends
    (the ranks cannot agree in-process), config.yaml holds batch 2 x 2 accumulation and rank 0
    records why; `--resume` continues at that batch on both ranks and equals one process that
    backed off in-process (tests/test_oom.py)."""
    from headernet_core.memory import OOM_TEST_ENV

    config = tiny_config(augment=False, head_dropout=0.0, epochs=3, run_name="ddp")
    monkeypatch.setenv(OOM_TEST_ENV, "2:2")       # one process: its epoch 2 above batch 2
    reference = train(config.replace(run_name="one"), log=lambda _: None)
    assert (reference.config.batch_size, reference.config.grad_accum) == (2, 2)

    monkeypatch.setenv(OOM_TEST_ENV, "2:2:1")     # torchrun: rank 1 only
    proc = torchrun("-m", "headernet_core.train", *cli_args(config))
    out, err = proc.communicate(timeout=300)
    run = Path(config.output_root) / "ddp"
    assert proc.returncode != 0, err[-3000:]
    assert out.count("out of memory in epoch 2 at batch 4") == 1 and "on DDP rank 1" in out, (out, err[-3000:])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["batch_size"], saved["grad_accum"]) == (2, 2)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["epochs_done"] == 1, (status, out[-3000:], err[-3000:])
    assert "config.yaml now holds batch 2 x 2" in status["error"], status

    monkeypatch.delenv(OOM_TEST_ENV)
    proc = torchrun("-m", "headernet_core.train", "--resume", "--run_name", "ddp", "--output_root",
                    config.output_root, "--no-progress")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming" in out and out.count("finished: best epoch") == 1
    assert_same_epochs(run, reference.run_dir)
    assert_written_once(run, world=2)


@pytest.mark.slow
def test_torchrun_out_of_memory_with_no_halving_left_ends_as_one_process_ends(tiny_config, torchrun, monkeypatch):
    """Global batch 2 on 2 ranks has no half that divides by them: rank 1 running out of memory
    records `OutOfMemoryEnd` in status.json, which rank 0 keeps (a search tells Optuna PRUNED,
    infeasible, as for one process); config.yaml is unchanged."""
    from headernet_core.memory import OOM_TEST_ENV

    config = tiny_config(augment=False, head_dropout=0.0, batch_size=2, epochs=1, run_name="end")
    monkeypatch.setenv(OOM_TEST_ENV, "1:0:1")
    proc = torchrun("-m", "headernet_core.train", *cli_args(config))
    out, err = proc.communicate(timeout=300)
    run = Path(config.output_root) / "end"
    assert proc.returncode != 0
    assert out.count("out of memory at global batch 2 of 2 DDP processes") == 1, (out, err[-3000:])
    assert "in epoch 1 on DDP rank 1: nothing smaller is left to try" in out
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["error"].startswith("OutOfMemoryEnd: out of memory at global batch 2"), status
    assert (status["out_of_memory"]["batch"], status["out_of_memory"]["world"]) == (2, 2), status
    assert yaml.safe_load((run / "config.yaml").read_text())["batch_size"] == 2


# --- a search whose trials are 2 DDP workers (Ray Train) -------------------------------------------
@pytest.mark.slow(seconds=150)
def test_a_search_of_two_worker_trials_survives_kills_stops_early_and_matches_one_process(epoch_data, tmp_path):
    """resources.workers 2 with 1 CPU each on the 2-core test machine; 2 trials of 12 epochs, one
    at a time, ASHA (rungs at epochs 1, 2, 4, 8), max_failures 1. In phases:
    (A group this machine cannot place is refused before Ray starts: tests/test_bad_inputs.py.)
    1. Trial 1 (sampler seed 6: lr_head 4.8e-3): SIGKILL to its rank 0 after epoch 1, and Tune
       retries it, whose new workers continue after that epoch; Ctrl-C (SIGINT) to the search
       from epoch 3: exit 130 with a --resume hint.
    2. --resume: trial 1 finishes on 2 workers; trial 2 (lr_head 9.9e-5) learns slower, and ASHA
       stops it at its first rung, epoch 1 (val_loss 0.071 against trial 1's best by its epoch
       5, 0.041: a resumed search's ASHA starts empty, and trial 1's epochs after the resume
       fill its rungs).
    Then: every trial trained in 2 ranks, the rows written before each stop stay as written,
    the study holds each trial once in its state, and trial 1 equals one process running its
    config.yaml. (A Ray Train trial start costs ~35 s of CPU here and a search start ~10 s:
    these phases start 4 and 2.)

    Ray Train hands an epoch's report to Tune up to ~2 s later (its controller polls the
    workers every 2 s), while an epoch takes ~0.35 s here: ASHA's stop reaches trial 2 one or
    more epochs after the epoch it was decided at (the 11 epochs left are for it to land
    before the trial ends by itself). The study hears of the epochs up to the stop only
    (`test_search.stop_epoch`)."""
    from headernet_core.config import TrainConfig
    from headernet_core.locks import owner_alive
    sys.path.insert(0, str(REPO / "tests"))
    from test_search import assert_study_states, running_trial, start_search, write_space

    epochs = 12
    space = write_space(tmp_path, epoch_data,
                        search={"lr_head": {"loguniform": [1e-5, 1e-2]}},
                        trainer={"epochs": epochs, "batch_size": 4, "augment": False, "head_dropout": 0.0,
                                 "plots": True, "backbone": "vmae"},
                        budget={"num_samples": 2, "max_concurrent": 1, "seed": 6},
                        objective={"metric": "val_loss"}, max_failures=1,
                        resources={"cpu": 1, "gpu": 0, "workers": 2})
    search_dir = tmp_path / "out" / "s"

    # 1. trial 1: rank 0 killed in epoch 2 (Tune retries the trial), the search Ctrl-C'd in epoch 3
    proc = start_search(space, tmp_path)
    held = None
    try:
        _, killed, before_kill = running_trial(proc, search_dir, epochs=1)
        os.kill(killed["pid"], signal.SIGKILL)
        trial, held, _ = running_trial(proc, search_dir, epochs=2, not_pid=killed["pid"])
        # An epoch takes ~0.35 s here, and a trial's workers run on after Tune stops the trial
        # until the search has stopped Ray (seconds): trial 1 could finish before the search
        # does. Rank 0 is held (SIGSTOP) from here, as long as a real epoch would take; what it
        # wrote by then (epoch 2, or a little later on a loaded machine) is the record to keep.
        os.kill(held["pid"], signal.SIGSTOP)
        record = json.loads((trial / "status.json").read_text())
        assert record["state"] == "running" and record["epochs_done"] < epochs - 1, f"trial 1 ran on: {record}"
        before_ctrl_c = pd.read_csv(trial / "metrics_epoch.csv").iloc[:record["epochs_done"]]
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=400)[0]
        assert proc.returncode == 130 and "--resume" in output, output[-3000:]
        if owner_alive(held, None):
            os.kill(held["pid"], signal.SIGKILL)

        # 2. resumed: trial 1 finishes, trial 2 runs until ASHA stops it
        proc = start_search(space, tmp_path, "--resume")
        output = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if held is not None and owner_alive(held, None):
            os.kill(held["pid"], signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]

    summary = json.loads((search_dir / "search_summary.json").read_text())
    first, second = sorted(summary["trials"], key=lambda t: t["name"])   # t001_..., t002_...: launch order
    states = {t["name"]: json.loads((search_dir / t["name"] / "status.json").read_text()) for t in summary["trials"]}
    assert all(s["world_size"] == 2 for s in states.values()), states
    assert first["status"] == "finished" and first["epochs_run"] == epochs, summary["trials"]
    # the last epochs by the resumed search's workers, after the killed and the held rank 0
    assert states[first["name"]]["pid"] not in (killed["pid"], held["pid"]), states
    metrics = pd.read_csv(search_dir / first["name"] / "metrics_epoch.csv")
    assert list(metrics["epoch"]) == list(range(1, epochs + 1))
    for written in (before_kill, before_ctrl_c):   # not trained again: the rows (timings included) as written
        pd.testing.assert_frame_equal(metrics.iloc[:len(written)], written)
    assert second["status"] == "stopped_early" and states[second["name"]]["state"] == "stopped", summary["trials"]
    assert (search_dir / second["name"] / "plots" / "loss.png").is_file()
    # the study: each trial once, trial 1 COMPLETE, trial 2 PRUNED at ASHA's epoch (1), which
    # it may have trained past before the stop reached it
    assert_study_states(search_dir, summary)
    stop = json.loads((search_dir / second["name"] / "scheduler_stop.json").read_text())["epoch"]
    assert stop == 1 and stop <= second["epochs_run"] < epochs, (stop, second)

    values = yaml.safe_load((search_dir / first["name"] / "config.yaml").read_text())
    values.update(output_root=str(tmp_path / "again"), run_name="one", resume=False, overwrite=False,
                  feature_cache_dir=None)
    train(TrainConfig.from_dict(values, source="test"), log=lambda _: None)
    assert_same_epochs(search_dir / first["name"], tmp_path / "again" / "one")


def test_worker_groups_the_cluster_can_place_and_a_batch_the_workers_split(tiny_data, tmp_path):
    from tuning.ddp_trial import placeable_trials
    from tuning.space import load_space
    sys.path.insert(0, str(REPO / "tests"))
    from test_search import write_space

    assert placeable_trials({"cpu": 1, "gpu": 0, "workers": 2}, {"CPU": 2.0}) == 1   # no CPU token
    assert placeable_trials({"cpu": 1, "gpu": 0, "workers": 3}, {"CPU": 2.0}) == 0
    assert placeable_trials({"cpu": 4, "gpu": 1, "workers": 2}, {"CPU": 16.0, "GPU": 3.0}) == 1
    space = write_space(tmp_path, tiny_data, resources={"cpu": 1, "gpu": 0, "workers": 4})  # batch_size 6
    with pytest.raises(HeaderNetError, match="resources.workers: 4 DDP workers .* must divide by 4 .got 6"):
        load_space(space)
    assert load_space(write_space(tmp_path, tiny_data, resources={"workers": 2, "gpu": 0})).resources["workers"] == 2
    assert "workers" not in load_space(write_space(tmp_path, tiny_data)).resources
