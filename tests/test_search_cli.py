"""The search CLI's checks that run before Ray starts (fast): checkpoints reachable only through
a choice's overrides, storage URLs, and --resume flags that ask for a different search."""
from __future__ import annotations

import json
from pathlib import Path

import conftest
import pytest
import yaml

from tuning import resume_guard
from tuning.search import main


def write_space(folder: Path, tiny_data, search: dict) -> Path:
    """conftest's tiny space, one trial at a time."""
    return conftest.write_space(folder, tiny_data, search=search,
                                budget={"num_samples": 3, "max_concurrent": 1, "seed": 0})


def error_of(args: list[str], capsys) -> str:
    import ray
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1, err
    assert not ray.is_initialized()
    return lines[0]


def test_a_checkpoint_needed_only_through_a_choices_overrides_is_checked(tiny_data, tmp_path, capsys):
    space = write_space(tmp_path, tiny_data, {"backbone": {
        "choice": ["csn", "vmae"],
        "overrides": {"vmae": {"vmae_variant": "large", "checkpoint_root": "ckpts_here"}}}})
    line = error_of(["--space", str(space)], capsys)
    # relative paths are resolved against the folder the search starts from
    assert f"{Path.cwd() / 'ckpts_here' / 'VideoMAEv2-Large'}" in line, line
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_file_among_choices_is_checked(tiny_data, tmp_path, capsys):
    real = tmp_path / "real.pth"
    real.write_bytes(b"")
    space = write_space(tmp_path, tiny_data, {"backbone_ckpt": {
        "choice": [str(real), str(tmp_path / "missing.pth")]}})
    assert "missing.pth not found" in error_of(["--space", str(space)], capsys)


SHAPES = [  # settings the trainer's backbone-geometry check refuses, wherever the space sets them
    ({"lr_head": {"loguniform": [1e-4, 1e-3]}}, ["--set", "input_size=30"],
     "trainer.input_size (from --set): --input_size 30 must be a multiple of the VideoMAE patch size 8"),
    ({"lr_head": {"loguniform": [1e-4, 1e-3]}}, ["--set", "num_frames=3"],
     "trainer.num_frames (from --set): --num_frames 3 must be a multiple of the VideoMAE tubelet size 2"),
    ({"backbone": {"choice": ["vmae", "csn"]}}, ["--set", "input_size=16"],
     "--input_size 16 is too small for --backbone csn: its strides need at least 32 pixels"),
    ({"vmae_variant": {"choice": ["tiny", "giant"]}}, [],
     "trainer.input_size: --input_size 32 must be a multiple of the VideoMAE patch size 14"),
    ({"backbone": {"choice": ["csn", "vmae"], "overrides": {"vmae": {"num_frames": 5}}}}, [],
     "search.backbone.overrides.vmae: --num_frames 5 must be a multiple of the VideoMAE tubelet"),
    ({"input_size": {"int": [32, 64]}}, [],
     "search.input_size: --input_size 33 must be a multiple of the VideoMAE patch size 8"),
    ({"num_frames": {"int": [2, 9]}}, [],
     "search.num_frames: --num_frames 3 must be a multiple of the VideoMAE tubelet size 2"),
    ({"num_frames": {"choice": [4, 50]}}, [],   # the trainer's frame check against the clips
     "--num_frames 50 is more than 8x the longest clip (6 frames"),
    ({"num_frames": {"int": [2, 50], "step": 2}}, [], "--num_frames 50 is more than 8x the longest clip"),
]


@pytest.mark.parametrize("search, flags, fragment", SHAPES)
def test_a_shape_the_backbone_refuses_is_one_line_before_ray(tiny_data, tmp_path, capsys, search,
                                                             flags, fragment):
    """Each choice, override, fixed key and range edge goes through the trainer's own check:
    one error line, exit 2, no search folder (not a search whose every trial fails)."""
    space = write_space(tmp_path, tiny_data, search)
    line = error_of(["--space", str(space), *flags], capsys)
    assert line.startswith(f"error: {space}: ") and fragment in line, line
    assert not (tmp_path / "out").exists()


def test_ranges_on_the_backbones_grid_pass(tiny_data, tmp_path):
    from tuning.space import load_space

    search = {"input_size": {"int": [32, 64], "step": 8}, "num_frames": {"int": [2, 8], "step": 2}}
    space = load_space(str(write_space(tmp_path, tiny_data, search)))
    assert [p.name for p in space.params] == ["input_size", "num_frames"]


def test_storage_urls_are_refused(tiny_data, tmp_path, capsys):
    space = write_space(tmp_path, tiny_data, {"lr_head": {"loguniform": [1e-4, 1e-3]}})
    assert "URLs are not supported" in error_of(["--space", str(space), "--storage_path", "s3://b/x"], capsys)


def started_search(tmp_path: Path, tiny_data) -> tuple[Path, Path]:
    """A search folder as an interrupted search leaves it (no Ray needed to check --resume)."""
    space = write_space(tmp_path, tiny_data, {"lr_head": {"loguniform": [1e-4, 1e-3]}})
    search_dir = tmp_path / "out" / "s"
    search_dir.mkdir(parents=True)
    (search_dir / "tuner.pkl").write_bytes(b"")
    resume_guard.record(search_dir, {"tuner.pkl": b"", "experiment_state-x.json": b"{}"}, fresh=True)
    (search_dir / "search.json").write_text(json.dumps({
        "space_file": str(space), "space_yaml": space.read_text(), "sets": [],
        "num_samples": None, "max_concurrent": None, "cwd": str(tmp_path),
        "args": {"sets": [], "keep_checkpoints": "best_trial", "train_csv": None, "val_csv": None}}))
    return space, search_dir


@pytest.mark.parametrize("extra, fragment", [
    (["--num_samples", "9"], "--num_samples 9 (started with the space file)"),
    (["--max_concurrent", "4"], "--max_concurrent 4"),
    (["--set", "epochs=5"], "--set epochs=5 (started with none)"),
    (["--train_csv", "other.csv"], "--train_csv other.csv"),
    (["--warm_start", "elsewhere"], "--warm_start elsewhere (started with none)"),   # imported once, at the start
])
def test_resume_refuses_flags_that_describe_another_search(tiny_data, tmp_path, capsys, extra, fragment):
    space, _ = started_search(tmp_path, tiny_data)
    line = error_of(["--space", str(space), "--resume", *extra], capsys)
    assert "--resume continues the search as it was started" in line and fragment in line, line


def test_resume_refuses_another_space(tiny_data, tmp_path, capsys):
    started_search(tmp_path, tiny_data)
    other = tmp_path / "other"
    other.mkdir()
    other_space = write_space(other, tiny_data, {"lr_head": {"loguniform": [1e-4, 1e-3]}})
    line = error_of(["--space", str(other_space), "--resume", "--storage_path", str(tmp_path / "out")], capsys)
    assert f"started with {tmp_path / 'space.yaml'}" in line, line


@pytest.mark.parametrize("given, kept", [([], "best_trial"), (["--keep_checkpoints", "all"], "all")])
def test_resume_keeps_the_searchs_checkpoint_policy_unless_told(tiny_data, tmp_path, monkeypatch,
                                                                  given, kept):
    import tuning.search as search

    space, _ = started_search(tmp_path, tiny_data)
    args = search.parse_args(["--space", str(space), "--resume", *given])
    assert search.plan_search(args).keep_checkpoints == kept


def test_gpu_trials_need_a_node_that_holds_their_gpus(tiny_data, tmp_path):
    from headernet_core.errors import HeaderNetError
    from tuning.search import check_cluster_gpus
    from tuning.space import load_space

    space = load_space(str(write_space(tmp_path, tiny_data, {"lr_head": {"loguniform": [1e-4, 1e-3]}})),
                       sets=["resources.gpu=2", "cpu=false"])
    node = lambda gpus, alive=True: {"Alive": alive, "Resources": {"CPU": 8, "GPU": gpus}}  # noqa: E731
    check_cluster_gpus(space, [node(1), node(2)])
    for nodes in ([node(1), node(1), node(1)], [node(1), node(4, alive=False)], [{"Alive": True, "Resources": {}}]):
        with pytest.raises(HeaderNetError, match="largest node has"):
            check_cluster_gpus(space, nodes)


def test_resume_with_a_damaged_search_record_is_one_line(tiny_data, tmp_path, capsys):
    space, search_dir = started_search(tmp_path, tiny_data)
    (search_dir / "search.json").write_text("{not json")
    assert "search.json: unreadable or incomplete" in error_of(["--space", str(space), "--resume"], capsys)


def test_resume_of_a_finished_search_is_one_line_that_points_to_retrain(tiny_data, tmp_path, capsys):
    space, search_dir = started_search(tmp_path, tiny_data)
    (search_dir / "search_summary.json").write_text(json.dumps({"state": "finished"}))
    line = error_of(["--space", str(space), "--resume"], capsys)
    assert "has finished, there is nothing to resume" in line and "tuning.retrain" in line


def test_a_resumed_search_resolves_relative_paths_where_it_was_started(tiny_data, tmp_path, monkeypatch):
    from tuning.search import StartRecord, parse_args, resolve_space

    space = write_space(tmp_path, tiny_data, {"backbone": {
        "choice": ["csn", "vmae"], "overrides": {"vmae": {"checkpoint_root": "ckpts"}}}})
    saved = {"space_file": str(space), "space_yaml": space.read_text(), "sets": [],
             "num_samples": None, "max_concurrent": None, "cwd": str(tmp_path / "launch")}
    monkeypatch.chdir(tmp_path)  # resumed from another folder
    resolved = resolve_space(parse_args(["--space", str(space), "--resume"]), StartRecord(**saved))
    overrides = next(p for p in resolved.params if p.name == "backbone").overrides
    assert overrides["vmae"]["checkpoint_root"] == str(tmp_path / "launch" / "ckpts")
    assert resolved.trainer["checkpoint_root"] == str(tmp_path / "launch" / "checkpoints")


def test_a_second_search_on_the_same_folder_is_refused(tiny_data, tmp_path, capsys):
    """One search per folder: a live owner (here this process, as another search would be)
    keeps a second start or --resume out; nothing is written."""
    from headernet_core.locks import FolderLock

    space, search_dir = started_search(tmp_path, tiny_data)
    before = sorted(p.name for p in search_dir.iterdir())
    with FolderLock(search_dir, "a search"):
        line = error_of(["--space", str(space), "--resume"], capsys)
        assert "is in use by a search (pid" in line, line
        other = tmp_path / "out" / "fresh"
        with FolderLock(other, "a search"):
            assert "is in use by a search" in error_of(["--space", str(space), "--name", "fresh"], capsys)
    assert sorted(p.name for p in search_dir.iterdir()) == before


def test_a_search_warns_about_splits_that_leak(tiny_data, tmp_path, monkeypatch):
    import tuning.search as search

    space = write_space(tmp_path, tiny_data, {"lr_head": {"loguniform": [1e-4, 1e-3]}})
    args = search.parse_args(["--space", str(space), "--val_csv", str(tiny_data["train_csv"])])

    def stop_before_ray(address, quiet):
        raise RuntimeError("stop before Ray")
    monkeypatch.setattr(search, "start_ray", stop_before_ray)
    with pytest.warns(UserWarning, match="is both --train_csv and --val_csv"):
        with pytest.raises(RuntimeError, match="stop before Ray"):
            search.run_search(args)


def test_the_demo_data_never_goes_to_a_users_test_csv(tmp_path, monkeypatch):
    """`--space demo --test_csv mine.csv`: the demo's test split is its own file; the user's
    CSV is read by the retrain, never written."""
    import dataclasses

    from tuning.search import absolute_paths, prepare_demo_data
    from tuning.space import load_space

    monkeypatch.chdir(tmp_path)
    user = tmp_path / "mine.csv"
    user.write_text("path,label\nx.npy,1\n")
    space = absolute_paths(load_space("demo"), tmp_path)
    space = dataclasses.replace(space, retrain={**space.retrain, "test_csv": str(user)})
    prepare_demo_data(space)
    assert user.read_text() == "path,label\nx.npy,1\n"
    splits = tmp_path / "demo_data" / "splits"
    assert sorted(p.name for p in splits.iterdir()) == ["test.csv", "train.csv", "val.csv"]


@pytest.mark.parametrize("summary, flags, fragment", [
    ('{"best_trial": "t001"}', [], "best_trial.name must be a plain folder name"),
    ('[1, 2]', [], "not the JSON object a search writes"),
    ('{"best_trial": {"nam": "t001"}}', [], "best_trial.name must be a plain folder name"),
    ('{"best_trial": {"name": "../elsewhere"}}', [], "best_trial.name must be a plain folder name"),
    ('{"best_trial": null}', [], "the search has no best trial"),
    ('{"best_trial": {"name": "t001"}}', ["--name", "../x"], "--name must be a plain folder name"),
    ('{"best_trial": {"name": "t001"}}', ["--name", ""], "--name must be a plain folder name"),
])
def test_retrain_of_a_damaged_or_odd_search_folder_is_one_line(tmp_path, capsys, summary, flags, fragment):
    from tuning.retrain import main as retrain_main

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "search_summary.json").write_text(summary)
    with pytest.raises(SystemExit) as exc:
        retrain_main([str(tmp_path / "s"), "--epochs", "1", *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("damage, flags, fragment", [
    ({"search.json": {"args": []}}, ["--resume"], "search.json: unreadable or incomplete"),
    ({"search.json": {"space_file": 5}}, ["--resume"], "search.json: unreadable or incomplete"),
    ({"search_summary.json": []}, [], "holds an unfinished search"),
])
def test_odd_json_in_a_search_folder_is_one_line(tiny_data, tmp_path, capsys, damage, flags, fragment):
    space, search_dir = started_search(tmp_path, tiny_data)
    for name, change in damage.items():
        record = search_dir / name
        value = json.loads(record.read_text()) if record.is_file() else {}
        record.write_text(json.dumps({**value, **change} if isinstance(change, dict) else change))
    assert fragment in error_of(["--space", str(space), *flags], capsys)


@pytest.mark.parametrize("threshold", ['"val_threshold": NaN, ', '', '"val_threshold": "x", ',
                                       '"val_threshold": true, '])
def test_retrain_on_train_plus_val_without_a_trial_threshold_stops_before_training(
        tiny_data, tmp_path, capsys, monkeypatch, threshold):
    """--train_on_val scores the test split at the trial's validation threshold: a trial
    without one is refused before the retrain trains, not after."""
    import headernet_core.trainer
    from tuning.retrain import main as retrain_main

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained before the refusal")
    monkeypatch.setattr(headernet_core.trainer, "train", must_not_train)
    trial = tmp_path / "s" / "t001"
    trial.mkdir(parents=True)
    trial.joinpath("config.yaml").write_text(yaml.safe_dump(
        {"train_csv": str(tiny_data["train_csv"]), "val_csv": str(tiny_data["val_csv"]), "epochs": 1}))
    trial.joinpath("best_metrics.json").write_text('{' + threshold + '"epoch": 1, "val_f1": 0.5}')
    (tmp_path / "s" / "search_summary.json").write_text('{"best_trial": {"name": "t001"}, "state": "finished"}')
    with pytest.raises(SystemExit) as exc:
        retrain_main([str(tmp_path / "s"), "--epochs", "1", "--train_on_val",
                      "--test_csv", str(tiny_data["val_csv"])])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert "t001/best_metrics.json: no validation threshold" in err
    assert not (tmp_path / "s" / "final").exists()


def test_retrain_waits_for_no_search_and_picks_a_free_name(tmp_path, capsys):
    """A retrain takes the search folder's lock (a running search or retrain refuses it, in
    one line); the search's own retrain never lands on a folder retrained by hand."""
    from headernet_core.locks import FolderLock
    from tuning.retrain import main as retrain_main
    from tuning.search import free_name

    search_dir = tmp_path / "s"
    (search_dir / "t001").mkdir(parents=True)
    (search_dir / "t001" / "config.yaml").write_text("epochs: 1\n")
    (search_dir / "search_summary.json").write_text('{"best_trial": {"name": "t001"}}')
    with FolderLock(search_dir, "a search"):
        with pytest.raises(SystemExit) as exc:
            retrain_main([str(search_dir), "--epochs", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "is in use by a search" in err, err
    assert free_name(search_dir, "final") == "final"
    (search_dir / "final").mkdir()
    (search_dir / "final_2").mkdir()
    assert free_name(search_dir, "final") == "final_3"


def test_the_resume_command_works_from_any_folder(tmp_path, monkeypatch):
    """Started by name, with the default storage and a relative test CSV: the printed command
    names the space file, the storage and the CSV absolutely (from another folder, `demo` could
    find another file and the default storage would be another folder)."""
    import dataclasses
    import shlex

    from tuning.search import parse_args, plan_search, resume_command
    from tuning.space import find_space_file

    monkeypatch.chdir(tmp_path)
    plan = plan_search(parse_args(["--space", "demo", "--retrain_best", "1", "--test_csv", "splits/test.csv"]))
    command = shlex.split(resume_command(plan))
    flags = dict(zip(command[3::2], command[4::2]))
    assert command[:3] == ["python", "-m", "tuning.search"] and command[-1] == "--resume"
    assert flags["--space"] == plan.start.space_file == str(find_space_file("demo").absolute())
    search_dir = tmp_path / "report" / "header_experiments" / "demo"
    assert flags["--name"] == "demo" and flags["--storage_path"] == str(search_dir.parent)
    assert flags["--test_csv"] == str(tmp_path / "splits" / "test.csv") and flags["--retrain_best"] == "1"
    # a resumed search interrupted again: the recorded file, against the folder it started from
    start = dataclasses.replace(plan.start, space_file="spaces/mine.yaml", cwd=str(tmp_path / "start"))
    again = shlex.split(resume_command(dataclasses.replace(plan, start=start, retrain_best=None, test_csv=None)))
    assert again[again.index("--space") + 1] == str(tmp_path / "start" / "spaces" / "mine.yaml")
    assert "--retrain_best" not in again and not search_dir.exists()   # planning writes nothing


def test_a_second_ctrl_c_still_says_how_to_resume(tiny_data, tmp_path, monkeypatch, capsys):
    """A second Ctrl-C while the search stops raises KeyboardInterrupt out of Tune: no summary,
    but exit 130, one line and the command that continues the search (no bare "interrupted")."""
    import shlex
    from types import SimpleNamespace

    import tuning.search as search

    def interrupted_again():
        raise KeyboardInterrupt
    monkeypatch.setattr(search, "start_ray", lambda address, quiet: None)
    monkeypatch.setattr(search, "build_tuner", lambda *args, **kwargs: SimpleNamespace(fit=interrupted_again))
    monkeypatch.setattr(resume_guard, "sign_tuner", lambda search_dir: None)
    space = write_space(tmp_path, tiny_data, {"lr_head": {"loguniform": [1e-4, 1e-3]}})
    with pytest.raises(SystemExit) as stopped:
        main(["--space", str(space), "--name", "twice"])
    assert stopped.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stopped at once, without a summary: continue with "), err
    resume = shlex.split(err[0].split("continue with ", 1)[1])
    assert resume[-1] == "--resume" and resume[resume.index("--name") + 1] == "twice"
    assert resume[resume.index("--space") + 1] == str(space)
    assert (tmp_path / "out" / "twice" / "search.json").is_file()   # what --resume starts from


def recorded_search(folder: Path, space: Path) -> Path:
    """A search folder as a search leaves it when it starts (its search.json)."""
    folder.mkdir()
    (folder / "search.json").write_text(json.dumps(
        {"space_file": str(space), "space_yaml": space.read_text(), "sets": [], "cwd": str(space.parent)}))
    return folder


@pytest.mark.parametrize("theirs, fragment", [
    ({"lr_head": {"uniform": [1e-4, 1e-3]}}, "search.lr_head differs in its kind (uniform there, loguniform here)"),
    ({"lr_head": {"loguniform": [1e-4, 1e-3]}, "backbone": {"choice": ["vmae"]}},
     "that search searched backbone, lr_head, this one lr_head"),
])
def test_a_warm_start_from_another_space_is_one_line(tiny_data, tmp_path, capsys, theirs, fragment):
    (tmp_path / "o").mkdir()
    other = recorded_search(tmp_path / "other", write_space(tmp_path / "o", tiny_data, theirs))
    space = write_space(tmp_path, tiny_data, {"lr_head": {"loguniform": [1e-5, 1e-2]}})
    line = error_of(["--space", str(space), "--warm_start", str(other)], capsys)
    assert line.startswith(f"error: --warm_start {other}: ") and fragment in line, line
    assert "not a search folder" in error_of(["--space", str(space), "--warm_start", str(tmp_path)], capsys)


def test_a_warm_start_names_the_trainer_settings_that_differ(tiny_data, tmp_path):
    from tuning.search import check_warm_start, load_space

    (tmp_path / "o").mkdir()
    other = recorded_search(tmp_path / "other", write_space(
        tmp_path / "o", tiny_data, {"lr_head": {"loguniform": [1e-4, 1e-3]}}))
    space = load_space(str(write_space(tmp_path, tiny_data, {"lr_head": {"loguniform": [1e-5, 1e-2]}})),
                       sets=["epochs=5"])
    [line] = check_warm_start(str(other), space)
    assert "epochs 2 there, 5 here" in line and "output_root" in line, line


def test_a_warm_started_searchs_first_proposal_is_tpe_given_the_imported_trials(tiny_data, tmp_path):
    """The other search's finished and pruned trials are in the new study before its first
    proposal: that proposal is what the same seeded TPE proposes given those trials."""
    import optuna

    from tuning.search import make_searcher, parse_args, plan_search, tpe_sampler
    from tuning.study import StudySearch, load_search_study, study_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = {"lr_head": {"loguniform": [1e-4, 1e-2]}, "backbone": {"choice": ["vmae", "csn"]}}
    (tmp_path / "o").mkdir()
    other = recorded_search(tmp_path / "other", write_space(tmp_path / "o", tiny_data, search))
    def earlier_space(trial) -> None:
        trial.suggest_float("lr_head", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("backbone", ["vmae", "csn"])

    earlier = StudySearch(space=earlier_space, metric="objective", mode="max", storage=study_storage(other), study_name="o",
                          sampler=optuna.samplers.RandomSampler(seed=1))
    for i in range(6):
        earlier.suggest(f"t{i}")
        earlier.on_trial_complete(f"t{i}", {"objective": 0.1 * i, "epoch": 1 if i % 3 else 2,
                                            "trial_epochs": 2})    # two finished, four stopped
    earlier.suggest("running")                                     # not imported
    search["lr_head"] = {"loguniform": [1e-5, 1e-2]}               # widened: still a warm start
    space = write_space(tmp_path, tiny_data, search)
    plan = plan_search(parse_args(["--space", str(space), "--warm_start", str(other),
                                   "--set", "budget.startup_trials=4"]))
    assert plan.start.warm_start == str(other) and plan.space.startup_trials <= 6
    plan.search_dir.mkdir(parents=True)
    proposal = make_searcher(plan.space, plan.search_dir, plan.start.warm_start).suggest("first")

    imported = load_search_study(plan.search_dir).trials[:-1]   # the last: the proposal
    assert [t.state.name for t in imported] == ["COMPLETE", "PRUNED", "PRUNED"] * 2
    reference = optuna.create_study(direction="maximize",
                                    sampler=tpe_sampler(plan.space.seed, plan.space.startup_trials))
    reference.add_trials(imported)
    trial = reference.ask()
    plan.space.define_by_run(trial)
    assert proposal == trial.params
    cold = optuna.create_study(sampler=tpe_sampler(plan.space.seed, plan.space.startup_trials)).ask()
    plan.space.define_by_run(cold)
    assert proposal != cold.params        # the imported trials, not the start-up draws, decided


def test_the_checks_before_ray_starts_import_no_torch(tiny_data, tmp_path):
    """The driver's checks (space, shapes of every choice, data, checkpoints, machine) use the
    torch-free backbone configs: torch, timm and scikit-learn cost a search ~4 s at its start
    and ~1.5 s at its exit (docs/performance.md)."""
    import subprocess
    import sys

    space = write_space(tmp_path, tiny_data, {"backbone": {"choice": ["vmae", "csn"]},
                                              "num_frames": {"choice": [2, 4]}})
    probe = ("import sys, tuning.search as s\n"
             "s.search_owned = lambda plan, checked: print('checked; imported:', *sorted(\n"
             "    m for m in ('torch', 'timm', 'sklearn') if m in sys.modules)) or 0\n"
             "s.main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", probe, "--space", str(space), "--storage_path", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "checked; imported:", done.stdout
