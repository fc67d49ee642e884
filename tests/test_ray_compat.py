"""tuning/ray_compat.py against the installed Ray, Tune and Optuna: each private name it holds
still exists and means what the project uses it for, else a message that names what moved and
what to update; and no other library file uses a private name (the scan at the end).

These run without starting Ray. The same names are exercised for real by the slow tests:
tests/test_cluster.py (the loopback init, the monitor kill, the token probe on a real head),
tests/test_search.py (Tune's state files signed and restored, StudySearch on a resume).
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import ray

from tuning import cluster, ray_compat

REPO = Path(__file__).resolve().parents[1]


def moved(what: str) -> str:
    """The failure message: what changed, in which versions, and what to update."""
    return (f"Ray {ray.__version__} / Optuna {optuna.__version__}: {what}; update "
            f"tuning/ray_compat.py and the ray/optuna pins in pyproject.toml")


def ray_sources(*parts: str) -> str:
    """The text of Ray's Python sources under ray/<part>/ (to check what Ray reads)."""
    root = Path(ray.__file__).parent
    return "\n".join(path.read_text(errors="replace") for part in parts
                     for path in sorted((root / part).rglob("*.py")))


# --- Tune's state files and trial records -----------------------------------------------------
def test_tunes_state_file_names():
    from ray.tune.callback import CallbackList
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.impl import tuner_internal
    from ray.tune.search import BasicVariantGenerator, Searcher, SearchGenerator

    tunes = (tuner_internal._TUNER_PKL, *(cls.CKPT_FILE_TMPL.format("*") for cls in (
        TuneController, Searcher, SearchGenerator, CallbackList, BasicVariantGenerator)))
    assert ray_compat.TUNE_STATE_FILES == tunes, moved(f"Tune's state files are now {tunes}")
    assert ray_compat.TUNE_STATE_FILES[:2] == (ray_compat.TUNER_PKL, ray_compat.EXPERIMENT_STATE)


def test_tunes_result_log(tmp_path):
    from ray.air.constants import EXPR_RESULT_FILE
    from ray.tune.logger import JsonLoggerCallback

    assert ray_compat.TUNE_RESULT_FILE == EXPR_RESULT_FILE, moved(f"Tune's result log is now {EXPR_RESULT_FILE}")
    assert "EXPR_RESULT_FILE" in inspect.getsource(JsonLoggerCallback), moved("JsonLoggerCallback writes another file")
    (tmp_path / EXPR_RESULT_FILE).write_bytes(b'{"epoch": 1, "objective": NaN}\n\xff[1]\n7\n' + b"[" * 100_000
                                              + b'\n{"epoch": 2, "objective": 0.5}\n{"epo')
    first, second = ray_compat.logged_results(tmp_path)   # no damaged line, no cut-short one
    assert first["epoch"] == 1 and math.isnan(first["objective"]) and second == {"epoch": 2, "objective": 0.5}
    assert ray_compat.logged_results(tmp_path / "none") == []


def test_a_restored_trial_is_added_back_with_its_folder_and_a_new_one_without():
    """What `tuning.scheduler.RecordingASHA.on_trial_add` tells them apart by: a new Trial has no
    `relative_logdir` yet; a restored one is added back (`add_trial` -> `on_trial_add`) with it."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    assert Trial("trainable", stub=True).relative_logdir is None, moved("a new Trial has its folder name")
    requeue = inspect.getsource(TuneController._requeue_restored_trials)
    assert "self.add_trial(" in requeue, moved("restored trials are no longer added through add_trial")
    assert "on_trial_add" in inspect.getsource(TuneController.add_trial), moved("add_trial skips the scheduler")


def test_a_trials_pickled_error_record():
    from ray.tune.experiment import Trial
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    trial = Trial("trainable", stub=True)
    assert isinstance(trial.run_metadata, _TrainingRunMetadata), moved("Trial.run_metadata changed")
    assert "run_metadata.pickled_error_filename" in inspect.getsource(Trial), \
        moved("Trial no longer reads run_metadata.pickled_error_filename (forget_pickled_error)")
    trial.run_metadata.pickled_error_filename = "error.pkl"
    ray_compat.forget_pickled_error(trial)
    assert trial.run_metadata.pickled_error_filename is None
    for name in ("local_experiment_path", "remote_experiment_path", "path"):  # tuning/snapshot.py
        assert isinstance(getattr(Trial, name, None), property), moved(f"Trial.{name} is gone")


# --- Tune's console -------------------------------------------------------------------------
def test_the_legacy_console_switch(monkeypatch):
    from ray.tune.experimental.output import get_air_verbosity

    ray_compat.use_legacy_console(True)
    assert get_air_verbosity(1) is None, moved(f"{ray_compat.LEGACY_CONSOLE_ENV}=0 no longer "
                                               "selects Tune's legacy output (progress_reporter)")
    ray_compat.use_legacy_console(False)
    assert get_air_verbosity(1) is not None, moved(f"{ray_compat.LEGACY_CONSOLE_ENV}=1 is not the new output")
    monkeypatch.delenv(ray_compat.LEGACY_CONSOLE_ENV)


def test_tunes_stop_lines_and_their_logger():
    import ray.tune.tune as tune_module

    assert tune_module.logger.name == ray_compat.TUNE_LOGGER, moved(f"Tune's run logger is {tune_module.logger.name}")
    source = inspect.getsource(tune_module)
    for text in (ray_compat.TUNE_STOP_NOTICE, *ray_compat.TUNE_RESUME_HINTS):
        assert f'"{text}' in source, moved(f"ray/tune/tune.py no longer logs {text!r}")


def test_every_environment_setting_is_still_read_by_ray():
    """A renamed setting would be ignored without a word: each name the search sets is still in
    Ray's Python sources, or (RAY_<config>) in the raylet that reads it."""
    python = ray_sources("tune", "air", "train", "_private", "_common")
    names = [*cluster.FORCED_ENV, *cluster.DEFAULT_ENV, ray_compat.LEGACY_CONSOLE_ENV,
             "TUNE_PRINT_ALL_TRIAL_ERRORS"]
    for name in names:
        assert f'"{name}"' in python, moved(f"Ray no longer reads {name}")
    raylet = (Path(ray.__file__).parent / "core" / "src" / "ray" / "raylet" / "raylet").read_bytes()
    for name in cluster.LOCAL_DEFAULT_ENV:
        assert name.removeprefix("RAY_").encode() in raylet, moved(f"the raylet no longer reads {name}")


# --- the cluster token and the head probe -----------------------------------------------------
def test_token_helpers(monkeypatch, tmp_path):
    import importlib

    token = ray_compat.generate_token()
    assert re.fullmatch(r"[0-9a-f]{64}", token), moved(f"a generated token looks like {token!r}")
    assert isinstance(ray_compat.token_auth_enabled(), bool)
    # In a fresh process: Ray's token loader keeps what it first found (an earlier test's search)
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    env.update(RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing"), PYTHONPATH=str(REPO))
    code = "from tuning import ray_compat; print(ray_compat.has_token())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.stdout.strip() == "False", moved(f"has_token() with no token file: {out.stderr[-500:]}")
    module = importlib.import_module(ray_compat.TOKEN_LOGGER)
    assert module.logger.name == ray_compat.TOKEN_LOGGER, moved("the token notice's logger moved")
    assert f'"{ray_compat.TOKEN_NOTICE}' in inspect.getsource(module), moved("the token notice's text changed")


def test_head_address_and_probe():
    import grpc

    assert ray_compat.head_gcs_address("10.0.0.1:6379") == "10.0.0.1:6379", moved("canonicalize_bootstrap_address")
    with pytest.raises(Exception):  # noqa: B017 - Ray raises several kinds for a bad address
        ray_compat.head_gcs_address("not an address:port:x")
    import socket
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(grpc.RpcError) as error:
        ray_compat.probe_head(f"127.0.0.1:{port}", 2.0)
    assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), \
        moved(f"the GCS probe of a closed port ended in {error.value.code()}")


def test_the_local_ray_helpers():
    from ray._private import ray_constants, worker
    from ray._private.node import Node

    assert isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), bool), \
        moved("ray_constants.ENABLE_RAY_CLUSTER (single-machine mode) is gone")
    assert 'kwargs.pop("_node_ip_address"' in inspect.getsource(ray.init), \
        moved("ray.init takes no _node_ip_address")
    assert hasattr(worker, "_global_node"), moved("ray._private.worker._global_node is gone")
    assert "check_alive" in inspect.signature(Node.kill_monitor).parameters, \
        moved("Node.kill_monitor(check_alive=...) changed")
    ray_compat.kill_local_monitor()  # no Ray started: nothing to do


# --- Optuna and the searcher ----------------------------------------------------------------
def test_the_journal_lock_file(tmp_path):
    from optuna.storages.journal import JournalFileSymlinkLock

    journal = tmp_path / "study.log"
    lock = JournalFileSymlinkLock(str(journal))
    assert lock.acquire()
    try:
        assert ray_compat.journal_lock_file(journal).is_symlink(), \
            moved(f"Optuna's journal lock is no longer {ray_compat.journal_lock_file(journal).name}")
    finally:
        lock.release()


def test_optuna_searchs_study_and_trials():
    from ray.tune.search.optuna import OptunaSearch

    def space(trial: optuna.Trial) -> None:
        trial.suggest_float("x", 0, 1)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = OptunaSearch(space=space, metric="m", mode="max")
    searcher.suggest("a")
    study, trials = ray_compat.searcher_study(searcher), ray_compat.searcher_trials(searcher)
    assert isinstance(study, optuna.Study), moved("OptunaSearch._ot_study is not the study")
    assert list(trials) == ["a"] and isinstance(trials["a"], optuna.Trial), \
        moved("OptunaSearch._ot_trials is not Tune id -> optuna.Trial")
    assert ray_compat.searcher_completed(searcher) == set(), moved("OptunaSearch._completed_trials")
    ray_compat.mark_searcher_trial_complete(searcher, "a")
    assert ray_compat.searcher_completed(searcher) == {"a"}, moved("OptunaSearch._completed_trials")
    again = ray_compat.study_trial(study, study.trials[0])
    assert isinstance(again, optuna.Trial) and again.params == trials["a"].params, \
        moved("FrozenTrial._trial_id is not the storage id optuna.Trial takes")
    searcher.on_trial_complete("a", {"m": 1.0})  # Tune's searcher now skips it: nothing told
    assert study.trials[0].state == optuna.trial.TrialState.RUNNING, \
        moved("OptunaSearch ignores _completed_trials")


def test_ashas_time_attr_and_max_t(tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from tuning.scheduler import RecordingASHA

    asha = RecordingASHA(tmp_path, time_attr="epoch", max_t=4, grace_period=1)
    assert (ray_compat.asha_time_attr(asha), ray_compat.asha_max_t(asha)) == ("epoch", 4), \
        moved("ASHAScheduler's _time_attr/_max_t")
    default = ASHAScheduler()
    assert (ray_compat.asha_time_attr(default), ray_compat.asha_max_t(default)) == ("training_iteration", 100)


def test_ray_compat_imports_neither_ray_nor_optuna():
    """tuning.cluster sets Ray's environment before the first `import ray`; the driver's checks
    before a search stay light."""
    code = ("import sys, tuning.ray_compat, tuning.cluster, tuning.resume_guard; "
            "print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- nowhere else ---------------------------------------------------------------------------
# A dotted name of ray, optuna or torch with a private part (`ray._private...`, `ray._raylet`,
# `optuna.storages.journal._file`, `torch._dynamo`), in code, imports or strings ("ray._private.x").
PRIVATE_MODULE = r"\b(?:ray|optuna|torch)(?:\.\w+)*\._(?!_)\w"
# A private keyword argument in a call (`ray.init(_node_ip_address=...)`).
PRIVATE_KEYWORD = r"(?:^|[(,])\s*_[a-z]\w*=(?!=)"
# Quoted Tune file names, log texts and switches that ray_compat holds.
TUNE_STRINGS = (r"""["'](?:tuner\.pkl|experiment_state-|searcher-state-|search_gen_state-|callback-states-"""
                r"""|basic-variant-state-|ray\.tune\.tune["']|Stop signal received|Experiment has been """
                r"""interrupted|Training has been interrupted|Token authentication is enabled)"""
                r"""|\bRAY_AIR_NEW_OUTPUT\b|\bpickled_error_filename\b|\bexperiment_driver_staging_path\b""")


@functools.cache
def foreign_private_attributes() -> frozenset[str]:
    """`self._x` names of the Ray/Optuna classes the library subclasses (their MRO outside this
    project): an access `._x` to one of them in library code reads their private state, e.g.
    `OptunaSearch._ot_study`, `ASHAScheduler._max_t`."""
    from tuning import console, diskspace, scheduler, snapshot, study

    names: set[str] = set()
    for module in (console, diskspace, scheduler, snapshot, study):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            for base in cls.__mro__:
                if base.__module__.split(".")[0] in ("ray", "optuna"):
                    names |= set(re.findall(r"self\.(_[a-z]\w*)", inspect.getsource(base)))
    return frozenset(names)


def test_no_private_ray_optuna_or_torch_name_outside_ray_compat():
    """Every .py file of headernet_core/, tuning/ and bench/ except tuning/ray_compat.py, line by
    line (code, strings and docstrings alike), matched against:
    - PRIVATE_MODULE: `\\b(?:ray|optuna|torch)(?:\\.\\w+)*\\._(?!_)\\w`;
    - PRIVATE_KEYWORD: `(?:^|[(,])\\s*_[a-z]\\w*=(?!=)`;
    - `\\._x\\b` for every `self._x` of the Ray/Optuna classes the library subclasses
      (foreign_private_attributes: `_ot_study`, `_ot_trials`, `_completed_trials`, `_time_attr`,
      `_max_t`, ...), and `_global_node`;
    - TUNE_STRINGS: Tune's state file names and log texts quoted, the legacy console switch,
      Trial's run-metadata and staging-path internals.
    Tests are not scanned: they exercise these names against Ray itself."""
    attributes = foreign_private_attributes() | {"_global_node"}
    assert {"_ot_study", "_ot_trials", "_completed_trials", "_time_attr", "_max_t"} <= attributes
    patterns = [PRIVATE_MODULE, PRIVATE_KEYWORD, TUNE_STRINGS,
                r"\.(?:" + "|".join(sorted(attributes)) + r")\b", r"\b_global_node\b"]
    found = []
    for folder in ("headernet_core", "tuning", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "tuning" / "ray_compat.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if any(re.search(pattern, line) for pattern in patterns):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "private Ray/Optuna/torch names outside tuning/ray_compat.py (move them there):\n" + \
        "\n".join(found)


@pytest.mark.parametrize("line", [
    "from ray._private import services", "node = getattr(ray._private.worker, '_global_node', None)",
    "from optuna.storages.journal._file import LOCK_FILE_SUFFIX", "torch._dynamo.reset()",
    'TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"',
    "ray.init(address='local', _node_ip_address=LOOPBACK,", "        _node_ip_address=LOOPBACK,",
    'return (search_dir / "tuner.pkl").is_file()', 'os.environ["RAY_AIR_NEW_OUTPUT"] = "0"',
    'TUNE_LOGGER = "ray.tune.tune"', 'TUNE_STOP_NOTICE = "Stop signal received"',
    "if trial.run_metadata.pickled_error_filename is not None:"])
def test_the_scan_catches_the_uses_ray_compat_took_in(line):
    assert any(re.search(p, line) for p in (PRIVATE_MODULE, PRIVATE_KEYWORD, TUNE_STRINGS, r"\b_global_node\b"))


@pytest.mark.parametrize("line", ["self._ot_study.tell(n)", "epoch < self._max_t", "self._completed_trials.add(t)",
                                  "result.get(self._time_attr)", "known = self._ot_trials.values()"])
def test_the_scan_catches_foreign_private_attributes(line):
    attributes = foreign_private_attributes()
    assert re.search(r"\.(?:" + "|".join(sorted(attributes)) + r")\b", line)
