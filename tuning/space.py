"""Search spaces: one YAML file per study -> a checked `SearchSpace` -> Optuna define-by-run.

This docstring is the reference for the file format. A space file says which trainer settings
are fixed, which are searched and how, what to optimise, and how much to spend:

    # search_spaces/vmae_full.yaml
    name: vmae_full                 # experiment name (default: the file name); CLI --name overrides
    trainer:                        # fixed TrainConfig keys for every trial
      backbone: vmae
      finetune_mode: full
      epochs: 10
      train_csv: data/splits/train.csv
      val_csv: data/splits/val.csv
    search:                         # searched TrainConfig keys, sampled top to bottom
      vmae_variant:
        choice: [base, large, giant]
        overrides:                  # fixed settings that go with one choice (optional)
          giant: {batch_size: 2, grad_accum: 8, gradient_checkpointing: true}
      lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {finetune_mode: [full, partial]}}
      lr_head: {loguniform: [1.0e-4, 1.0e-2]}
      focal_alpha: {uniform: [0.55, 0.95]}
      unfreeze_blocks: {int: [2, 12], step: 2}
    objective: {metric: val_f1, mode: max}
    budget: {num_samples: 20, max_concurrent: 2, seed: 42, startup_trials: 8}
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}
    resources: {cpu: 4, gpu: 1}
    max_failures: 1
    retrain: {epochs: 30, test_csv: data/splits/test.csv}

Sections. Only `search` is required; defaults in brackets.
  name          experiment folder name [the file name without .yaml]; letters, digits, . _ -
  trainer       TrainConfig keys (headernet_core/config.py) fixed for every trial [none: the
                trainer's defaults]. run_name, resume and overwrite belong to each trial and
                cannot be set here.
  search        TrainConfig keys to search, in sampling order; at least one.
  objective     metric [val_f1]: a validation metric that can pick a trial's best epoch
                (`headernet_core.config.SELECTABLE_METRICS`; the objective is that epoch's value);
                mode [the metric's own direction: max for val_f1/val_auc/..., min for val_loss].
                A mode against a known direction (val_f1 with min) is an error.
  budget        num_samples [20] trials; max_concurrent [1] running at once; seed [42] of the
                TPE sampler (the trainer's own `seed` stays a trainer key: same init per trial);
                startup_trials [10]: TPE samples at random until this many trials have ended
                (Optuna's n_startup_trials), then from its model of the results so far.
  scheduler     type: asha | none [none: every trial runs all its epochs]. With asha:
                grace_period [1] epochs before the first cut (>= 1 and below the epochs of
                the longest trial) and reduction_factor [2] (> 1): 1/rf of the trials go on at
                each rung. Other keys stay allowed with type none, so
                `--set scheduler.type=none` switches ASHA off.
  resources     per trial: cpu [1] (>= 1; count the data-loader workers), gpu [1] (0, a
                fraction in (0, 1) to share a GPU, or a whole number). gpu 0 needs
                `trainer: {cpu: true}` and gpu > 0 forbids it: a 0-GPU Ray trial still sees
                every GPU, and a reserved GPU that the trainer ignores is wasted.
  max_failures  retries of a failed trial from its last checkpoint [0].
  retrain       [none] after the search finishes, train the best trial's config again as
                `<search>/final/` and score it once on a held-out test CSV (tuning/retrain.py):
                epochs (>= 1), test_csv [none: no test], train_on_val [false]. The CLI's
                --retrain_best N / --test_csv set or override it (--retrain_best 0: skip).
  demo_data     a folder [none]: when the trainer's train_csv/val_csv are missing, the demo
                dataset (headernet_core.demo_data) is generated there and split into
                <folder>/splits/{train,val}.csv first. For the demo space only.

Distributions (exactly one per searched key):
  {loguniform: [low, high]}               float, log scale, 0 < low < high
  {uniform: [low, high], step: s}         float, linear; optional step (high - low a multiple of s)
  {int: [low, high], step: s, log: true}  integer, high included; optional step or log (not both)
  {choice: [v1, v2, ...]}                 one of the values (single values, no lists);
                                          values are converted to the trainer's type
                                          (neg_pos_ratio [3, 5] samples "3", "5")
Numbers may be written 1e-4 (YAML reads that as text; it is converted). Whole-number trainer
keys (epochs, batch_size, ...) need `int`; on/off and text keys need `choice`.

`when: {key: [values...]}` (or `{key: value}`; several keys must all hold): the key is sampled
only when the trial's value of `key` is one of the values; otherwise it is absent from the
trial config and the trainer's own default applies (frozen trials get no lr_backbone). `key`
is a fixed `trainer:` key, a key left at its TrainConfig default, or a `choice` key listed
ABOVE; its value at that point includes earlier choices' overrides. A `when` that can never
hold is allowed (a `--set finetune_mode=frozen` switches lr_backbone off), but at least one
key must be sampled.

`overrides: {choice value: {trainer key: value}}` on a choice: fixed settings applied when that
value is drawn (giant: smaller batch). They win over `trainer:`; a later choice's overrides win
over an earlier one's; they cannot set a searched key.

`--set` (CLI, repeatable), applied to the file before any check:
  key=value             a trainer key; if the key is searched, its search is replaced by the
                        fixed value (a choice's overrides for that value come along; other
                        --set win over them)
  section.key=value     objective/budget/scheduler/resources (budget.num_samples=4,
                        scheduler.grace_period=1, resources.gpu=0.5, objective.metric=val_auc:
                        a new metric takes its own direction unless objective.mode is set too);
                        trainer.key=value is the long form of key=value
  search.key=MAPPING    replace or add a searched key: search.lr_head='{loguniform: [1e-4, 1e-2]}'
  name=..., max_failures=...
Values are read with yaml.safe_load (1e-4, true, [1, 2], {a: 1}). `--num_samples` and
`--max_concurrent` override the budget last.

Checks: everything is checked at load time; a problem is one `HeaderNetError` line naming the
file and the field (and "(from --set)" where the value came from the command line). Every
choice value and both bounds of a range are checked by building a TrainConfig with them (in a
trial where that key is sampled), and every combination of choices (up to 1000, numeric keys
at their low bound) is checked as a whole, so a trial cannot fail on a setting the file made.
Data files are not opened here.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml

from headernet_core.config import (SELECTABLE_METRICS, TrainConfig, coerce, fields_with_role, format_value,
                                   load_yaml_mapping)
from headernet_core.errors import HeaderNetError, fail
from headernet_core.metrics import reported_metrics
from headernet_core.paths import MAX_NAME_LEN

SPACES_DIRNAME = "search_spaces"
REPO_SPACES_DIR = Path(__file__).resolve().parents[1] / SPACES_DIRNAME

SECTIONS = ("name", "trainer", "search", "objective", "budget", "scheduler", "resources",
            "max_failures", "retrain", "demo_data")
MAPPING_SECTIONS = ("trainer", "search", "objective", "budget", "scheduler", "resources", "retrain")
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "objective": ("metric", "mode"),
    "budget": ("num_samples", "max_concurrent", "seed", "startup_trials"),
    "scheduler": ("type", "grace_period", "reduction_factor"),
    "resources": ("cpu", "gpu"),
    "retrain": ("epochs", "test_csv", "train_on_val"),
}
DEFAULTS: dict[str, Any] = {
    "metric": "val_f1",
    "num_samples": 20, "max_concurrent": 1, "seed": 42, "startup_trials": 10,
    "scheduler": "none", "grace_period": 1, "reduction_factor": 2.0,
    "cpu": 1.0, "gpu": 1.0,
    "max_failures": 0,
}
SCHEDULERS = ("asha", "none")

KINDS = ("loguniform", "uniform", "int", "choice")
# Keys a param spec may hold besides its distribution.
PARAM_OPTIONS: dict[str, tuple[str, ...]] = {
    "loguniform": ("when",),
    "uniform": ("step", "when"),
    "int": ("step", "log", "when"),
    "choice": ("overrides", "when"),
}
# Set per trial by the trial function; fixing them in a space would make trials collide. The
# runs' root is a path a space may choose (the search's storage), not its trial's to own.
TRIAL_OWNED = tuple(key for key in fields_with_role("run") if key not in fields_with_role("path"))
# Text settings that hold a number and so may take a numeric distribution.
NUMERIC_TEXT = ("neg_pos_ratio",)
# How many combinations of choice values are checked as whole trial configs.
MAX_COMBINATIONS = 1000

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1,
                                     log=self.log)
        if self.kind == "loguniform":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step)

    def describe(self) -> str:
        if self.kind == "choice":
            text = f"{self.name}: choice {' | '.join(_fmt(v) for v in self.values)}"
            if self.overrides:
                text += "  (" + "; ".join(f"{_fmt(v)}: {_fmt_dict(o)}"
                                          for v, o in self.overrides.items()) + ")"
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
    resources: dict[str, float]         # {"cpu": float, "gpu": float}
    max_failures: int
    demo_data: str | None = None        # generate the demo dataset here when its CSVs are missing
    startup_trials: int = DEFAULTS["startup_trials"]    # TPE's random start-up trials
    retrain: dict[str, Any] = field(default_factory=dict)   # {} | {"epochs": int,
                                        #  "test_csv": str | None, "train_on_val": bool}

    def define_by_run(self, trial: Any) -> None:
        """Optuna define-by-run: sample the params in order, skipping those whose `when`
        fails. Pass the bound method (`space.define_by_run`) to OptunaSearch(space=...)."""
        current = self._fixed_values()
        for param in self.params:
            if not param.active(current):
                continue
            value = param.suggest(trial)
            current.update(param.overrides.get(value, {}))
            current[param.name] = value
        return None

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
        values = self.trainer_values(sampled)
        where = f"{_show(self.path)}: trial {_fmt_dict(dict(sampled))}"
        return _validated(values, where)

    def max_epochs(self) -> int:
        """The most epochs any trial can run (ASHA's max_t)."""
        return _max_epochs(self.trainer, self.params)

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
        lines.append(f"  objective: {self.mode}imize {self.metric}")
        retries = (f", a failed trial is retried up to {self.max_failures}x"
                   if self.max_failures else "")
        lines.append(f"  budget:    {self.num_samples} trials, {self.max_concurrent} at a time, "
                     f"sampler seed {self.seed}, TPE after {self.startup_trials} random "
                     f"trials{retries}")
        if self.scheduler["type"] == "asha":
            lines.append(f"  scheduler: ASHA, first cut after {self.scheduler['grace_period']} "
                         f"epochs, 1/{_fmt(self.scheduler['reduction_factor'])} go on at each rung "
                         f"(max {self.max_epochs()} epochs)")
        else:
            lines.append(f"  scheduler: none (every trial runs all {self.max_epochs()} epochs)")
        lines.append(f"  resources: {_fmt(self.resources['cpu'])} CPU + "
                     f"{_fmt(self.resources['gpu'])} GPU per trial")
        if self.retrain:
            test = self.retrain.get("test_csv")
            lines.append(f"  retrain:   the best config for {self.retrain['epochs']} epochs"
                         f"{' on train + val' if self.retrain.get('train_on_val') else ''}"
                         f"{f', then test on {_show(Path(test))}' if test else ''}")
        return "\n".join(lines)

    def _fixed_values(self) -> dict[str, Any]:
        return {**_trainer_defaults(), **self.trainer}


# --- finding and loading --------------------------------------------------------------------
def find_space_file(name_or_path: str, spaces_dir: Path | None = None) -> Path:
    """An existing file as given; else `<dir>/<name>[.yaml|.yml]` in `spaces_dir`, or in the
    cwd's search_spaces/ and then the repository's."""
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given
    dirs = [Path(spaces_dir)] if spaces_dir is not None else _default_dirs()
    if len(given.parts) == 1:
        for folder in dirs:
            for candidate in (folder / given.name, folder / f"{given.name}.yaml",
                              folder / f"{given.name}.yml"):
                if candidate.is_file():
                    return candidate
    available = available_spaces(spaces_dir)
    listed = ", ".join(available) if available else "none"
    where = " or ".join(_show(d) + "/" for d in dirs) or f"{SPACES_DIRNAME}/"
    fail(f"search space {name_or_path!r} not found: not a file, and no such name in {where} "
         f"(available: {listed})")


def available_spaces(spaces_dir: Path | None = None) -> list[str]:
    """Names of the space files that `find_space_file` can find by name."""
    dirs = [Path(spaces_dir)] if spaces_dir is not None else _default_dirs()
    names = {p.stem for d in dirs if d.is_dir() for p in d.iterdir()
             if p.suffix in (".yaml", ".yml") and p.is_file()}
    return sorted(names)


def load_space(name_or_path: str, *, sets: Sequence[str] = (), num_samples: int | None = None,
               max_concurrent: int | None = None, spaces_dir: Path | None = None) -> SearchSpace:
    """Read, apply `--set` strings and CLI budget overrides, check everything, return the space."""
    path = find_space_file(name_or_path, spaces_dir)
    data = load_yaml_mapping(path)
    return _Loader(path).load(data, sets, num_samples, max_concurrent)


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
        unknown = [k for k in data if k not in SECTIONS]
        if unknown:
            hint = _did_you_mean(str(unknown[0]), SECTIONS)
            fail(f"{self.show}: {unknown[0]}: unknown section{hint}; expected "
                 f"{', '.join(SECTIONS)}")
        for section in MAPPING_SECTIONS:
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

        name = self._name(data.get("name"))
        trainer = self._trainer(data["trainer"])
        params = self._params(data["search"], trainer)
        metric, mode = self._objective(data["objective"])
        budget = self._budget(data["budget"])
        scheduler = self._scheduler(data["scheduler"], _max_epochs(trainer, params))
        resources = self._resources(data["resources"], trainer, params)
        max_failures = self._int("max_failures", data.get("max_failures", DEFAULTS["max_failures"]),
                                 minimum=0)
        retrain = self._retrain(data["retrain"])
        demo_data = data.get("demo_data")
        if demo_data is not None and (not isinstance(demo_data, str) or not demo_data):
            fail(f"{self.where('demo_data')}: expected a folder path, got {_fmt(demo_data)}")
        space = SearchSpace(name=name, path=self.path, trainer=trainer, params=params,
                            metric=metric, mode=mode, scheduler=scheduler, resources=resources,
                            max_failures=max_failures, demo_data=demo_data, retrain=retrain,
                            **budget)
        self._check_trials(space)
        return space

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
        fixed: dict[str, Any] = {}                      # trainer keys, applied last
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
                            carried.update({k: (v, label) for k, v in extra.items()})
                fixed[name] = value
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
        for key, (value, label) in carried.items():
            data["trainer"][key] = value
            self.origins[f"trainer.{key}"] = f"{label}, an override of that choice"
        for key, value in fixed.items():
            data["trainer"][key] = value
            self.origins[f"trainer.{key}"] = "--set"

    # -- sections --
    def _name(self, value: Any) -> str:
        if value is None:
            value = self.path.stem
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not _NAME_RE.fullmatch(value) or len(value) > MAX_NAME_LEN:
            fail(f"{self.where('name')}: expected a folder name of letters, digits, '.', '_' "
                 f"or '-' (at most {MAX_NAME_LEN} characters), got {_fmt(value)}")
        return value

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

    def _params(self, raw: dict[str, Any], trainer: dict[str, Any]) -> tuple[Param, ...]:
        if not raw:
            fail(f"{self.where('search')}: nothing to search; add at least one key, e.g. "
                 f"lr_head: {{loguniform: [1.0e-4, 1.0e-2]}}")
        names = list(raw)
        params: list[Param] = []
        for name in names:
            where = self.where(f"search.{name}")
            self._check_key(where, name)
            if name in trainer:
                fail(f"{where}: also fixed in trainer: (keep it in one place; --set {name}=... "
                     f"fixes a searched key)")
            params.append(self._param(name, raw[name], params, names))
        return tuple(params)

    def _param(self, name: str, spec: dict[str, Any], earlier: list[Param],
               names: list[str]) -> Param:
        where = self.where(f"search.{name}")
        kinds = [k for k in spec if k in KINDS]
        extra = [k for k in spec if k not in KINDS]
        if not kinds:
            bad = next((k for k in extra if k not in ("when", "overrides", "step", "log")), None)
            if bad is not None:
                fail(f"{where}: unknown distribution {bad}{_did_you_mean(str(bad), KINDS)}; "
                     f"expected one of {', '.join(KINDS)}")
            fail(f"{where}: no distribution; give one of {', '.join(KINDS)}")
        if len(kinds) > 1:
            fail(f"{where}: more than one distribution ({', '.join(kinds)}); give exactly one")
        kind = kinds[0]
        for key in extra:
            if key not in PARAM_OPTIONS[kind]:
                allowed = ", ".join(PARAM_OPTIONS[kind])
                hint = _did_you_mean(str(key), (*KINDS, *PARAM_OPTIONS[kind]))
                if key not in ("when", "overrides", "step", "log"):
                    fail(f"{where}: unknown key {key}{hint} (a {kind} takes {allowed})")
                fail(f"{where}: {key} does not go with {kind} (a {kind} takes {allowed})")
        self._check_kind_fits(where, name, kind)
        if kind == "choice":
            values = self._choice_values(where, name, spec["choice"])
            overrides = self._overrides(where, name, spec.get("overrides"), values, names)
            param_kw: dict[str, Any] = {"values": values, "overrides": overrides}
        else:
            param_kw = self._range(where, kind, spec)
        when = self._when(where, name, spec.get("when"), earlier, names)
        return Param(name=name, kind=kind, when=when, **param_kw)

    def _check_kind_fits(self, where: str, name: str, kind: str) -> None:
        ftype = _field_type(name)
        if ftype is list:
            fail(f"{where}: {name} is a list setting and cannot be searched (search choices are "
                 f"single values); fix it under trainer:")
        if kind == "choice":
            return
        numeric_text = ftype is str and name in NUMERIC_TEXT
        if ftype is bool or (ftype is str and not numeric_text):
            fail(f"{where}: {name} is not a number; search it with choice: [...]")
        if ftype is int and kind != "int":
            fail(f"{where}: {name} takes whole numbers; use int: [low, high] instead of {kind}")

    def _range(self, where: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        bounds = spec[kind]
        if not isinstance(bounds, list) or len(bounds) != 2:
            fail(f"{where}: {kind} expects [low, high], got {_fmt(bounds)}")
        integer = kind == "int"
        low = _number(f"{where}: low", bounds[0], integer=integer)
        high = _number(f"{where}: high", bounds[1], integer=integer)
        if not low < high:
            fail(f"{where}: low {_fmt(low)} must be < high {_fmt(high)}")
        log = kind == "loguniform"
        if kind == "int" and "log" in spec:
            if not isinstance(spec["log"], bool):
                fail(f"{where}: log must be true or false, got {_fmt(spec['log'])}")
            log = spec["log"]
        if log and not low > 0:
            fail(f"{where}: a log scale needs low > 0, got low {_fmt(low)}")
        step = None
        if spec.get("step") is not None:
            step = _number(f"{where}: step", spec["step"], integer=integer)
            if not step > 0:
                fail(f"{where}: step must be > 0, got {_fmt(step)}")
            if log and step != 1:
                fail(f"{where}: step and log cannot be combined (Optuna samples a log-scale int "
                     f"with step 1)")
            spans = (high - low) / step
            if abs(spans - round(spans)) > 1e-9 * max(1.0, abs(spans)):
                fail(f"{where}: high - low ({_fmt(high - low)}) must be a multiple of step "
                     f"{_fmt(step)} so that high can be drawn")
        return {"low": low, "high": high, "step": step, "log": log and kind == "int"}

    def _choice_values(self, where: str, name: str, raw: Any) -> tuple[Any, ...]:
        if not isinstance(raw, list) or not raw:
            fail(f"{where}: choice expects a non-empty list of values, got {_fmt(raw)}")
        values: list[Any] = []
        for item in raw:
            if isinstance(item, (list, dict)):
                fail(f"{where}: choice values must be single values (numbers, text, true/false, "
                     f"null), got {_fmt(item)}")
            value = _coerce_field(where, name, item)
            if value in values:
                fail(f"{where}: choice value {_fmt(item)} appears twice (as {_fmt(value)})")
            values.append(value)
        return tuple(values)

    def _overrides(self, where: str, name: str, raw: Any, values: tuple[Any, ...],
                   names: list[str]) -> dict[Any, dict[str, Any]]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            fail(f"{self.where(f'search.{name}.overrides')}: expected "
                 f"{{choice value: {{trainer key: value}}}}, "
                 f"got {_fmt(raw)}")
        overrides: dict[Any, dict[str, Any]] = {}
        for choice, settings in raw.items():
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

    def _when(self, where: str, name: str, raw: Any, earlier: list[Param],
              names: list[str]) -> dict[str, tuple[Any, ...]]:
        if raw is None:
            return {}
        here = self.where(f"search.{name}.when")
        if not isinstance(raw, dict) or not raw:
            fail(f"{here}: expected {{key: [values...]}}, got {_fmt(raw)}")
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
                possible = _field_choices(key)
                if param is None and possible and value not in possible:
                    fail(f"{at}: {_fmt(item)} is not a possible {key}; expected one of "
                         f"{', '.join(map(str, possible))}")
                converted.append(value)
            when[key] = tuple(converted)
        return when

    def _objective(self, raw: dict[str, Any]) -> tuple[str, str]:
        self._known_keys("objective", raw)
        metric = raw.get("metric", DEFAULTS["metric"])
        where = self.where("objective.metric")
        if not isinstance(metric, str):
            fail(f"{where}: expected a metric name such as val_f1, got {_fmt(metric)}")
        if metric not in SELECTABLE_METRICS:
            # A trial's objective is its best epoch's value, and the trainer picks that epoch by
            # this metric: only validation metrics with a direction can do that.
            choices = list(SELECTABLE_METRICS)
            known = metric in reported_metrics()
            fail(f"{where}: {metric} " + ("is reported but cannot pick a trial's best epoch"
                                          if known else "is not a metric the trainer reports")
                 + f"{'' if known else _did_you_mean(metric, choices)}; choose one of {', '.join(choices)}")
        natural = SELECTABLE_METRICS[metric]
        mode = raw.get("mode", natural)
        where = self.where("objective.mode")
        if mode not in ("max", "min"):
            fail(f"{where}: expected max or min, got {_fmt(mode)}")
        if mode != natural:
            better = "higher" if natural == "max" else "lower"
            fail(f"{where}: {mode} would look for the worst {metric} ({better} is better); "
                 f"use {natural}")
        return metric, mode

    def _budget(self, raw: dict[str, Any]) -> dict[str, int]:
        self._known_keys("budget", raw)
        return {
            "num_samples": self._int("budget.num_samples",
                                     raw.get("num_samples", DEFAULTS["num_samples"]), minimum=1),
            "max_concurrent": self._int("budget.max_concurrent",
                                        raw.get("max_concurrent", DEFAULTS["max_concurrent"]),
                                        minimum=1),
            "seed": self._int("budget.seed", raw.get("seed", DEFAULTS["seed"]), minimum=0,
                              maximum=2**32 - 1),
            "startup_trials": self._int("budget.startup_trials",
                                        raw.get("startup_trials", DEFAULTS["startup_trials"]),
                                        minimum=0),
        }

    def _retrain(self, raw: dict[str, Any]) -> dict[str, Any]:
        """{} (no retrain) or {"epochs", "test_csv", "train_on_val"}; an `epochs` of 0 is off."""
        self._known_keys("retrain", raw)
        if not raw:
            return {}
        epochs = self._int("retrain.epochs", raw.get("epochs"), minimum=0)
        test_csv = raw.get("test_csv")
        if test_csv is not None and (not isinstance(test_csv, str) or not test_csv):
            fail(f"{self.where('retrain.test_csv')}: expected a CSV path, got {_fmt(test_csv)}")
        train_on_val = raw.get("train_on_val", False)
        if not isinstance(train_on_val, bool):
            fail(f"{self.where('retrain.train_on_val')}: expected true or false, got "
                 f"{_fmt(train_on_val)}")
        if epochs == 0:
            return {}
        return {"epochs": epochs, "test_csv": test_csv, "train_on_val": train_on_val}

    def _scheduler(self, raw: dict[str, Any], max_epochs: int) -> dict[str, Any]:
        self._known_keys("scheduler", raw)
        kind = raw.get("type", DEFAULTS["scheduler"])
        if kind not in SCHEDULERS:
            fail(f"{self.where('scheduler.type')}: expected {' or '.join(SCHEDULERS)}, "
                 f"got {_fmt(kind)}")
        if kind == "none":
            return {"type": "none"}
        grace = self._int("scheduler.grace_period",
                          raw.get("grace_period", DEFAULTS["grace_period"]), minimum=1)
        if grace >= max_epochs:
            fail(f"{self.where('scheduler.grace_period')}: {grace} must be below the trials' "
                 f"epochs ({max_epochs}), else ASHA never stops a trial; lower it or use "
                 f"type: none")
        where = self.where("scheduler.reduction_factor")
        factor = float(_number(where, raw.get("reduction_factor", DEFAULTS["reduction_factor"])))
        if not factor > 1:
            fail(f"{where}: must be > 1, got {_fmt(factor)}")
        return {"type": "asha", "grace_period": grace, "reduction_factor": factor}

    def _resources(self, raw: dict[str, Any], trainer: dict[str, Any],
                   params: tuple[Param, ...]) -> dict[str, float]:
        self._known_keys("resources", raw)
        where = self.where("resources.cpu")
        cpu = float(_number(where, raw.get("cpu", DEFAULTS["cpu"])))
        if cpu < 1:
            fail(f"{where}: a trial needs at least 1 CPU, got {_fmt(cpu)}")
        where = self.where("resources.gpu")
        gpu = float(_number(where, raw.get("gpu", DEFAULTS["gpu"])))
        if gpu < 0 or (gpu > 1 and not gpu.is_integer()):
            fail(f"{where}: expected 0, a fraction in (0, 1) or a whole number of GPUs, "
                 f"got {_fmt(gpu)}")
        if "cpu" not in {p.name for p in params}:
            on_cpu = trainer.get("cpu", _trainer_defaults()["cpu"])
            if gpu == 0 and not on_cpu:
                fail(f"{where}: 0 GPUs but trainer cpu is false: the trial would still use a "
                     f"visible GPU without reserving it; set trainer cpu: true or give gpu > 0")
            if gpu > 0 and on_cpu:
                fail(f"{where}: {_fmt(gpu)} GPU reserved but trainer cpu is true; set gpu: 0")
        return {"cpu": cpu, "gpu": gpu}

    def _known_keys(self, section: str, raw: dict[str, Any]) -> None:
        for key in raw:
            if key not in SECTION_KEYS[section]:
                fail(f"{self.where(f'{section}.{key}')}: unknown key"
                     f"{_did_you_mean(str(key), SECTION_KEYS[section])}; expected "
                     f"{', '.join(SECTION_KEYS[section])}")

    def _int(self, field_path: str, value: Any, *, minimum: int,
             maximum: int | None = None) -> int:
        where = self.where(field_path)
        number = _number(where, value, integer=True)
        if number < minimum or (maximum is not None and number > maximum):
            limit = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            fail(f"{where}: must be {limit}, got {number}")
        return number

    # -- whole trials --
    def _check_trials(self, space: SearchSpace) -> None:
        """Build a TrainConfig for the fixed keys, for every value of every searched key in a
        trial where it is sampled, and for each combination of choices (ranges at low)."""
        try:
            TrainConfig.from_dict(space.trainer, source=self.show).validate(need_data=False)
        except HeaderNetError as exc:             # name the fixed key the message is about
            named = re.search(r"--(\w+)", str(exc))
            key = named.group(1) if named and named.group(1) in space.trainer else None
            fail(f"{self.where(f'trainer.{key}' if key else 'trainer')}: {exc}")
        checked: set[str] = set()

        def check_values(param: Param, sampled: dict[str, Any]) -> None:
            checked.add(param.name)
            self._check_values(space, param, sampled)

        for sampled, _ in space.combinations(on_param=check_values):
            if sampled:
                _validated(space.trainer_values(sampled),
                           f"{self.show}: search: a trial with {_fmt_dict(sampled)}")
        if not checked:
            fail(f"{self.where('search')}: no key is ever sampled (every when is false for the "
                 f"fixed keys)")

    def _check_values(self, space: SearchSpace, param: Param, sampled: dict[str, Any]) -> None:
        """Each choice value (with its overrides) or both bounds, in a trial that samples it."""
        where = self.where(f"search.{param.name}")
        values = param.values if param.kind == "choice" else (param.low, param.high)
        for value in values:
            try:
                _validated(space.trainer_values({**sampled, param.name: value}), where)
            except HeaderNetError as exc:
                if value not in param.overrides:
                    raise
                # The value alone fails: blame the value; else only its overrides fail.
                _validated({**space.trainer_values(sampled), param.name: value}, where)
                fail(str(exc).replace(where, self.where(
                    f"search.{param.name}.overrides.{_fmt(value)}"), 1))


# --- helpers --------------------------------------------------------------------------------
def _default_dirs() -> list[Path]:
    dirs: list[Path] = []
    for folder in (Path.cwd() / SPACES_DIRNAME, REPO_SPACES_DIR):
        if folder.is_dir() and all(folder.resolve() != d.resolve() for d in dirs):
            dirs.append(folder)
    return dirs or [REPO_SPACES_DIR]


def _show(path: Path) -> str:
    """A path for messages: relative to the cwd where it lies below it (absolute from the
    filesystem's root, where `tmp/x` would read like a typo)."""
    if path.is_absolute() and Path.cwd().parent != Path.cwd():
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return str(path)
    return str(path)


@functools.lru_cache(maxsize=1)
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


@functools.lru_cache(maxsize=1)
def _fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


@functools.lru_cache(maxsize=1)
def _defaults_cached() -> tuple[tuple[str, Any], ...]:
    return tuple(TrainConfig().to_dict().items())


def _trainer_defaults() -> dict[str, Any]:
    return {key: (list(v) if isinstance(v, list) else v) for key, v in _defaults_cached()}


def _field_type(name: str) -> Any:
    """bool | int | float | str | list for a TrainConfig field (Optional unwrapped)."""
    tp = _hints()[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return list if typing.get_origin(tp) is list else tp


def _field_choices(name: str) -> tuple[Any, ...]:
    for f in dataclasses.fields(TrainConfig):
        if f.name == name:
            return tuple(f.metadata.get("choices") or ())
    return ()


_MARK = "\x1f"


def _coerce_field(where: str, name: str, value: Any) -> Any:
    """Convert to the field's type like TrainConfig does; errors start with `where`."""
    try:
        return coerce(name, value, _hints()[name], _MARK)
    except HeaderNetError as exc:
        message = str(exc).replace(f"{_MARK}: ", "", 1)
        if message.startswith(f"{name} "):
            message = message[len(name) + 1:]
        fail(f"{where}: {message}")


def _quiet_coerce(name: str, value: Any) -> Any:
    try:
        return coerce(name, value, _hints()[name], _MARK) if name in _hints() else value
    except HeaderNetError:
        return value


def _same_value(name: str, a: Any, b: Any) -> bool:
    if name not in _hints():
        return a == b
    return _quiet_coerce(name, a) == _quiet_coerce(name, b)


def _validated(values: Mapping[str, Any], where: str) -> TrainConfig:
    """TrainConfig.from_dict(...).validate(need_data=False), errors prefixed with `where`."""
    try:
        return TrainConfig.from_dict(values, source=where).validate(need_data=False)
    except HeaderNetError as exc:
        message = str(exc)
        fail(message if message.startswith(where) else f"{where}: {message}")


def _number(where: str, value: Any, *, integer: bool = False) -> float | int:
    """A YAML number (or text like '1e-4'); `integer` asks for a whole number."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if (isinstance(number, bool) or not isinstance(number, (int, float))
            or not math.isfinite(number)):
        fail(f"{where}: expected {'a whole number' if integer else 'a number'}, got {_fmt(value)}")
    if integer:
        if not float(number).is_integer():
            fail(f"{where}: expected a whole number, got {_fmt(value)}")
        return int(number)
    return number


def _max_epochs(trainer: Mapping[str, Any], params: Sequence[Param]) -> int:
    candidates = [trainer.get("epochs", _trainer_defaults()["epochs"])]
    for param in params:
        candidates += [o["epochs"] for o in param.overrides.values() if "epochs" in o]
        if param.name == "epochs":
            candidates += list(param.values) if param.kind == "choice" else [param.high]
    return int(max(candidates))


def _statically_off(param: Param, space: SearchSpace) -> bool:
    """A `when` on keys that nothing samples or overrides, and that fails for the fixed keys."""
    moving = {p.name for p in space.params}
    moving |= {k for p in space.params for o in p.overrides.values() for k in o}
    if any(key in moving for key in param.when):
        return False
    return not param.active(space._fixed_values())


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    options = [str(o) for o in options]
    close = [o for o in options if word and o.startswith(word)] or \
        difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _fmt(value: Any) -> str:
    """A value as a space file spells it (for messages and the space's description)."""
    return format_value(value, 6, None, yaml=True)


def _fmt_dict(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
