"""docker/ without a Docker engine: the compose file, the Dockerfile and the `ray up` config
parse, run exactly the commands the READMEs document (with flags this Ray accepts), copy files
that exist, pin every dependency, and keep the tests out of the image. The cluster these files
describe is run for real, without Docker, by tests/test_cluster.py."""
from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
HEAD_IP = "10.0.0.1"
VOLUMES = ("/data", "/checkpoints", "/results")


# --- helpers ------------------------------------------------------------------------------
def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ -> $."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    text = re.sub(r"(?<!\$)\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, text)
    return text.replace("$$", "$")


def compose(env: dict[str, str] | None = None) -> dict:
    text = (DOCKER / "docker-compose.yaml").read_text()
    return yaml.safe_load(interpolate(text, {"RAY_HEAD_IP": HEAD_IP} if env is None else env))


def ray_command(args: list[str]) -> tuple[str, dict]:
    """`ray SUB ...` parsed by Ray's own CLI (unknown flags or subcommands raise)."""
    from ray.scripts.scripts import cli

    assert Path(args[0]).name == "ray", args
    command = cli.commands[args[1]]
    return args[1], command.make_context(args[1], list(args[2:])).params


def search_args(args: list[str]):
    """`python -m tuning.search ...` parsed by the search's own parser."""
    from tuning.search import parse_args

    assert args[:3] == ["python", "-m", "tuning.search"], args
    return parse_args(args[3:])


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell line: split at ;, && and ||."""
    return [shlex.split(part) for part in re.split(r";|&&|\|\|", text) if part.strip()]


def documented_lines(path: Path) -> list[str]:
    """Command lines of the ```bash blocks of a README, continuations joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def documented(path: Path, prefix: str) -> list[str]:
    lines = [line for line in documented_lines(path) if line.startswith(prefix)]
    assert lines, f"{path.name} documents no `{prefix} ...`"
    return shlex.split(lines[0])


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continuations joined."""
    text = re.sub(r"\\\n(\s*#.*\n)*", " ", (DOCKER / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints.txt: {line!r} is not NAME==VERSION"
            key = canonicalize_name(name)
            assert key not in pins, f"constraints.txt pins {name} twice"
            pins[key] = version.strip()
    return pins


def base_ray_version() -> str:
    [base] = [args for op, args in dockerfile() if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu(@sha256:[0-9a-f]{64})?", base)
    assert match, f"Dockerfile: base {base!r} is not a pinned rayproject/ray GPU image"
    return match.group(1)


def pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] in "*?":
            out, i = out + ("[^/]*" if pattern[i] == "*" else "[^/]"), i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    result = False
    for pattern in patterns:
        regex = pattern_regex(pattern.lstrip("!").rstrip("/"))
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            result = not pattern.startswith("!")
    return result


def dockerignore() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def repo_files() -> list[str]:
    skip = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "report", "demo_data"}
    return [str(p.relative_to(REPO)) for p in REPO.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(REPO).parts)]


# --- the compose file -------------------------------------------------------------------------
def test_compose_starts_the_documented_head_and_workers():
    services = compose()["services"]
    assert set(services) == {"head", "worker"}
    _, head = ray_command(services["head"]["command"])
    _, head_doc = ray_command(documented(DOCKER / "README.md", "ray start --head"))
    for key in ("head", "port", "dashboard_host"):
        assert head[key] == head_doc[key], key
    assert head["dashboard_host"] == "127.0.0.1" and head["block"]
    assert head["node_ip_address"] == HEAD_IP
    _, worker = ray_command(services["worker"]["command"])
    _, worker_doc = ray_command(documented(DOCKER / "README.md", "ray start --address"))
    assert worker["address"] == worker_doc["address"].replace("HEAD_IP", HEAD_IP) == f"{HEAD_IP}:6379"
    assert worker["block"]
    for name, service in services.items():
        assert service["network_mode"] == "host" and service["env_file"] == "ray.env"
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
        mounts = {v.split(":")[1]: v.split(":")[2:] for v in service["volumes"]}
        resume_key = {"/home/ray/.config/headernet-tune"} if name == "head" else set()
        assert mounts.keys() == {*VOLUMES, "/run/ray-auth", *resume_key}, mounts
        assert mounts["/data"] == mounts["/checkpoints"] == mounts["/run/ray-auth"] == ["ro"]
        # a health check where a Ray node runs, with a command Ray has
        sub, params = ray_command(service["healthcheck"]["test"][1:])
        assert sub == "health-check" and params["address"].endswith(":6379")
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_compose_takes_the_head_address_from_the_shell_and_shares_the_token():
    text = (DOCKER / "docker-compose.yaml").read_text()
    assert "$${" not in text  # escaped: the container's environment, not RAY_HEAD_IP=... on the command line
    with pytest.raises(KeyError, match="RAY_HEAD_IP"):
        compose(env={})
    other = compose({"RAY_HEAD_IP": "192.168.7.7"})["services"]
    assert ray_command(other["worker"]["command"])[1]["address"] == "192.168.7.7:6379"
    env = dict(line.split("=", 1) for line in (DOCKER / "ray.env").read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert "RAY_HEAD_IP" not in env
    token_mount = next(v for v in compose()["services"]["worker"]["volumes"] if ":/run/ray-auth" in v)
    assert token_mount.startswith("/srv/headernet/ray-auth:")  # RAY_TOKEN_DIR's default
    assert Path(env["RAY_AUTH_TOKEN_PATH"]).parent == Path("/run/ray-auth")


def test_the_readmes_docker_commands_name_what_exists():
    services = compose()["services"]
    texts = [(DOCKER / "README.md").read_text(), (REPO / "README.md").read_text(),
             (DOCKER / "docker-compose.yaml").read_text(), (REPO / "docs" / "scale_out.md").read_text()]
    used = set()
    for text in texts:
        for match in re.finditer(r"docker compose -f (\S+) (up -d|exec) (\w+)", text):
            assert (REPO / match.group(1)) == DOCKER / "docker-compose.yaml"
            assert match.group(3) in services, match.group(0)
            used.add(match.group(3))
    assert used == {"head", "worker"}
    image = services["head"]["image"]
    for match in re.finditer(r"docker (?:build|run)[^\n`]*?(headernet-tune\S*)", texts[0]):
        assert match.group(1) == image, match.group(0)
    assert f"-f docker/Dockerfile -t {image} ." in texts[0]


def test_every_documented_search_command_parses():
    """Every `python -m tuning.search` in both READMEs, the docs pages, the compose file and
    ray-cluster.yaml is accepted by the search's parser; in a container, its paths are under
    the mounts."""
    sources = {REPO / "README.md": False, DOCKER / "README.md": True,
               DOCKER / "docker-compose.yaml": True, DOCKER / "ray-cluster.yaml": True,
               **{page: False for page in sorted((REPO / "docs").glob("*.md"))}}
    found = 0
    for path, in_container in sources.items():
        text = path.read_text().replace("\\\n#", " ").replace("\\\n", " ")
        for match in re.finditer(r"python -m tuning\.search[^\n`\"]*", text):
            words = shlex.split(match.group(0).split("  #")[0].replace("...", ""))
            if "--space" not in words:
                continue  # prose: "`python -m tuning.search ...` starts its own Ray"
            args = search_args(words)
            found += 1
            if args.address and in_container and args.storage_path == "/results":
                for value in (args.train_csv, args.val_csv, args.storage_path, *args.sets):
                    path_part = str(value).split("=", 1)[-1]
                    assert path_part.startswith(VOLUMES), (path.name, value)
    assert found >= 8, found


# --- the image --------------------------------------------------------------------------------
def test_the_image_is_pinned_non_root_and_installs_the_package_not_the_tree():
    steps = dockerfile()
    ray_version = base_ray_version()
    assert constraints()["ray"] == ray_version
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    [install] = [args for op, args in steps if op == "RUN" and "pip install" in args]
    words = shlex.split(install)
    assert words[:5] == ["pip", "install", "--constraint", "docker/constraints.txt", "."], words
    assert "-e" not in words and "--editable" not in words and "[test]" not in install
    assert f"ray.__version__ == '{ray_version}'" in install  # the build checks what it installed
    patterns = dockerignore()
    for op, args in steps:
        if op == "COPY":
            *sources, _ = [w for w in shlex.split(args) if not w.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), source
                assert not ignored(source, patterns), f".dockerignore drops {source}, which the Dockerfile copies"
    assert not any(op == "COPY" and re.search(r"(^|\s)\.(\s|$)", args) for op, args in steps)


def test_dockerignore_keeps_tests_and_data_out():
    patterns = dockerignore()
    files = repo_files()
    kept = [f for f in files if not ignored(f, patterns)]
    assert kept and all(f.split("/")[0] in ("headernet_core", "tuning", "search_spaces", "pyproject.toml",
                                               "README.md", "docker") for f in kept), kept
    assert "docker/constraints.txt" in kept and "pyproject.toml" in kept
    for dropped in ("tests/test_cluster.py", "bench", ".ci/run", "docker/Dockerfile"):
        assert ignored(dropped, patterns), dropped
    assert ignored("tuning/__pycache__/search.cpython-311.pyc", patterns)


def test_constraints_pin_every_dependency_within_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = constraints()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert canonicalize_name(project["name"]) not in pins
    for line in project["dependencies"]:
        requirement = Requirement(line)
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin, f"constraints.txt does not pin {requirement.name}"
        assert Version(pin) in requirement.specifier, f"{requirement.name}=={pin} is not {requirement.specifier}"
    # the closure: what those depend on is pinned too
    assert {"grpcio", "jsonschema", "optuna", "pyarrow"} <= pins.keys()


def test_the_image_pins_the_ray_optuna_and_pydantic_that_the_tests_run_with():
    """The image gets the versions these tests ran against (CI installs the newest inside
    pyproject's ranges): tuning/ray_compat.py's private names are checked for those only."""
    from importlib.metadata import version

    pins = constraints()
    for name in ("ray", "optuna", "pydantic"):
        assert pins[name] == version(name), (
            f"docker/constraints.txt pins {name}=={pins[name]} but the tests run with {version(name)}: "
            f"regenerate it (its header) or install the pinned version")


# --- ray up -----------------------------------------------------------------------------------
def cluster_yaml() -> dict:
    return yaml.safe_load((DOCKER / "ray-cluster.yaml").read_text())


def test_ray_up_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = cluster_yaml()
    validate_config(config)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before it starts
    validate_config(prepared)
    assert config["provider"]["type"] == "local"
    [node_type] = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"])
    # the commented cloud example is YAML that passes the same schema in place of the local block
    text = (DOCKER / "ray-cluster.yaml").read_text()
    commented = text[text.index("\n# provider:"):].replace("\n# ", "\n").replace("\n#\n", "\n")
    cloud = {**config, **yaml.safe_load(commented)}
    validate_config(cloud)
    assert cloud["provider"]["type"] == "aws" and "gpu_worker" in cloud["available_node_types"]


def test_ray_up_config_runs_the_image_with_shared_storage_and_the_token():
    config = cluster_yaml()
    docker = config["docker"]
    assert docker["image"] == compose()["services"]["head"]["image"]
    options = [shlex.split(o) for o in docker["run_options"]]
    env = {o[1] for o in options if o[0] == "--env"}
    assert {"RAY_AUTH_MODE=token", "RAY_USAGE_STATS_ENABLED=0"} <= env
    mounts = {o[1].split(":")[1]: o[1].split(":")[2:] for o in options if o[0] == "--volume"}
    assert mounts == {"/data": ["ro"], "/checkpoints": ["ro"], "/results": []}
    assert "--gpus all" in docker["worker_run_options"]
    # the token the documented command writes (~/.ray/auth_token) goes to the image user's ~/.ray
    [(remote, local)] = config["file_mounts"].items()
    assert local == "~/.ray/auth_token" and "(umask 077 && ray get-auth-token --generate > /dev/null)" in \
        (DOCKER / "README.md").read_text()
    workdir = next(args for op, args in dockerfile() if op == "WORKDIR")
    user = [args for op, args in dockerfile() if op == "USER"][-1]
    assert remote == f"/home/{user}/.ray/auth_token" and workdir.startswith(f"/home/{user}/")


def test_ray_up_start_commands_are_the_documented_ones():
    config = cluster_yaml()
    head_doc = ray_command(documented(DOCKER / "README.md", "ray start --head"))[1]
    starts = {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = [words for line in config[key] for words in shell_commands(line)]
        assert [w[:2] for w in commands] == [["ray", "stop"], ["ray", "start"]], commands
        starts[key] = ray_command(commands[1])[1]
    head = starts["head_start_ray_commands"]
    assert head["head"] and head["port"] == head_doc["port"] and head["dashboard_host"] == "127.0.0.1"
    assert head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"  # the launcher writes it there
    assert starts["worker_start_ray_commands"]["address"] == "$RAY_HEAD_IP:6379"  # set by the launcher


def test_ray_up_names_only_commands_and_files_that_exist():
    from ray.scripts.scripts import cli

    text = (DOCKER / "ray-cluster.yaml").read_text()
    used = set(re.findall(r"\bray (up|dashboard|exec|down) ([\w./-]+)", text)) | set(
        re.findall(r"\bray (up|dashboard|exec|down) (docker/ray-cluster\.yaml)", (DOCKER / "README.md").read_text()))
    assert {sub for sub, _ in used} == {"up", "dashboard", "exec", "down"}
    for sub, path in used:
        assert sub in cli.commands and (REPO / path).is_file(), (sub, path)
    for path in re.findall(r"\bdocker/[\w.-]+", text):
        assert (REPO / path).exists(), path
    for setting in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert cluster_yaml()[setting] == [], setting  # everything is in the image
