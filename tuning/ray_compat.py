"""Every private Ray, Tune and Optuna name the project relies on, and nothing else.

A private name (an underscore module or attribute, an internal file layout, a log line's text)
can change in any release. pyproject.toml pins the versions these were written against
(ray 2.60.x, optuna 5.0-5.1); tests/test_ray_compat.py checks each one against the installed
version and names this module when one has moved, and fails if any other library file uses a
private name. To move to a new Ray or Optuna: bump the pin, run that test, fix what it names here.

Ray and Optuna are imported inside the functions: `tuning.cluster` sets Ray's environment
before the first `import ray`, and the driver's checks before a search start without Ray.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

# --- Tune's files in a search folder ------------------------------------------------------------
# Tune's own names (`tune.impl.tuner_internal._TUNER_PKL` and the classes' `CKPT_FILE_TMPL`),
# not an API: `resume_guard` signs exactly these files and `search` tells a started search by
# its tuner.pkl.
TUNER_PKL = "tuner.pkl"
EXPERIMENT_STATE = "experiment_state-*.json"
# Every file of the search folder's top level that Tune may read back (and unpickle) on restore.
TUNE_STATE_FILES = (TUNER_PKL, EXPERIMENT_STATE, "searcher-state-*.pkl", "search_gen_state-*.json",
                    "callback-states-*.pkl", "basic-variant-state-*.json")


# Tune's log of every result a trial reported, one JSON object per line, in the trial's folder
# (`ray.air.constants.EXPR_RESULT_FILE`, written by the search's `JsonLoggerCallback`).
TUNE_RESULT_FILE = "result.json"


def logged_results(trial_dir: Path) -> list[dict[str, Any]]:
    """The results Tune logged for the trial of `trial_dir` (TUNE_RESULT_FILE), oldest first; a
    line cut short by a kill (or otherwise not a JSON object) is left out. The driver copies the
    log into the search folder at each experiment checkpoint: after a hard kill its last
    results may be missing."""
    results = []
    with contextlib.suppress(FileNotFoundError), open(trial_dir / TUNE_RESULT_FILE, errors="replace") as lines:
        for line in lines:
            with contextlib.suppress(ValueError, RecursionError):
                results.append(json.loads(line))
    return [result for result in results if isinstance(result, dict)]


def forget_pickled_error(trial: Any) -> None:
    """Clears the trial's record of its error.pkl (in Trial's private `_TrainingRunMetadata`):
    Tune would unpickle that file from the search folder when it builds the results; error.txt
    says the same in plain text."""
    if trial.run_metadata.pickled_error_filename is not None:
        trial.run_metadata.pickled_error_filename = None


# --- Tune's console -------------------------------------------------------------------------
# Tune's switch back to its legacy output engine, the only one that honours a
# `progress_reporter` (read in `ray.tune.experimental.output.get_air_verbosity`).
LEGACY_CONSOLE_ENV = "RAY_AIR_NEW_OUTPUT"
# The logger and the text of Tune's lines when a search is stopped (`ray/tune/tune.py`), which
# `console.own_stop_lines` replaces with the command's own.
TUNE_LOGGER = "ray.tune.tune"
TUNE_STOP_NOTICE = "Stop signal received"
TUNE_RESUME_HINTS = ("Experiment has been interrupted", "Training has been interrupted")


def use_legacy_console(legacy: bool) -> None:
    """Legacy Tune output (`legacy`: our `progress_reporter` is honoured) or Ray's default."""
    os.environ[LEGACY_CONSOLE_ENV] = "0" if legacy else "1"


# --- Ray's cluster token and head probe -----------------------------------------------------
# The logger and the text of Ray's notice, on every local start, that token auth is on.
TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_NOTICE = "Token authentication is enabled"


def generate_token() -> str:
    """A new cluster token as `ray get-auth-token --generate` makes it (Ray has no public call):
    the project writes the token file itself, mode 0600."""
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token,
    )
    return generate_new_authentication_token()


def token_auth_enabled() -> bool:
    """Whether this process will send a token (RAY_AUTH_MODE), as Ray decides it."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return is_token_auth_enabled()


def has_token() -> bool:
    """Whether Ray finds a token for this process where it looks (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), whatever the mode: checked before connecting, so
    that a missing token is one line instead of Ray's retries."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    try:
        return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    except AuthenticationError:  # RAY_AUTH_TOKEN_PATH names a missing or empty file
        return False


def head_gcs_address(address: str) -> str | None:
    """`--address` as the GCS host:port `ray.init` would use ("auto" and friends resolved; None:
    no local cluster found). Raises on an address Ray cannot parse."""
    from ray._private import services

    return services.canonicalize_bootstrap_address(address)


def probe_head(gcs: str, timeout_s: float) -> None:
    """One authenticated request to the GCS at `gcs` with this process's token (Ray's own gRPC
    channel): returns if it answers, raises `grpc.RpcError` otherwise, within `timeout_s`.
    `ray.init` instead retries for minutes and ends in tracebacks."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    channel = init_grpc_channel(gcs)
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    finally:
        channel.close()


# --- the local Ray ------------------------------------------------------------------------------
LOOPBACK = "127.0.0.1"


def init_loopback_ray(**init_kwargs: Any) -> None:
    """`ray.init(address="local", **init_kwargs)` with every port on 127.0.0.1. A local Ray
    listens on every interface unless its node address is exactly 127.0.0.1 (the private
    `_node_ip_address`), and turns a given 127.0.0.1 into the machine's address except in its
    single-machine mode (`ray_constants.ENABLE_RAY_CLUSTER` off), set for the call only."""
    import ray
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address=LOOPBACK, **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node


def kill_local_monitor() -> None:
    """Kills the autoscaler monitor of the Ray this process started, at once (`Node.kill_monitor`
    of Ray's global node); nothing when it joined a cluster or started none. `ray.shutdown()`
    stops the GCS first, then SIGTERMs the monitor, whose handler reports to the GCS already
    gone, and waits its 1 s grace: a local Ray's monitor has nothing to clean up."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and getattr(node, "head", False):
        with contextlib.suppress(Exception):  # Ray's shutdown still ends it
            node.kill_monitor(check_alive=False)


# --- Optuna ---------------------------------------------------------------------------------
def journal_lock_file(journal: str | Path) -> Path:
    """The lock file Optuna's journal file backend makes beside `journal` while it writes."""
    from optuna.storages.journal._file import LOCK_FILE_SUFFIX

    return Path(str(journal) + LOCK_FILE_SUFFIX)


def searcher_study(searcher: Any) -> Any:
    """The `optuna.Study` behind a Tune `OptunaSearch` (its `_ot_study`): `StudySearch` reads the
    study a restored snapshot may lag behind."""
    return searcher._ot_study


def searcher_trials(searcher: Any) -> dict[str, Any]:
    """Tune trial id -> `optuna.Trial` of a Tune `OptunaSearch` (its `_ot_trials`)."""
    return searcher._ot_trials


def searcher_completed(searcher: Any) -> set[str]:
    """The Tune trial ids a Tune `OptunaSearch` holds as complete (its `_completed_trials`)."""
    return searcher._completed_trials


def study_trial(study: Any, frozen: Any) -> Any:
    """The live `optuna.Trial` of `study` behind a `FrozenTrial` read from it (built from the
    frozen trial's storage id, its `_trial_id`): what a Tune `OptunaSearch` holds per Tune trial."""
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)


def mark_searcher_trial_complete(searcher: Any, trial_id: str) -> None:
    """Records `trial_id` as complete in a Tune `OptunaSearch` (its `_completed_trials`) without
    telling the study: for a trial the study already holds as finished."""
    searcher._completed_trials.add(trial_id)


# --- ASHA -----------------------------------------------------------------------------------
def asha_time_attr(scheduler: Any) -> str:
    """The result key an `ASHAScheduler` counts time in (its `_time_attr`); read from the
    scheduler, not stored again, so that one pickled in an older search's tuner.pkl works."""
    return scheduler._time_attr


def asha_max_t(scheduler: Any) -> float:
    """The `max_t` of an `ASHAScheduler` (its `_max_t`): a stop before it is an early stop."""
    return scheduler._max_t
