"""Ray as the search uses it, for real, in separate processes:

- a head and a worker started with `ray start` exactly as docker/README.md tells users (the
  token made by its command, RAY_AUTH_MODE=token, each node its own HOME and temp dir) and, on
  that one cluster, one demo search over `--address` (only the best trial's weights kept)
  during which the worker's raylet is killed: its trial is retried on the head from its last
  epoch and the search finishes with every trial; then drivers that do not hold the cluster's
  token, refused;
- an `--address` where nothing listens or that refuses this process's token: one line, exit 2,
  within seconds, nothing written;
- the local search's own Ray: every port on 127.0.0.1, the token file 0600, usage stats off
  whatever the environment says, Ray's settings in place before ray is imported.

Every Ray process here runs in a session started by the test and is stopped by session id
(`ray stop` would stop every Ray process of the user on the machine, not just these).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import conftest
import pytest
from conftest import read_json, trial_dirs, wait_for

from tuning.space import load_space

REPO = Path(__file__).resolve().parents[1]
DOCKER_README = REPO / "docker" / "README.md"
RAY = Path(sys.executable).with_name("ray")
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


# --- the documented procedure -------------------------------------------------------------
def documented(prefix: str) -> str:
    """The command line in a ```bash block of docker/README.md that starts with `prefix`
    (comments dropped): the tests run what users are told to run."""
    text = DOCKER_README.read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command.startswith(prefix):
                return command
    raise AssertionError(f"docker/README.md documents no command starting with {prefix!r}")


_given_ports: set[int] = set()


def free_port() -> int:
    """A free port not given before in this session: the OS may hand a just-released port out
    again, and two Ray components on one port fail to start (it happened in CI)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _given_ports:
            _given_ports.add(port)
            return port


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any Ray address or token of the user's, HOME moved
    into the test's folder (the user's ~/.ray is never touched), the venv's `ray` on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(REPO), **extra)
    return env


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def stop_session(*sids: int, grace_s: float = 5.0) -> None:
    """SIGTERM (what `ray stop` sends) to every process of the sessions at once, then SIGKILL to
    what is left after `grace_s` (a test's Ray has nothing to save)."""
    procs = [proc for sid in sids for proc in session_processes(sid)]
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive + [proc for sid in sids for proc in session_processes(sid)]:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs([proc for sid in sids for proc in session_processes(sid)], timeout=10)


class Node:
    """One Ray node of the test cluster: its own HOME (token copy), temp dir and session."""

    def __init__(self, root: Path, name: str):
        self.home = root / name
        self.home.mkdir(parents=True)
        # Ray's socket paths must stay under ~107 characters: a short folder in /tmp.
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"hn_{name}_", dir="/tmp"))
        self.sid: int | None = None

    def env(self) -> dict[str, str]:
        return clean_env(self.home, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")

    def start(self, command: str, extra: list[str]) -> None:
        args = [str(RAY), *shlex.split(command)[1:], *extra, "--temp-dir", str(self.temp_dir)]
        proc = subprocess.Popen(args, env=self.env(), start_new_session=True, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.sid = proc.pid  # `ray start` leads the session its daemons stay in after it exits
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0, output[-3000:]

    def raylet(self) -> psutil.Process:
        [raylet] = [p for p in session_processes(self.sid) if p.name() == "raylet"]
        return raylet

    def node_id(self) -> str:
        return next(a.split("=", 1)[1] for a in self.raylet().cmdline() if a.startswith("--node_id="))

    def remove(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    """A head and a worker on this machine, 1 CPU each, started as docker/README.md says."""
    homes = tmp_path / "homes"
    head, worker, driver = Node(homes, "head"), Node(homes, "worker"), Node(homes, "driver")
    port = free_port()
    try:
        # The token: made once by the documented command, copied (mode kept) to every node.
        made = subprocess.run(["bash", "-c", documented("(umask 077 && ray get-auth-token")],
                              env=head.env(), capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        token = head.home / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600
        for node in (worker, driver):
            (node.home / ".ray").mkdir(mode=0o700)
            shutil.copy2(token, node.home / ".ray" / "auth_token")  # scp -p
        small = ["--num-cpus", "1", "--object-store-memory", str(200 * 2**20),
                 "--dashboard-agent-listen-port", str(free_port())]
        head_command = documented("ray start --head").replace("--port 6379", f"--port {port}")
        head.start(head_command, [*small, "--dashboard-port", str(free_port()),
                                  "--ray-client-server-port", str(free_port())])
        worker_command = documented("ray start --address").replace("HEAD_IP:6379", f"127.0.0.1:{port}")
        worker.start(worker_command, small)
        yield {"address": f"127.0.0.1:{port}", "head": head, "worker": worker, "driver": driver}
    finally:
        stop_session(*(node.sid for node in (worker, head, driver) if node.sid is not None))
        for node in (worker, head, driver):
            node.remove()
    for node in (head, worker, driver):
        assert node.sid is None or not session_processes(node.sid), f"{node.home.name} left processes"
        assert not [p for p in psutil.process_iter(["cmdline"])
                    if str(node.temp_dir) in " ".join(p.info["cmdline"] or [])], "Ray processes left"


def start_search(cluster, cwd: Path, *args: str) -> subprocess.Popen:
    """The documented search command, pointed at this cluster, from the driver's HOME."""
    documented_search = documented("python -m tuning.search")
    assert "--address HEAD_IP:6379" in documented_search and "--storage_path" in documented_search
    driver = cluster["driver"]
    proc = subprocess.Popen([sys.executable, "-m", "tuning.search", "--address", cluster["address"], *args],
                            cwd=cwd, env=driver.env(), start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    driver.sid = proc.pid
    return proc


def assert_every_trial_complete(search_dir: Path, n: int) -> dict:
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert summary["state"] == "finished" and len(summary["trials"]) == n, summary["counts"]
    for trial in summary["trials"]:
        assert trial["status"] in ("finished", "stopped_early"), trial
        folder = search_dir / trial["name"]
        for name in ("config.yaml", "status.json", "metrics_epoch.csv", "best_metrics.json", "trial.json"):
            assert (folder / name).is_file(), folder / name
        epochs = list(pd.read_csv(folder / "metrics_epoch.csv")["epoch"])
        assert epochs == list(range(1, trial["epochs_run"] + 1)), (trial["name"], epochs)
    for name in ("summary.md", "trials.csv", "search.json"):
        assert (search_dir / name).is_file()
    return summary


# --- a real two-process cluster -------------------------------------------------------------
@pytest.mark.slow(seconds=125)
def test_a_cluster_started_as_documented_runs_the_demo_and_refuses_other_tokens(cluster, tmp_path):
    """The demo search over --address on a head and a worker started as docker/README.md says,
    keeping only the best trial's weights; the worker's raylet is SIGKILLed while one of its
    trials is between epochs: Tune retries that trial (the demo's max_failures 1) on the head,
    from its last epoch, and the search finishes with every trial. Then a driver without the
    cluster's token is refused in one line naming the fix. One cluster and one search serve
    all of it: a cluster's start and stop take ~20 s, the search ~50 s."""
    storage, cwd = tmp_path / "shared", tmp_path / "driver_cwd"
    cwd.mkdir()
    demo = load_space("demo")
    assert demo.max_concurrent == 2 and demo.max_failures == 1
    head_id, worker_id = cluster["head"].node_id(), cluster["worker"].node_id()
    # 4 of the demo's 8 trials: 2 at a time, one per 1-CPU node (tests/test_search.py runs all
    # 8, with ASHA). No ASHA here and 2 epochs: every trial runs both epochs, so one is surely
    # mid-run on the worker (between its epochs) and is never stopped by ASHA at the moment its
    # node dies (then it would not be retried); the single-node remainder stays short.
    proc = start_search(cluster, cwd, "--space", "demo", "--storage_path", str(storage), "--num_samples", "4",
                        "--set", "scheduler.type=none", "--set", "epochs=2", "--keep_checkpoints", "best_trial",
                        "--retrain_best", "0")   # the retrain runs on the driver: tests/test_search.py
    search_dir = storage / "demo"

    def between_epochs_on_the_worker():
        for folder in trial_dirs(search_dir):
            status = read_json(folder / "status.json")
            if (read_json(folder / "trial.json").get("node_id") == worker_id
                    and status.get("state") == "running" and status.get("epochs_done", 0) >= 1):
                return folder, pd.read_csv(folder / "metrics_epoch.csv")
        return None
    victim, rows_before = wait_for(proc, between_epochs_on_the_worker, "a trial between epochs on the worker",
                                   timeout=600)
    cluster["worker"].raylet().kill()
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, output[-4000:]
    summary = assert_every_trial_complete(search_dir, 4)
    assert summary["counts"].get("failed", 0) == 0, summary["counts"]
    # the killed trial ran on the worker (seen above), then finished on the head, continuing
    # after the epoch it had done there
    assert read_json(victim / "trial.json")["node_id"] == head_id
    rows_after = pd.read_csv(victim / "metrics_epoch.csv")
    assert list(rows_after["epoch"]) == [1, 2]
    pd.testing.assert_frame_equal(rows_after.iloc[:len(rows_before)], rows_before)
    # trials.csv says which node each trial finished on: the victim's row names the head
    trials = pd.read_csv(search_dir / "trials.csv").set_index("name")
    for folder in trial_dirs(search_dir):
        assert trials.loc[folder.name, "node"] == read_json(folder / "trial.json")["node_id"][:12], folder.name
    assert trials.loc[victim.name, "node"] == head_id[:12]
    assert set(trials["node"]) <= {head_id[:12], worker_id[:12]}
    # every artifact is in --storage_path: nothing next to the driver but the demo data
    assert sorted(p.name for p in cwd.iterdir()) == ["demo_data"]
    # --keep_checkpoints best_trial: only the best trial still holds weights, and it says so
    best = summary["best_trial"]
    holding = {d.name for d in trial_dirs(search_dir) if any((d / "checkpoints").glob("*.pt"))}
    assert holding == {best["name"]} and (search_dir / best["checkpoint"]).is_file()
    weights = sum(p.stat().st_size for d in trial_dirs(search_dir) for p in (d / "checkpoints").glob("*.pt"))
    assert weights < summary["disk_bytes"] < weights + 10 * 2**20  # counted after the pruning
    # the documented head binds its dashboard to 127.0.0.1 (it serves pages only where
    # ray[default] is installed, as in the image; whatever it listens on is loopback)
    [dashboard] = [p for p in session_processes(cluster["head"].sid) if "dashboard.py" in " ".join(p.cmdline())]
    assert "--host=127.0.0.1" in dashboard.cmdline()
    ports = [c.laddr for c in dashboard.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert all(addr.ip in LOOPBACK for addr in ports), ports

    # a driver that does not hold the cluster's token: one line naming what to do (the head
    # alone answers: the worker is gone)
    cases = {
        "no RAY_AUTH_MODE": ({}, "export RAY_AUTH_MODE=token"),
        "token mode, no token": ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_MODE=token but no cluster token"),
        "another token": ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "other")},
                          "refused this process's token"),
    }
    (tmp_path / "other").write_text("0" * 64)
    for name, (extra, expected) in cases.items():
        other_cwd = tmp_path / name.replace(" ", "_").replace(",", "")
        other_cwd.mkdir()
        line = refused(clean_env(tmp_path / "empty_home", **extra), other_cwd, cluster["address"])
        assert expected in line, (name, line)


# --- an --address that cannot be used: one line, in seconds, nothing written ---------------
def refused(env: dict[str, str], cwd: Path, address: str) -> str:
    storage = cwd / "shared"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "tuning.search", "--space", "demo", "--address", address,
                             "--storage_path", str(storage)], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    took = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert took < 30, f"took {took:.0f} s"  # ~3 s here, mostly importing Ray
    assert not list(cwd.iterdir()), "wrote " + ", ".join(p.name for p in cwd.iterdir())
    return lines[0]


def test_an_address_where_nothing_listens_is_one_line(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    line = refused(clean_env(tmp_path / "home"), cwd, f"127.0.0.1:{free_port()}")
    assert "no Ray head answers" in line and "ray start --head" in line, line


# --- the local search's Ray -----------------------------------------------------------------
GUARDED_MAIN = """
import builtins, os, sys
real_import = builtins.__import__
def guard(name, *args, **kwargs):
    if name == "ray" or name.startswith("ray."):
        settings = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "RAY_DEDUP_LOGS",
                                                   "RAY_local_fs_capacity_threshold", "TUNE_WARN_THRESHOLD_S")}
        if settings != {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0",
                        "RAY_local_fs_capacity_threshold": "1", "TUNE_WARN_THRESHOLD_S": "5"}:
            sys.exit(f"ray imported before its settings were in place: {settings}")
        builtins.__import__ = real_import
    return real_import(name, *args, **kwargs)
builtins.__import__ = guard
from tuning.search import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_the_local_search_ray_is_reachable_only_from_this_machine(tiny_data, tmp_path):
    """A real local search: while it runs, every socket its process tree listens on is on
    127.0.0.1; the token Ray needs is created 0600 and used without Ray's warning line; usage
    stats stay off although the user's environment turns them on; the raylet's disk monitor and
    worker prestart are off; Ray's settings are in place before ray is first imported."""
    space = conftest.write_space(tmp_path, tiny_data, name="local", budget={"num_samples": 2, "max_concurrent": 1},
                                 search={"lr_head": {"loguniform": [3e-4, 3e-3]}})
    home = tmp_path / "home"
    env = clean_env(home, RAY_USAGE_STATS_ENABLED="1")
    for key in ("RAY_DEDUP_LOGS", "RAY_local_fs_capacity_threshold", "TUNE_WARN_THRESHOLD_S",
                "RAY_prestart_worker_first_driver"):
        env.pop(key, None)   # set by in-process searches of this test session
    proc = subprocess.Popen([sys.executable, "-c", GUARDED_MAIN, "--space", str(space)], cwd=tmp_path,
                            env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    listening, usage_stats, disk_monitor, prestart = set(), set(), set(), set()
    try:
        while proc.poll() is None:
            driver = psutil.Process(proc.pid)
            for child in [driver, *driver.children(recursive=True)]:
                try:
                    listening |= {(child.name(), c.laddr.ip, c.laddr.port) for c in child.net_connections("inet")
                                  if c.status == psutil.CONN_LISTEN}
                    if child.pid == driver.pid:  # its /proc environ is the one it started with
                        continue
                    environ = child.environ()
                    # Unreadable: a process that is exiting shows no environment, and one forked
                    # and not yet exec'd shows the driver's starting one (the user's "1").
                    if not environ or child.cmdline() == driver.cmdline():
                        continue
                    usage_stats.add((child.name(), environ.get("RAY_USAGE_STATS_ENABLED")))
                    if child.name() == "raylet":
                        disk_monitor.add(environ.get("RAY_local_fs_capacity_threshold"))
                        prestart.add(environ.get("RAY_prestart_worker_first_driver"))
                except psutil.Error:
                    continue
            time.sleep(0.3)
        output = proc.communicate(timeout=60)[0]
    finally:
        stop_session(proc.pid)
    assert proc.returncode == 0, output[-4000:]
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, listening  # seen while they ran
    assert all(ip in LOOPBACK for _, ip, _ in listening), sorted(listening)
    # (ray::* processes rename themselves over their environment block: None there)
    assert {value for _, value in usage_stats} - {None} == {"0"}, usage_stats
    assert ("gcs_server", "0") in usage_stats and ("raylet", "0") in usage_stats, usage_stats
    assert disk_monitor == {"1"}, disk_monitor
    assert prestart == {"0"}, prestart   # no idle workers that Tune's actors would not use
    assert "Token authentication" not in output, output
    token = home / ".ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64


def test_stopping_a_local_ray_kills_its_monitor_first(monkeypatch):
    """Ray would SIGTERM the autoscaler monitor after the GCS is gone and wait 1 s for it;
    a cluster's driver holds no monitor and only disconnects."""
    import ray

    from tuning.cluster import stop_ray

    calls: list[str] = []
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    for head, expected in ((True, ["kill_monitor", "shutdown"]), (False, ["shutdown"])):
        calls.clear()
        node = SimpleNamespace(head=head, kill_monitor=lambda check_alive: calls.append("kill_monitor"))
        monkeypatch.setattr(ray._private.worker, "_global_node", node)
        stop_ray()
        assert calls == expected
    monkeypatch.setattr(ray._private.worker, "_global_node", None)   # never started
    calls.clear()
    stop_ray()
    assert calls == ["shutdown"]


@pytest.mark.slow
def test_a_real_local_ray_stops_with_its_monitor_killed_first(tmp_path):
    """Against Ray itself: `Node.kill_monitor` still exists and ends the monitor at once
    (no SIGTERM grace), before Ray stops the raylet; every process of the node is gone after."""
    code = """
import json
from tuning.cluster import start_local_ray, stop_ray
start_local_ray()
import ray
from ray._private.node import Node
node = ray._private.worker._global_node
processes = [info.process for infos in node.all_processes.values() for info in infos]
kills = []
real = Node._kill_process_type
def record(self, process_type, *args, **kwargs):
    kills.append([process_type, kwargs.get("allow_graceful", False)])
    return real(self, process_type, *args, **kwargs)
Node._kill_process_type = record
stop_ray()
print(json.dumps({"kills": kills, "alive": [p.pid for p in processes if p.poll() is None]}))
"""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kills"][0] == ["monitor", False], result
    assert [kind for kind, _ in result["kills"]].index("raylet") > 0, result
    assert result["alive"] == [], result


def test_the_token_file_is_kept_private(tmp_path, monkeypatch, capsys):
    from tuning.cluster import keep_token_private

    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    keep_token_private(create=True)  # a local search makes it: 0600, in a 0700 folder
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    made = token.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", made)
    token.chmod(0o644)  # as `ray get-auth-token --generate` leaves it under the usual umask
    keep_token_private(create=True)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == made
    assert "now 0600" in capsys.readouterr().out
    elsewhere = tmp_path / "shared_token"
    elsewhere.write_text(made)
    elsewhere.chmod(0o640)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(elsewhere))
    keep_token_private(create=False)  # joining a cluster: the file Ray will read is tightened
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o600
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    elsewhere.chmod(0o644)
    keep_token_private(create=False)  # no token auth: not Ray's file to police
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o644


def test_a_user_environment_cannot_turn_usage_stats_on(monkeypatch):
    from tuning.cluster import prepare_environment

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    monkeypatch.delenv("TUNE_WARN_THRESHOLD_S", raising=False)
    prepare_environment(local=False)
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["RAY_DEDUP_LOGS"] == "1"  # a default: the user's choice stands
    assert os.environ["TUNE_WARN_THRESHOLD_S"] == "5"  # no "may be a performance bottleneck" at 0.5 s


def test_local_ray_defaults_apply_to_the_local_ray_only(monkeypatch):
    """Joining a cluster leaves its disk monitor to the cluster; the local Ray gets the default,
    and the user's own value stands."""
    from tuning.cluster import LOCAL_DEFAULT_ENV, prepare_environment

    for key in LOCAL_DEFAULT_ENV:
        monkeypatch.delenv(key, raising=False)
    prepare_environment(local=False)
    assert not set(LOCAL_DEFAULT_ENV) & set(os.environ)
    prepare_environment(local=True)
    assert os.environ["RAY_local_fs_capacity_threshold"] == "1"
    monkeypatch.setenv("RAY_local_fs_capacity_threshold", "0.9")
    prepare_environment(local=True)
    assert os.environ["RAY_local_fs_capacity_threshold"] == "0.9"
