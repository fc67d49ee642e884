"""Ray for a search: a local Ray only this machine can reach, or an existing cluster
(`--address`) checked in seconds, before anything is written.

Three Ray behaviours (2.60) this module works around, each checked by tests/test_cluster.py:
- Ray reads its settings (log deduplication, ...) from the environment when it is imported, so
  `prepare_environment` runs before this command's first `import ray`.
- A local `ray.init()` listens on every interface (GCS, raylet, each worker) unless its node
  address is exactly 127.0.0.1, and it turns a given 127.0.0.1 into the machine's address
  except in its single-machine mode (the macOS/Windows default), used here for the local Ray
  (`ray_compat.init_loopback_ray`: Ray's private names are all in tuning/ray_compat.py).
- Token authentication (on by default since 2.59) writes `~/.ray/auth_token` with the umask's
  mode, usually readable by every user of the machine; a client with no or a wrong token is
  retried for ~20 s and then gets tracebacks that never say "token".
And three that put noise in a search's console: the local start's token notice, the raylet's
disk error every 10 s on a 95%-full disk, Tune's "performance bottleneck" lines (see below).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from headernet_core.errors import fail

from . import ray_compat

# Forced, whatever the user's environment says: nothing phones home.
FORCED_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
# Defaults the user may override.
DEFAULT_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # our loggers: CSV/JSON + each run's tb/
    "TUNE_GLOBAL_CHECKPOINT_S": "2",            # fresher search state after a hard kill
    "RAY_DEDUP_LOGS": "0",                      # every trial's lines, not "[repeated 3x]"
    # Tune's "The `on_step_end` operation took 0.6 s, which may be a performance bottleneck"
    # (0.5 s by default) comes on a busy machine, about Tune's internals; 5 s still names a
    # callback that really stalls the search.
    "TUNE_WARN_THRESHOLD_S": "5",
}
# Defaults for the local Ray only (the user may override them).
LOCAL_DEFAULT_ENV = {
    # Ray's raylet disk monitor (object spilling) logs an error every 10 s once the disk of its
    # temp folder is 95% full; tuning/diskspace.py warns once about the search's own storage.
    "RAY_local_fs_capacity_threshold": "1",
    # The raylet starts one idle worker per CPU for the first driver; Tune's trial actors never
    # use them (they carry their own runtime env), so on a small machine they only take CPU
    # from the trials' start (~0.7 core-s on 2 cores, measured in docs/performance.md).
    "RAY_prestart_worker_first_driver": "0",
}
# Ray's notice, on every local start, that token auth is on (its default), is a line of noise in
# each search's console: filtered out. (Setting RAY_AUTH_MODE=token would skip it too, but breaks
# a process that imported ray before: its C++ side has already read the mode.)
PROBE_TIMEOUT_S = 5.0
TOKEN_HELP = "see docker/README.md, 'The cluster token'"


def prepare_environment(local: bool) -> None:
    """Ray's settings for this process and every Ray process it starts (`local`: the local Ray,
    not a cluster's); call before `import ray`."""
    os.environ.update(FORCED_ENV)
    for key, value in {**DEFAULT_ENV, **(LOCAL_DEFAULT_ENV if local else {})}.items():
        os.environ.setdefault(key, value)


def token_file() -> Path | None:
    """The file Ray reads the cluster token from (None when RAY_AUTH_TOKEN holds it)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def keep_token_private(create: bool) -> None:
    """The token is the key to the cluster (anyone holding it runs code on every node). Ray
    writes it with the umask's mode; create it 0600 here instead (for the local Ray, where Ray
    would create it), and make an existing one that others can read 0600."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or (path := token_file()) is None:
        return
    if create and not path.exists() and "RAY_AUTH_TOKEN_PATH" not in os.environ:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it meanwhile: tightened below
        else:
            with os.fdopen(fd, "w") as out:
                out.write(ray_compat.generate_token())
            return
    try:
        info = path.stat()
    except OSError:
        return
    if info.st_mode & 0o077 and info.st_uid == os.getuid():
        path.chmod(0o600)
        print(f"note: {path} (the Ray cluster token) was readable by other users; it is now 0600")


def check_address(address: str) -> None:
    """One `error:` line within seconds unless the Ray head at `address` answers and accepts
    this process's token: `ray.init` would retry for minutes (nothing listening) or ~20 s
    (token refused) and end in tracebacks."""
    import grpc

    if address.startswith("ray://"):
        return  # Ray Client: it has its own connection timeout
    try:
        gcs = ray_compat.head_gcs_address(address)
    except Exception as error:  # noqa: BLE001 - Ray raises several kinds for a bad address
        fail(f"--address {address}: not a Ray head address HOST:PORT ({' '.join(str(error).split())})")
    if gcs is None:
        fail(f"--address {address}: no running Ray cluster found on this machine; give HOST:PORT of the head")
    token_mode = ray_compat.token_auth_enabled()
    if token_mode and not ray_compat.has_token():
        fail(f"--address {address}: RAY_AUTH_MODE=token but no cluster token in {token_file()} "
             f"(RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) or RAY_AUTH_TOKEN; copy the head's "
             f"token file to this machine ({TOKEN_HELP})")
    try:
        ray_compat.probe_head(gcs, PROBE_TIMEOUT_S)
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.UNAUTHENTICATED and not token_mode:
            fail(f"--address {address}: the cluster requires token authentication and this process "
                 f"sends no token: export RAY_AUTH_MODE=token, with the cluster's token in "
                 f"~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN ({TOKEN_HELP})")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            source = token_file() or "RAY_AUTH_TOKEN"
            fail(f"--address {address}: the cluster refused this process's token (from {source}, "
                 f"RAY_AUTH_MODE=token): it is not the head's token ({TOKEN_HELP})")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            fail(f"--address {address}: no Ray head answers at {gcs} within {PROBE_TIMEOUT_S:g} s "
                 f"(is `ray start --head --port {gcs.rsplit(':', 1)[-1]}` running there, and the port open?)")
        fail(f"--address {address}: {gcs} answers, but not as a Ray head of this version "
             f"({code.name}: {' '.join(str(error.details()).split())[:200]})")


def _not_token_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(ray_compat.TOKEN_NOTICE)


def start_local_ray(runtime_env: dict | None = None) -> None:
    """A Ray for this command alone, every port on 127.0.0.1 (nothing else can reach it);
    `runtime_env`: the job's (every worker it starts)."""
    prepare_environment(local=True)
    keep_token_private(create=True)
    notice = logging.getLogger(ray_compat.TOKEN_LOGGER)
    notice.addFilter(_not_token_notice)
    try:
        ray_compat.init_loopback_ray(include_dashboard=False, dashboard_host=ray_compat.LOOPBACK,
                                     log_to_driver=True, configure_logging=True,
                                     runtime_env=runtime_env, logging_level="WARNING")
    finally:
        notice.removeFilter(_not_token_notice)


def stop_ray() -> None:
    """`ray.shutdown()`, ~1 s sooner for a local Ray. Ray stops the raylet and the GCS first,
    then sends the autoscaler monitor SIGTERM, whose handler reports its own end to the GCS that
    is already gone; Ray kills it after a 1 s grace (1.4 s against 0.1-0.4 s to shut down,
    measured in docs/performance.md). A local Ray's monitor has nothing to clean up (no cloud
    nodes), so it is killed first (`ray_compat.kill_local_monitor`). Joined to a cluster,
    this process holds no monitor and only disconnects."""
    import ray

    ray_compat.kill_local_monitor()
    ray.shutdown()


def join_cluster(address: str, runtime_env: dict | None = None) -> None:
    """Connect to the cluster `check_address` has already reached (`runtime_env`: the job's)."""
    prepare_environment(local=False)
    keep_token_private(create=False)
    import ray

    try:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as error:
        fail(f"--address {address}: could not join the Ray cluster: {' '.join(str(error).split())[:300]}")
