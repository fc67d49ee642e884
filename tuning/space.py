"""Search spaces: one YAML file per study -> a checked `SearchSpace` -> Optuna define-by-run.

The file format (sections, distributions, `when`, `overrides`, defaults, `--set`) is described
in docs/search_spaces.md. The file's shape is a set of pydantic models (`_File` and its
sections; unknown keys are refused); `_Loader` applies `--set`, turns the first validation
error into one `HeaderNetError` line naming the file and the field, runs the trainer's own
checks (TrainConfig validation, backbone geometry) on every setting a trial can get, and builds
the plain `SearchSpace` / `Param` dataclasses. Those, not the models, travel pickled in Ray's
searcher state, so a search folder written by an earlier version still resumes.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal, Mapping, NoReturn, Sequence

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, StringConstraints,
                      ValidationError, ValidationInfo, field_validator, model_validator)

from headernet_core.backbones import check_geometry
from headernet_core.config import (MAX_SEED, SELECTABLE_METRICS, TrainConfig, coerce, field_types, fields_with_role,
                                   format_value, load_yaml_mapping, unwrap_optional)
from headernet_core.errors import HeaderNetError, fail
from headernet_core.metrics import reported_metrics
from headernet_core.paths import MAX_NAME_LEN

SPACES_DIRNAME = "search_spaces"
REPO_SPACES_DIR = Path(__file__).resolve().parents[1] / SPACES_DIRNAME

MAPPING_SECTIONS = ("trainer", "search", "objective", "constraints", "budget", "scheduler", "resources", "retrain")
DEFAULT_STARTUP_TRIALS = 10

# The distributions, and the keys a param spec may hold besides its distribution.
PARAM_OPTIONS: dict[str, tuple[str, ...]] = {"loguniform": ("when",), "uniform": ("step", "when"),
                                             "int": ("step", "log", "when"), "choice": ("overrides", "when")}
KINDS = tuple(PARAM_OPTIONS)
# Set per trial by the trial function; fixing them in a space would make trials collide. The
# runs' root is a path a space may choose (the search's storage), not its trial's to own.
TRIAL_OWNED = tuple(key for key in fields_with_role("run") if key not in fields_with_role("path"))
# Text settings that hold a number and so may take a numeric distribution.
NUMERIC_TEXT = ("neg_pos_ratio",)
# How many combinations of choice values are checked as whole trial configs.
MAX_COMBINATIONS = 1000
# Whole-number settings the backbone's shape check reads: their ranges are checked at low,
# low + step and high in every combination, so a step that leaves the patch grid is seen.
SHAPE_KEYS = ("input_size", "num_frames")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# --- the file's shape (pydantic) -------------------------------------------------------------
# Validators raise ValueError with the text after "file: field: " of the one-line error.
def _number_of(value: Any, integer: bool = False, label: str = "") -> Any:
    """A YAML number (or text like '1e-4', which YAML 1.1 reads as text)."""
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if (isinstance(number, bool) or not isinstance(number, (int, float))
            or not math.isfinite(number) or (integer and not float(number).is_integer())):
        raise ValueError(f"{label}expected {'a whole number' if integer else 'a number'}, "
                         f"got {_fmt(value)}")
    return int(number) if integer else number


def _cpus(value: float) -> float:
    if value < 1:
        raise ValueError(f"a trial needs at least 1 CPU, got {_fmt(value)}")
    return value


def _gpus(value: float) -> float:
    if value < 0 or (value > 1 and not value.is_integer()):
        raise ValueError(f"expected 0, a fraction in (0, 1) or a whole number of GPUs, got {_fmt(value)}")
    return value


def _flag(value: Any, label: str = "") -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{label}expected true or false, got {_fmt(value)}")
    return value


def _folder_name(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or len(value) > MAX_NAME_LEN:
        raise ValueError(f"expected a folder name of letters, digits, '.', '_' or '-' (at most "
                         f"{MAX_NAME_LEN} characters), got {_fmt(value)}")
    return value


def _metric(value: Any) -> str:
    """A validation metric the trainer can pick a trial's best epoch by (the objective is that
    epoch's value)."""
    if value not in SELECTABLE_METRICS:
        choices = list(SELECTABLE_METRICS)
        problem = ("is reported but cannot pick a trial's best epoch" if value in reported_metrics()
                   else f"is not a metric the trainer reports{_did_you_mean(value, choices)}")
        raise ValueError(f"{value} {problem}; choose one of {', '.join(choices)}")
    return value


_Path = Annotated[str, StringConstraints(strict=True, min_length=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Objective(_Section):
    metric: Annotated[str, AfterValidator(_metric)] = "val_f1"
    mode: Any = Field(None, validate_default=True)      # default: the metric's own direction

    @field_validator("mode")
    @classmethod
    def _direction(cls, mode: Any, info: ValidationInfo) -> Any:
        if "metric" not in info.data:       # the metric already failed
            return mode
        metric = info.data["metric"]
        natural = SELECTABLE_METRICS[metric]
        mode = natural if mode is None else mode
        if mode not in ("max", "min"):
            raise ValueError(f"expected max or min, got {_fmt(mode)}")
        if mode != natural:
            better = "higher" if natural == "max" else "lower"
            raise ValueError(f"{mode} would look for the worst {metric} ({better} is better); "
                             f"use {natural}")
        return mode


def _reported(value: Any) -> str:
    """A metric of metrics_epoch.csv (a further objective or a constraint may be any)."""
    if value not in reported_metrics():
        raise ValueError(f"{value} is not a metric the trainer reports"
                         f"{_did_you_mean(str(value), reported_metrics())}")
    return value


class _Objectives(_Objective):
    """`metric`/`mode` (one objective) or `metrics`/`modes` (several: a Pareto front). The
    first of several picks each trial's best epoch, so it must be a selectable metric in its
    own direction; the others are read at that epoch."""
    metrics: list[Annotated[str, AfterValidator(_reported)]] | None = Field(None, min_length=2)
    modes: list[Literal["max", "min"]] | None = None

    @model_validator(mode="after")
    def _several(self) -> _Objectives:
        if self.metrics is None:
            if self.modes is not None:
                raise ValueError("modes goes with metrics (a list of two or more metrics)")
            return self
        if self.model_fields_set & {"metric", "mode"}:
            raise ValueError("give metric/mode (one objective) or metrics/modes (several), not both")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError(f"metrics lists a metric twice: {', '.join(self.metrics)}")
        if self.modes is None or len(self.modes) != len(self.metrics):
            raise ValueError(f"modes needs one max or min per metric ({len(self.metrics)})")
        try:
            first = _Objective(metric=self.metrics[0], mode=self.modes[0])   # its checks
        except ValidationError as exc:
            raise ValueError(f"metrics[0]: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        self.metric, self.mode = first.metric, first.mode
        return self


class _Bound(_Section):
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _some(self) -> _Bound:
        if self.max is None and self.min is None:
            raise ValueError("expected max and/or min")
        return self


class _Budget(_Section):
    num_samples: int = Field(20, ge=1)
    max_concurrent: int = Field(1, ge=1)
    seed: int = Field(42, ge=0, le=MAX_SEED)
    startup_trials: int = Field(DEFAULT_STARTUP_TRIALS, ge=0)


class _Scheduler(_Section):
    type: Literal["asha", "none"] = "none"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class _Resources(_Section):
    """Per trial; with `workers: N > 1` a trial is N DDP processes (Ray Train) and `cpu`/`gpu`
    are per worker (tuning/ddp_trial.py)."""
    cpu: Annotated[float, AfterValidator(_cpus)] = 1.0
    gpu: Annotated[float, AfterValidator(_gpus)] = 1.0
    workers: int = Field(1, ge=1, strict=True)

    def as_dict(self) -> dict[str, float]:
        """What SearchSpace keeps: `workers` only when a trial has several."""
        return self.model_dump(exclude={"workers"} if self.workers == 1 else None)


class _Retrain(_Section):
    epochs: int = Field(ge=0)           # 0: no retrain
    test_csv: _Path | None = None
    train_on_val: bool = Field(False, strict=True)


class _Spec(_Section):
    """One searched key as written: exactly one distribution and the options that go with it.
    `kind`, `low`, `high` are filled in by the validators, not by the file."""
    loguniform: Any = None
    uniform: Any = None
    int_: Any = Field(None, alias="int")
    choice: Any = None
    step: Any = None
    log: Any = None
    when: dict[Any, Any] | None = None
    overrides: dict[Any, Any] | None = None
    kind: str = ""
    low: Any = None
    high: Any = None

    @model_validator(mode="before")
    @classmethod
    def _one_distribution(cls, raw: Any) -> Any:
        kinds = [k for k in raw if k in KINDS]
        extra = [k for k in raw if k not in KINDS]
        known = ("when", "overrides", "step", "log")
        if not kinds:
            bad = next((k for k in extra if k not in known), None)
            if bad is not None:
                raise ValueError(f"unknown distribution {bad}{_did_you_mean(str(bad), KINDS)}; "
                                 f"expected one of {', '.join(KINDS)}")
            raise ValueError(f"no distribution; give one of {', '.join(KINDS)}")
        if len(kinds) > 1:
            raise ValueError(f"more than one distribution ({', '.join(kinds)}); give exactly one")
        kind, allowed = kinds[0], PARAM_OPTIONS[kinds[0]]
        for key in extra:
            if key not in allowed:
                if key in known:
                    raise ValueError(f"{key} does not go with {kind} (a {kind} takes "
                                     f"{', '.join(allowed)})")
                raise ValueError(f"unknown key {key}{_did_you_mean(str(key), (*KINDS, *allowed))} "
                                 f"(a {kind} takes {', '.join(allowed)})")
        return {**raw, "kind": kind}

    @model_validator(mode="after")
    def _values(self) -> _Spec:
        """Choices: single values. Ranges: low < high; log needs low > 0 and no step; high -
        low a multiple of step."""
        kind = self.kind
        if kind == "choice":
            if not isinstance(self.choice, list) or not self.choice:
                raise ValueError(f"choice expects a non-empty list of values, got {_fmt(self.choice)}")
            bad = next((v for v in self.choice if isinstance(v, (list, dict))), None)
            if bad is not None:
                raise ValueError(f"choice values must be single values (numbers, text, "
                                 f"true/false, null), got {_fmt(bad)}")
            return self
        bounds = self.int_ if kind == "int" else getattr(self, kind)
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise ValueError(f"{kind} expects [low, high], got {_fmt(bounds)}")
        integer = kind == "int"
        low = _number_of(bounds[0], integer, "low: ")
        high = _number_of(bounds[1], integer, "high: ")
        if not low < high:
            raise ValueError(f"low {_fmt(low)} must be < high {_fmt(high)}")
        log = kind == "loguniform" or (integer and self.log is not None and _flag(self.log, "log: "))
        if log and not low > 0:
            raise ValueError(f"a log scale needs low > 0, got low {_fmt(low)}")
        if self.step is not None:
            self.step = _number_of(self.step, integer, "step: ")
            if not self.step > 0:
                raise ValueError(f"step must be > 0, got {_fmt(self.step)}")
            if log and self.step != 1:
                raise ValueError("step and log cannot be combined (Optuna samples a log-scale int "
                                 "with step 1)")
            spans = (high - low) / self.step
            if abs(spans - round(spans)) > 1e-9 * max(1.0, abs(spans)):
                raise ValueError(f"high - low ({_fmt(high - low)}) must be a multiple of step "
                                 f"{_fmt(self.step)} so that high can be drawn")
        self.low, self.high, self.log = low, high, log and integer
        return self


class _File(_Section):
    """A space file after `--set`; trainer keys are checked against TrainConfig afterwards."""
    name: Annotated[str, PlainValidator(_folder_name)]
    trainer: dict[str, Any] = {}
    search: dict[str, _Spec] = {}
    objective: _Objectives = Field(default_factory=_Objectives)
    constraints: dict[Annotated[str, AfterValidator(_reported)], _Bound] = {}
    budget: _Budget = Field(default_factory=_Budget)
    scheduler: _Scheduler = Field(default_factory=_Scheduler)
    resources: _Resources = Field(default_factory=_Resources)
    max_failures: int = Field(0, ge=0)
    retrain: _Retrain | None = None
    demo_data: _Path | None = None


# The model of each section (of constraints: of each metric's entry, the section being a mapping of them).
_SECTION_MODELS: dict[str, type[BaseModel]] = {"objective": _Objectives, "budget": _Budget, "scheduler": _Scheduler,
                                               "resources": _Resources, "retrain": _Retrain, "constraints": _Bound}


# --- the space ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One searched trainer key. Values are already converted to the trainer's type."""
    name: str
    kind: str                                   # loguniform | uniform | int | choice
    low: float | int | None = None              # numeric kinds
    high: float | int | None = None
    values: tuple[Any, ...] = ()                # choice
    step: float | int | None = None             # uniform / int
    log: bool = False                           # int (loguniform is always log)
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    overrides: dict[Any, dict[str, Any]] = field(default_factory=dict)

    def active(self, current: Mapping[str, Any]) -> bool:
        """Whether every `when` condition holds for the trial's values so far."""
        return all(current.get(key) in allowed for key, allowed in self.when.items())

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial (or Ray's captor of one) for this key's value."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step,
                                   log=self.kind == "loguniform")

    def describe(self) -> str:
        if self.kind == "choice":
            text = f"{self.name}: choice {' | '.join(_fmt(v) for v in self.values)}"
            if self.overrides:
                text += "  (" + "; ".join(f"{_fmt(v)}: {_fmt_dict(o)}" for v, o in self.overrides.items()) + ")"
        else:
            text = f"{self.name}: {self.kind} {_fmt(self.low)} .. {_fmt(self.high)}"
            if self.step is not None:
                text += f" step {_fmt(self.step)}"
            if self.log:
                text += " log"
        if self.when:
            text += "  when " + " and ".join(f"{k} in {'|'.join(_fmt(v) for v in vs)}"
                                             for k, vs in self.when.items())
        return text


@dataclass(frozen=True)
class SearchSpace:
    """A checked search space: plain data, picklable (it travels with Ray's searcher state)."""
    name: str
    path: Path
    trainer: dict[str, Any]             # fixed trainer keys, converted to TrainConfig types
    params: tuple[Param, ...]
    metric: str
    mode: str                           # "max" | "min"
    num_samples: int
    max_concurrent: int
    seed: int
    scheduler: dict[str, Any]           # {"type": "none"} | {"type": "asha", "grace_period":
                                        #  int, "reduction_factor": float}
    resources: dict[str, float]         # {"cpu": float, "gpu": float, "workers": int}
    max_failures: int
    demo_data: str | None = None        # generate the demo dataset here when its CSVs are missing
    startup_trials: int = DEFAULT_STARTUP_TRIALS    # TPE's random start-up trials
    retrain: dict[str, Any] = field(default_factory=dict)   # {} | {"epochs": int,
                                        #  "test_csv": str | None, "train_on_val": bool}
    # A multi-objective search: ((metric, mode), ...), the first being (metric, mode); () for one.
    objectives: tuple[tuple[str, str], ...] = ()
    # Feasibility: ((metric, "max" | "min", bound), ...), told to Optuna's constraints_func.
    constraints: tuple[tuple[str, str, float], ...] = ()

    @property
    def objective_metrics(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.objectives) or (self.metric,)

    @property
    def objective_modes(self) -> tuple[str, ...]:
        return tuple(mode for _, mode in self.objectives) or (self.mode,)

    def define_by_run(self, trial: Any) -> None:
        """Optuna define-by-run: sample the params in order, skipping those whose `when`
        fails. Pass the bound method (`space.define_by_run`) to OptunaSearch(space=...)."""
        current = self._fixed_values()
        for param in self.params:
            if param.active(current):
                value = param.suggest(trial)
                current.update(param.overrides.get(value, {}))
                current[param.name] = value

    def combinations(self, on_param: Callable[[Param, dict[str, Any]], None] | None = None
                     ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """Each combination of choice values in sampling order, numeric params at their low
        bound, at most MAX_COMBINATIONS: (the sampled keys, the trial's full trainer values).
        The loader validates every combination as a TrainConfig and the search checks each
        one's checkpoint, so a value needed only through one choice's `overrides` is seen.
        `on_param(param, sampled so far)` is called the first time each param is active."""
        seen: set[str] = set()
        count = 0

        def walk(index: int, sampled: dict[str, Any], current: dict[str, Any]):
            nonlocal count
            if count >= MAX_COMBINATIONS:
                return
            if index == len(self.params):
                count += 1
                yield sampled, current
                return
            param = self.params[index]
            if not param.active(current):
                yield from walk(index + 1, sampled, current)
                return
            if on_param is not None and param.name not in seen:
                seen.add(param.name)
                on_param(param, sampled)
            for value in param.values if param.kind == "choice" else (param.low,):
                yield from walk(index + 1, {**sampled, param.name: value},
                                {**current, **param.overrides.get(value, {}), param.name: value})

        yield from walk(0, {}, self._fixed_values())

    def trainer_values(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """The trial's trainer keys: `trainer` <- overrides of the sampled choices <- sampled."""
        values = dict(self.trainer)
        for param in self.params:
            if param.kind == "choice" and param.overrides and param.name in sampled:
                key = _quiet_coerce(param.name, sampled[param.name])
                values.update(param.overrides.get(key, {}))
        values.update(sampled)
        return values

    def trial_config(self, sampled: Mapping[str, Any]) -> TrainConfig:
        """The trial's TrainConfig (data files not checked: the trainer does that)."""
        return _validated(self.trainer_values(sampled), f"{_show(self.path)}: trial {_fmt_dict(dict(sampled))}")

    def max_epochs(self) -> int:
        """The most epochs any trial can run (ASHA's max_t)."""
        candidates = [self._fixed_values()["epochs"]]
        for param in self.params:
            candidates += [o["epochs"] for o in param.overrides.values() if "epochs" in o]
            if param.name == "epochs":
                candidates += list(param.values) if param.kind == "choice" else [param.high]
        return int(max(candidates))

    def describe(self) -> str:
        """A few readable lines for the CLI banner."""
        searched = [p.describe() for p in self.params]
        off = [p.name for p in self.params if _statically_off(p, self)]
        lines = [f"search space '{self.name}' from {_show(self.path)}",
                 f"  fixed:     {_fmt_dict(self.trainer) or '(trainer defaults)'}",
                 f"  searched:  {searched[0]}"]
        lines += [f"             {text}" for text in searched[1:]]
        if off:
            lines.append(f"  never sampled here (when is false): {', '.join(off)}")
        lines.append("  objective: " + ", ".join(f"{mode}imize {metric}" for metric, mode
                                                 in zip(self.objective_metrics, self.objective_modes))
                     + (" (Pareto front)" if self.objectives else ""))
        if self.constraints:
            lines.append("  feasible:  " + ", ".join(f"{metric} {'<=' if side == 'max' else '>='} {_fmt(bound)}"
                                                     for metric, side, bound in self.constraints))
        retries = f", a failed trial is retried up to {self.max_failures}x" if self.max_failures else ""
        lines.append(f"  budget:    {self.num_samples} trials, {self.max_concurrent} at a time, "
                     f"sampler seed {self.seed}, TPE after {self.startup_trials} random "
                     f"trials{retries}")
        if self.scheduler["type"] == "asha":
            lines.append(f"  scheduler: ASHA, first cut after {self.scheduler['grace_period']} "
                         f"epochs, 1/{_fmt(self.scheduler['reduction_factor'])} go on at each rung "
                         f"(max {self.max_epochs()} epochs)")
        else:
            lines.append(f"  scheduler: none (every trial runs all {self.max_epochs()} epochs)")
        workers = int(self.resources.get("workers", 1))
        lines.append(f"  resources: {_fmt(self.resources['cpu'])} CPU + {_fmt(self.resources['gpu'])} GPU per "
                     f"{f'worker, {workers} DDP workers per trial' if workers > 1 else 'trial'}")
        if self.retrain:
            test = self.retrain.get("test_csv")
            lines.append(f"  retrain:   the best config for {self.retrain['epochs']} epochs"
                         f"{' on train + val' if self.retrain.get('train_on_val') else ''}"
                         f"{f', then test on {_show(Path(test))}' if test else ''}")
        return "\n".join(lines)

    def _fixed_values(self) -> dict[str, Any]:
        """Every trainer key: TrainConfig's defaults under the fixed keys (fresh lists each call)."""
        return {**TrainConfig().to_dict(), **self.trainer}


# --- finding and loading --------------------------------------------------------------------
def find_space_file(name_or_path: str, spaces_dir: Path | None = None) -> Path:
    """An existing file as given; else `<dir>/<name>[.yaml|.yml]` in `spaces_dir`, or in the
    cwd's search_spaces/ and then the repository's."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    dirs = _space_dirs(spaces_dir)
    if len(given.parts) == 1:
        for folder in dirs:
            for candidate in (folder / given.name, folder / f"{given.name}.yaml", folder / f"{given.name}.yml"):
                if candidate.is_file():
                    return candidate
    listed = ", ".join(available_spaces(spaces_dir)) or "none"
    where = " or ".join(_show(d) + "/" for d in dirs)
    fail(f"search space {name_or_path!r} not found: not a file, and no such name in {where} "
         f"(available: {listed})")


def available_spaces(spaces_dir: Path | None = None) -> list[str]:
    """Names of the space files that `find_space_file` can find by name."""
    return sorted({p.stem for d in _space_dirs(spaces_dir) if d.is_dir() for p in d.iterdir()
                   if p.suffix in (".yaml", ".yml") and p.is_file()})


def load_space(name_or_path: str, *, sets: Sequence[str] = (), num_samples: int | None = None,
               max_concurrent: int | None = None, spaces_dir: Path | None = None) -> SearchSpace:
    """Read, apply `--set` strings and CLI budget overrides, check everything, return the space."""
    path = find_space_file(name_or_path, spaces_dir)
    return _Loader(path).load(load_yaml_mapping(path), sets, num_samples, max_concurrent)


# --- the loader -----------------------------------------------------------------------------
class _Loader:
    """Checks one file; `origins` remembers fields set from the command line for messages."""

    def __init__(self, path: Path):
        self.path = path
        self.show = _show(path)
        self.origins: dict[str, str] = {}

    def where(self, field_path: str) -> str:
        """`file: field`, plus where a command-line value came from (for the field or a parent)."""
        parts = field_path.split(".")
        prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
        origin = next((self.origins[p] for p in prefixes if p in self.origins), None)
        return f"{self.show}: {field_path}" + (f" (from {origin})" if origin else "")

    # -- top level --
    def load(self, data: dict[str, Any], sets: Sequence[str], num_samples: int | None,
             max_concurrent: int | None) -> SearchSpace:
        for section in MAPPING_SECTIONS:        # --set writes into these
            value = data.get(section)
            if value is None:
                data[section] = {}
            elif not isinstance(value, dict):
                fail(f"{self.where(section)}: expected a mapping of keys, got {_fmt(value)}")
        for name, spec in data["search"].items():
            if not isinstance(spec, dict):
                fail(f"{self.where(f'search.{name}')}: expected a mapping such as "
                     f"{{loguniform: [low, high]}} or {{choice: [a, b]}}, got {_fmt(spec)}")
        self._apply_sets(data, sets)
        for key, value in (("num_samples", num_samples), ("max_concurrent", max_concurrent)):
            if value is not None:
                data["budget"][key] = value
                self.origins[f"budget.{key}"] = f"--{key}"
        if data.get("name") is None:
            data["name"] = self.path.stem
        data["retrain"] = data["retrain"] or None
        try:
            raw = _File.model_validate(data)
        except ValidationError as exc:
            self._explain(exc)

        trainer = self._trainer(raw.trainer)
        retrain = raw.retrain.model_dump() if raw.retrain and raw.retrain.epochs else {}
        space = SearchSpace(
            name=raw.name, path=self.path, trainer=trainer, params=self._params(raw.search, trainer),
            metric=raw.objective.metric, mode=raw.objective.mode,
            scheduler=raw.scheduler.model_dump() if raw.scheduler.type == "asha" else {"type": "none"},
            resources=raw.resources.as_dict(), max_failures=raw.max_failures,
            demo_data=raw.demo_data, retrain=retrain, **raw.budget.model_dump(),
            objectives=tuple(zip(raw.objective.metrics, raw.objective.modes)) if raw.objective.metrics else (),
            constraints=tuple((metric, side, getattr(bound, side)) for metric, bound
                              in raw.constraints.items() for side in ("max", "min")
                              if getattr(bound, side) is not None))
        self._check_scheduler(raw.scheduler, space.max_epochs())
        self._check_resources(raw.resources, space)
        if space.objectives and space.scheduler["type"] == "asha":
            fail(f"{self.where('scheduler.type')}: a multi-objective search runs without a scheduler "
                 f"(ASHA would rank trials by {space.metric} alone and stop the ones the front needs "
                 f"for the other metrics); drop the scheduler section")
        self._check_trials(space)
        return space

    def _explain(self, error: ValidationError) -> NoReturn:
        """The first validation error (unknown keys first) as one line naming the file and the field."""
        first = min(error.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
        loc, kind, ctx = [str(part) for part in first["loc"]], first["type"], first.get("ctx", {})
        where, got = self.where(".".join(loc)), f", got {_fmt(first.get('input'))}"
        model = _SECTION_MODELS.get(loc[0]) if len(loc) > 1 else _File     # the model the field is in
        if kind == "extra_forbidden":
            keys = tuple(model.model_fields)
            fail(f"{where}: unknown {'section' if model is _File else 'key'}"
                 f"{_did_you_mean(loc[-1], keys)}; expected {', '.join(keys)}")
        if kind in ("greater_than_equal", "less_than_equal"):
            bounds = [getattr(m, k) for m in model.model_fields[loc[-1]].metadata
                      for k in ("ge", "le") if getattr(m, k, None) is not None]
            fail(f"{where}: must be " + (f">= {bounds[0]}" if len(bounds) == 1
                                         else f"in {bounds[0]}..{bounds[1]}") + got)
        expected = str(ctx.get("expected", "")).replace("'", "")   # "'asha' or 'none'"
        problems = {"greater_than": f"must be > {_fmt(ctx.get('gt'))}", "literal_error": f"expected {expected}",
                    "dict": "expected a mapping of keys", "model": "expected a mapping of keys",
                    "bool": "expected true or false", "missing": "missing, expected a value",
                    "string": "expected text", "int": "expected a whole number",
                    "float": "expected a number", "finite_number": "expected a number"}
        problem = problems.get(kind, problems.get(kind.split("_")[0]))
        fail(f"{where}: {problem}{got}" if problem
             else f"{where}: {first['msg'].removeprefix('Value error, ')}")

    def _apply_sets(self, data: dict[str, Any], sets: Sequence[str]) -> None:
        parsed: list[tuple[str, Any, str]] = []
        for item in sets:
            key, sep, text = item.partition("=")
            key, label = key.strip(), f"--set {item}"
            if not sep or not key:
                fail(f"{label}: expected key=value (e.g. lr_head=1e-3 or budget.num_samples=4)")
            try:
                parsed.append((key, yaml.safe_load(text), label))
            except yaml.YAMLError as exc:
                fail(f"{label}: the value is not valid YAML ({str(exc).splitlines()[0]})")
        keys = {key for key, _, _ in parsed}
        fixed: dict[str, tuple[Any, str]] = {}          # trainer keys: (value, origin), applied last
        carried: dict[str, tuple[Any, str]] = {}        # overrides of choices fixed by --set
        for key, value, label in parsed:
            section, dot, sub = key.partition(".")
            if not dot and key in ("name", "max_failures", "demo_data"):
                data[key] = value
                self.origins[key] = "--set"
            elif not dot or section == "trainer":
                name = sub if dot else key
                if name not in _fields():
                    fail(f"{label}: {name} is not a trainer key{_did_you_mean(name, _fields())}; "
                         f"use a TrainConfig key (lr_head=1e-3) or section.key with section one "
                         f"of {', '.join(MAPPING_SECTIONS)} (budget.num_samples=4)")
                spec = data["search"].pop(name, None)
                if isinstance(spec, dict) and isinstance(spec.get("overrides"), dict):
                    for choice, extra in spec["overrides"].items():
                        if isinstance(extra, dict) and _same_value(name, choice, value):
                            carried.update({k: (v, f"{label}, an override of that choice") for k, v in extra.items()})
                fixed[name] = (value, "--set")
            elif section in MAPPING_SECTIONS:
                if not sub or "." in sub:
                    fail(f"{label}: expected {section}.<key>=value with one dot")
                if section == "search" and not isinstance(value, dict):
                    fail(f"{label}: expected a mapping such as '{{loguniform: [1e-4, 1e-2]}}'")
                data[section][sub] = value
                self.origins[f"{section}.{sub}"] = "--set"
                if key == "objective.metric" and "objective.mode" not in keys:
                    data["objective"].pop("mode", None)   # the new metric brings its direction
            else:
                fail(f"{label}: unknown section {section}"
                     f"{_did_you_mean(section, MAPPING_SECTIONS)}; expected one of "
                     f"{', '.join(MAPPING_SECTIONS)}")
        for key, (value, origin) in {**carried, **fixed}.items():
            data["trainer"][key] = value
            self.origins[f"trainer.{key}"] = origin

    # -- what needs TrainConfig or several sections --
    def _trainer(self, raw: dict[str, Any]) -> dict[str, Any]:
        trainer = {}
        for key, value in raw.items():
            where = self.where(f"trainer.{key}")
            self._check_key(where, key)
            trainer[key] = _coerce_field(where, key, value)
        return trainer

    def _check_key(self, where: str, key: Any) -> None:
        if key not in _fields():
            fail(f"{where}: not a trainer key{_did_you_mean(str(key), _fields())} "
                 f"(the keys are the TrainConfig fields in headernet_core/config.py)")
        if key in TRIAL_OWNED:
            fail(f"{where}: set by each trial, not by a search space")

    def _params(self, raw: dict[str, _Spec], trainer: dict[str, Any]) -> tuple[Param, ...]:
        if not raw:
            fail(f"{self.where('search')}: nothing to search; add at least one key, e.g. "
                 f"lr_head: {{loguniform: [1.0e-4, 1.0e-2]}}")
        names = list(raw)
        params: list[Param] = []
        for name, spec in raw.items():
            where = self.where(f"search.{name}")
            self._check_key(where, name)
            if name in trainer:
                fail(f"{where}: also fixed in trainer: (keep it in one place; --set {name}=... "
                     f"fixes a searched key)")
            self._check_kind_fits(where, name, spec.kind)
            if spec.kind == "choice":
                values = self._choice_values(where, name, spec.choice)
                overrides = self._overrides(name, spec.overrides, values, names)
                param_kw: dict[str, Any] = {"values": values, "overrides": overrides}
            else:
                param_kw = {"low": spec.low, "high": spec.high, "step": spec.step, "log": spec.log}
            params.append(Param(name=name, kind=spec.kind, when=self._when(name, spec.when, params, names), **param_kw))
        return tuple(params)

    def _check_kind_fits(self, where: str, name: str, kind: str) -> None:
        ftype = _field_type(name)
        if ftype is list:
            fail(f"{where}: {name} is a list setting and cannot be searched (search choices are "
                 f"single values); fix it under trainer:")
        if kind == "choice":
            return
        if ftype is bool or (ftype is str and name not in NUMERIC_TEXT):
            fail(f"{where}: {name} is not a number; search it with choice: [...]")
        if ftype is int and kind != "int":
            fail(f"{where}: {name} takes whole numbers; use int: [low, high] instead of {kind}")

    def _choice_values(self, where: str, name: str, raw: list[Any]) -> tuple[Any, ...]:
        values: list[Any] = []
        for item in raw:
            value = _coerce_field(where, name, item)
            if value in values:
                fail(f"{where}: choice value {_fmt(item)} appears twice (as {_fmt(value)})")
            values.append(value)
        return tuple(values)

    def _overrides(self, name: str, raw: dict[Any, Any] | None, values: tuple[Any, ...],
                   names: list[str]) -> dict[Any, dict[str, Any]]:
        overrides: dict[Any, dict[str, Any]] = {}
        for choice, settings in (raw or {}).items():
            path = f"search.{name}.overrides.{_fmt(choice)}"
            here = self.where(path)
            matched = [v for v in values if _same_value(name, choice, v)]
            if not matched:
                fail(f"{here}: {_fmt(choice)} is not one of the choices "
                     f"{', '.join(_fmt(v) for v in values)}")
            if not isinstance(settings, dict) or not settings:
                fail(f"{here}: expected a mapping of trainer keys, got {_fmt(settings)}")
            converted = {}
            for key, value in settings.items():
                at = self.where(f"{path}.{key}")
                self._check_key(at, key)
                if key in names:
                    fail(f"{at}: {key} is searched; an override cannot fix it")
                converted[key] = _coerce_field(at, key, value)
            overrides[matched[0]] = converted
        return overrides

    def _when(self, name: str, raw: dict[Any, Any] | None, earlier: list[Param],
              names: list[str]) -> dict[str, tuple[Any, ...]]:
        if raw is None:
            return {}
        if not raw:
            fail(f"{self.where(f'search.{name}.when')}: expected {{key: [values...]}}, got {{}}")
        by_name = {p.name: p for p in earlier}
        when: dict[str, tuple[Any, ...]] = {}
        for key, allowed in raw.items():
            at = self.where(f"search.{name}.when.{key}")
            if key not in _fields():
                fail(f"{at}: not a trainer key{_did_you_mean(str(key), _fields())}; when tests a "
                     f"fixed trainer key or a choice listed above")
            if key == name:
                fail(f"{at}: a key cannot depend on itself")
            if key in names and key not in by_name:
                fail(f"{at}: {key} is sampled after {name}; list {key} above {name}")
            allowed = allowed if isinstance(allowed, list) else [allowed]
            if not allowed:
                fail(f"{at}: expected at least one value")
            param = by_name.get(key)
            if param is not None and param.kind != "choice":
                fail(f"{at}: {key} is a {param.kind} range; when can only test a choice or a "
                     f"fixed key")
            converted = []
            for item in allowed:
                if isinstance(item, (list, dict)):
                    fail(f"{at}: expected single values, got {_fmt(item)}")
                value = _coerce_field(at, key, item)
                if param is not None and value not in param.values:
                    fail(f"{at}: {_fmt(item)} is not one of {key}'s choices "
                         f"{', '.join(_fmt(v) for v in param.values)}")
                possible = _fields()[key].metadata.get("choices") or ()
                if param is None and possible and value not in possible:
                    fail(f"{at}: {_fmt(item)} is not a possible {key}; expected one of "
                         f"{', '.join(map(str, possible))}")
                converted.append(value)
            when[key] = tuple(converted)
        return when

    def _check_scheduler(self, scheduler: _Scheduler, max_epochs: int) -> None:
        if scheduler.type == "asha" and scheduler.grace_period >= max_epochs:
            fail(f"{self.where('scheduler.grace_period')}: {scheduler.grace_period} must be below "
                 f"the trials' epochs ({max_epochs}), else ASHA never stops a trial; lower it or "
                 f"use type: none")

    def _check_resources(self, resources: _Resources, space: SearchSpace) -> None:
        """A 0-GPU Ray trial still sees every GPU; a reserved GPU the trainer ignores is wasted.
        N workers split each global batch: every batch_size must divide by N."""
        searched, fixed = {p.name: p for p in space.params}, space._fixed_values()
        sizes = searched["batch_size"].values if "batch_size" in searched else (fixed["batch_size"],)
        uneven = [size for size in sizes if isinstance(size, int) and size % resources.workers]
        if uneven:
            fail(f"{self.where('resources.workers')}: {resources.workers} DDP workers split the global "
                 f"batch_size, which must divide by {resources.workers} (got {uneven[0]})")
        if "cpu" in searched:
            return
        where, gpu, on_cpu = self.where("resources.gpu"), resources.gpu, fixed["cpu"]
        if gpu == 0 and not on_cpu:
            fail(f"{where}: 0 GPUs but trainer cpu is false: the trial would still use a "
                 f"visible GPU without reserving it; set trainer cpu: true or give gpu > 0")
        if gpu > 0 and on_cpu:
            fail(f"{where}: {_fmt(gpu)} GPU reserved but trainer cpu is true; set gpu: 0")

    # -- whole trials --
    def _check_trials(self, space: SearchSpace) -> None:
        """Build a TrainConfig for the fixed keys, for every value of every searched key in a
        trial where it is sampled, and for each combination of choices (ranges at low)."""
        try:
            TrainConfig.from_dict(space.trainer, source=self.show).validate(need_data=False)
        except HeaderNetError as exc:
            fail(f"{self._blame(space, {}, str(exc), 'trainer')}: {exc}")
        sampled_any = False
        for sampled, _ in space.combinations(on_param=functools.partial(self._check_values, space)):
            if sampled:
                sampled_any = True
                self._check_shapes(space, sampled)
        if not sampled_any:
            fail(f"{self.where('search')}: no key is ever sampled (every when is false for the "
                 f"fixed keys)")

    def _check_shapes(self, space: SearchSpace, sampled: dict[str, Any]) -> None:
        """One combination as a whole TrainConfig and through the trainer's own backbone-shape
        check (tubelet, patch, CSN minimum size), with each SHAPE_KEYS range also at low + step
        and high."""
        trials = [sampled]
        for param in space.params:
            if param.name in sampled and param.name in SHAPE_KEYS and param.kind == "int":
                edges = {param.low + (param.step or 1), param.high}
                trials += [{**sampled, param.name: value} for value in sorted(edges)]
        for trial in trials:
            shown = _fmt_dict(trial)
            config = _validated(space.trainer_values(trial), f"{self.show}: search: a trial with {shown}")
            try:
                check_geometry(config)
            except HeaderNetError as exc:
                fail(f"{self._blame(space, trial, str(exc))}: {exc}; in a trial with {shown}")

    def _blame(self, space: SearchSpace, trial: dict[str, Any], message: str, otherwise: str = "search") -> str:
        """The field that set the key a trainer message starts with (`--input_size ...`)."""
        named = re.search(r"--(\w+)", message)
        key = named.group(1) if named else ""
        if key in trial:
            return self.where(f"search.{key}")
        for param in space.params:
            if key in param.overrides.get(trial.get(param.name), {}):
                return self.where(f"search.{param.name}.overrides.{_fmt(trial[param.name])}")
        return self.where(f"trainer.{key}" if key in space.trainer else otherwise)

    def _check_values(self, space: SearchSpace, param: Param, sampled: dict[str, Any]) -> None:
        """Each choice value (with its overrides) or both bounds, in a trial that samples it."""
        where = self.where(f"search.{param.name}")
        for value in param.values if param.kind == "choice" else (param.low, param.high):
            try:
                _validated(space.trainer_values({**sampled, param.name: value}), where)
            except HeaderNetError as exc:
                if value not in param.overrides:
                    raise
                # The value alone fails: blame the value; else only its overrides fail.
                _validated({**space.trainer_values(sampled), param.name: value}, where)
                fail(str(exc).replace(where, self.where(
                    f"search.{param.name}.overrides.{_fmt(value)}"), 1))


def _space_dirs(spaces_dir: Path | None) -> list[Path]:
    """`spaces_dir` if given, else the cwd's search_spaces/ and then the repository's."""
    if spaces_dir is not None:
        return [Path(spaces_dir)]
    dirs: list[Path] = []
    for folder in (Path.cwd() / SPACES_DIRNAME, REPO_SPACES_DIR):
        if folder.is_dir() and all(folder.resolve() != d.resolve() for d in dirs):
            dirs.append(folder)
    return dirs or [REPO_SPACES_DIR]


def _show(path: Path) -> str:
    """A path for messages: relative to the cwd where it lies below it (absolute from the
    filesystem's root, where `tmp/x` would read like a typo)."""
    cwd = Path.cwd()
    if path.is_absolute() and cwd.parent != cwd and path.is_relative_to(cwd):
        return str(path.relative_to(cwd))
    return str(path)


@functools.lru_cache(maxsize=1)
def _fields() -> dict[str, dataclasses.Field]:
    """TrainConfig's fields by name (in declaration order)."""
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _field_type(name: str) -> Any:
    """bool | int | float | str | list for a TrainConfig field (Optional unwrapped)."""
    tp, _ = unwrap_optional(field_types()[name])
    return list if typing.get_origin(tp) is list else tp


_MARK = "\x1f"


def _coerce_field(where: str, name: str, value: Any) -> Any:
    """Convert to the field's type like TrainConfig does; errors start with `where`."""
    try:
        return coerce(name, value, field_types()[name], _MARK)
    except HeaderNetError as exc:
        message = str(exc).replace(f"{_MARK}: ", "", 1).removeprefix(f"{name} ")
        fail(f"{where}: {message}")


def _quiet_coerce(name: str, value: Any) -> Any:
    try:
        return coerce(name, value, field_types()[name], _MARK) if name in field_types() else value
    except HeaderNetError:
        return value


def _same_value(name: str, a: Any, b: Any) -> bool:
    return _quiet_coerce(name, a) == _quiet_coerce(name, b)


def _validated(values: Mapping[str, Any], where: str) -> TrainConfig:
    """TrainConfig.from_dict(...).validate(need_data=False), errors prefixed with `where`."""
    try:
        return TrainConfig.from_dict(values, source=where).validate(need_data=False)
    except HeaderNetError as exc:
        message = str(exc)
        fail(message if message.startswith(where) else f"{where}: {message}")


def _statically_off(param: Param, space: SearchSpace) -> bool:
    """A `when` on keys that nothing samples or overrides, and that fails for the fixed keys."""
    moving = {p.name for p in space.params}
    moving |= {k for p in space.params for o in p.overrides.values() for k in o}
    return moving.isdisjoint(param.when) and not param.active(space._fixed_values())


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    options = [str(o) for o in options]
    close = [o for o in options if word and o.startswith(word)] or \
        difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _fmt(value: Any) -> str:
    """A value as a space file spells it (for messages and the space's description)."""
    return format_value(value, 6, None, yaml=True)


def _fmt_dict(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
