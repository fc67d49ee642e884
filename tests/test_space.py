"""Search spaces: the shipped files, define-by-run sampling (conditions, overrides, seeding,
pickling), `--set` and CLI overrides, finding files, and every bad input in one table."""
from __future__ import annotations

import dataclasses
import pickle
import textwrap
from pathlib import Path

import optuna
import pytest

import tuning.space as space_mod
from headernet_core.config import SELECTABLE_METRICS, TrainConfig
from headernet_core.errors import HeaderNetError
from headernet_core.metrics import reported_metrics
from tuning.space import Param, SearchSpace, find_space_file, load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = ("csn_full", "csn_ig65m", "demo", "vmae_frozen", "vmae_full", "vmae_imbalance",
           "vmae_pareto")
# vmae_full's recipe priors, for FixedTrials of it (layer_decay, drop_path: only a training backbone)
VMAE_RECIPE = {"layer_decay": 0.75, "drop_path": 0.1, "weight_decay": 0.05, "model_ema": False}
FROZEN_RECIPE = {"weight_decay": 0.05, "model_ema": False}


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str, **kwargs) -> SearchSpace:
    return load_space(str(write(tmp_path, text)), **kwargs)


def sample(space: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    """Ask a real in-memory study n times through define_by_run, as OptunaSearch does."""
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    out = []
    for i in range(n):
        trial = study.ask()
        assert space.define_by_run(trial) is None
        out.append(dict(trial.params))
        study.tell(trial, float(i))
    return out


# --- shipped files --------------------------------------------------------------------------
def test_shipped_spaces_are_exactly_these():
    assert space_mod.available_spaces(space_mod.REPO_SPACES_DIR) == sorted(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_loads_samples_and_builds_valid_configs(name):
    space = load_space(name)
    assert space.name == name
    assert space.path.name == f"{name}.yaml"
    names = {p.name for p in space.params}
    for sampled in sample(space, 5):
        assert set(sampled) <= names
        config = space.trial_config(sampled)
        assert isinstance(config, TrainConfig)
        for key, value in sampled.items():
            assert getattr(config, key) == value
        for key, value in space.trainer.items():
            if not any(key in o for p in space.params for o in p.overrides.values()):
                assert getattr(config, key) == value
    text = space.describe()
    assert name in text and all(p.name in text for p in space.params)


def test_shipped_space_details():
    demo = load_space("demo")
    assert demo.resources == {"cpu": 1.0, "gpu": 0.0}
    assert (demo.num_samples, demo.max_concurrent, demo.seed, demo.max_failures) == (8, 2, 0, 1)
    assert demo.startup_trials < demo.num_samples    # the demo reaches TPE's model
    assert demo.scheduler == {"type": "asha", "grace_period": 1, "reduction_factor": 2.0}
    assert [p.name for p in demo.params] == ["backbone", "lr_backbone", "lr_head"]
    assert demo.trainer["cpu"] is True and demo.trainer["vmae_variant"] == "tiny"
    frozen = load_space("vmae_frozen")
    assert "lr_backbone" not in {p.name for p in frozen.params}
    assert frozen.trainer["finetune_mode"] == "frozen"
    imbalance = load_space("vmae_imbalance")
    ratio = next(p for p in imbalance.params if p.name == "neg_pos_ratio")
    assert ratio.values == ("3", "5", "8", "10", "15", "20")  # TrainConfig stores text
    config = imbalance.trial_config({"focal_alpha": 0.6, "focal_gamma": 2.0, "neg_pos_ratio": "8"})
    assert (config.neg_pos_ratio, config.loss, config.focal_alpha) == ("8", "focal", 0.6)
    assert load_space("csn_full").trainer["csn_variant"] == "50"


def test_the_format_reference_example_loads(tmp_path):
    doc = (Path(__file__).parents[1] / "docs" / "search_spaces.md").read_text()
    block = doc.split("```yaml\n# search_spaces/vmae_full.yaml\n")[1].split("```")[0]
    path = write(tmp_path, block, "example.yaml")
    space = load_space(str(path))
    assert [p.name for p in space.params] == ["vmae_variant", "lr_backbone", "lr_head",
                                              "focal_alpha", "unfreeze_blocks"]


# --- define-by-run ---------------------------------------------------------------------------
def test_overrides_follow_the_sampled_choice():
    space = load_space("vmae_full")
    trial = optuna.trial.FixedTrial({"vmae_variant": "giant", "lr_backbone": 3e-5, "lr_head": 1e-3,
                                     **VMAE_RECIPE})
    space.define_by_run(trial)
    giant = space.trial_config(trial.params)
    assert (giant.vmae_variant, giant.batch_size, giant.grad_accum) == ("giant", 2, 8)
    assert giant.gradient_checkpointing is True and giant.lr_backbone == 3e-5
    base = space.trial_config({"vmae_variant": "base", "lr_backbone": 3e-5, "lr_head": 1e-3})
    assert (base.batch_size, base.grad_accum, base.gradient_checkpointing) == (16, 1, False)


def test_condition_on_a_fixed_key_drops_the_param():
    space = load_space("vmae_full", sets=["finetune_mode=frozen"])
    # FixedTrial raises if asked for a key it does not hold: lr_backbone is never asked.
    space.define_by_run(optuna.trial.FixedTrial({"vmae_variant": "base", "lr_head": 1e-3,
                                                 **FROZEN_RECIPE}))
    assert all("lr_backbone" not in s for s in sample(space, 4))
    assert space.trial_config({"vmae_variant": "base", "lr_head": 1e-3}).lr_backbone is None
    assert "never sampled here (when is false): lr_backbone" in space.describe()


def test_condition_on_an_earlier_choice(tmp_path):
    space = load_text(tmp_path, """
        trainer: {epochs: 4, cpu: true}
        resources: {gpu: 0}
        search:
          finetune_mode: {choice: [frozen, full]}
          lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {finetune_mode: [full]}}
          lr_head: {loguniform: [1.0e-4, 1.0e-2]}
        """)
    seen = sample(space, 16)
    assert {s["finetune_mode"] for s in seen} == {"frozen", "full"}
    for s in seen:
        assert ("lr_backbone" in s) == (s["finetune_mode"] == "full")
        assert space.trial_config(s).finetune_mode == s["finetune_mode"]


def test_condition_sees_an_earlier_choices_overrides_and_scalar_when(tmp_path):
    space = load_text(tmp_path, """
        trainer: {epochs: 4, cpu: true}
        resources: {gpu: 0}
        search:
          vmae_variant:
            choice: [base, giant]
            overrides: {giant: {finetune_mode: frozen}}
          lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {finetune_mode: full}}
        """)
    for s in sample(space, 12):
        assert ("lr_backbone" in s) == (s["vmae_variant"] == "base")
    assert space.trial_config({"vmae_variant": "giant"}).finetune_mode == "frozen"


def test_int_step_log_and_uniform_step(tmp_path):
    space = load_text(tmp_path, """
        trainer: {epochs: 4, cpu: true, finetune_mode: partial}
        resources: {gpu: 0}
        search:
          unfreeze_blocks: {int: [2, 12], step: 2}
          batch_size: {int: [1, 16], log: true}
          focal_alpha: {uniform: [0.55, 0.95], step: 0.05}
          warmup_epochs: {int: [0, 2]}
        """)
    for s in sample(space, 12):
        assert s["unfreeze_blocks"] in range(2, 13, 2)
        assert isinstance(s["batch_size"], int) and 1 <= s["batch_size"] <= 16
        assert round(s["focal_alpha"] / 0.05, 6).is_integer()
        config = space.trial_config(s)
        assert isinstance(config.warmup_epochs, float)     # int draw on a float key


def test_seeded_sampler_repeats_its_draws():
    space = load_space("vmae_full")
    assert sample(space, 6, seed=42) == sample(space, 6, seed=42)
    assert sample(space, 6, seed=42) != sample(space, 6, seed=1)


def test_define_by_run_pickles():
    space = load_space("vmae_full")
    fn = pickle.loads(pickle.dumps(space.define_by_run))
    trial = optuna.trial.FixedTrial({"vmae_variant": "large", "lr_backbone": 2e-5, "lr_head": 1e-3,
                                     **VMAE_RECIPE})
    fn(trial)
    assert trial.params == {"vmae_variant": "large", "lr_backbone": 2e-5, "lr_head": 1e-3,
                            **VMAE_RECIPE}
    assert pickle.loads(pickle.dumps(space)) == space


def test_a_space_pickled_by_the_hand_written_loader_still_loads_and_samples_the_same():
    """A search folder from before the pydantic schema resumes: Tune's searcher state holds the
    pickled SearchSpace. tests/data/space_before_pydantic.pkl was made at commit 5eefee1 with
        python -c 'import pickle, tuning.space as s; open("space_before_pydantic.pkl", "wb")
          .write(pickle.dumps({n: s.load_space(n) for n in ("demo", "vmae_full")}, protocol=5))'"""
    data = Path(__file__).parent / "data"
    old = pickle.loads((data / "space_before_pydantic.pkl").read_bytes())
    for name, before in old.items():   # the space files as they were then (the shipped ones move on)
        now = load_space(str(data / "space_before_pydantic" / f"{name}.yaml"))
        assert dataclasses.replace(before, path=now.path) == now
        assert sample(before, 6, seed=3) == sample(now, 6, seed=3)
        fn = pickle.loads(pickle.dumps(before.define_by_run))
        trial = optuna.trial.FixedTrial(sample(now, 1)[0])
        fn(trial)
        assert now.trial_config(trial.params) == before.trial_config(trial.params)


def test_ray_optuna_search_suggests_and_pickles_without_starting_ray():
    optuna_search = pytest.importorskip("ray.tune.search.optuna")
    space = load_space("demo")
    searcher = optuna_search.OptunaSearch(
        space=space.define_by_run, metric=space.metric, mode=space.mode,
        sampler=optuna.samplers.TPESampler(seed=space.seed))
    config = searcher.suggest("trial_1")
    assert set(config) == {"backbone", "lr_backbone", "lr_head"}
    space.trial_config(config)
    restored = pickle.loads(pickle.dumps(searcher))
    assert restored.suggest("trial_2").keys() == config.keys()


def test_trial_config_names_the_file_when_a_sampled_value_is_bad():
    space = load_space("demo")
    with pytest.raises(HeaderNetError, match=r"demo\.yaml: trial .*lr_head.*must be > 0"):
        space.trial_config({"backbone": "csn", "lr_backbone": 1e-3, "lr_head": -1.0})


# --- defaults, finding files -----------------------------------------------------------------
def test_defaults(tmp_path):
    space = load_text(tmp_path, "search: {lr_head: {loguniform: [1e-4, 1e-2]}}\n")
    assert space.name == "x" and space.trainer == {}
    assert (space.metric, space.mode) == ("val_f1", "max")
    assert (space.num_samples, space.max_concurrent, space.seed) == (20, 1, 42)
    assert space.scheduler == {"type": "none"}
    assert space.resources == {"cpu": 1.0, "gpu": 1.0}
    assert space.max_failures == 0
    assert space.params == (Param(name="lr_head", kind="loguniform", low=1e-4, high=1e-2),)
    assert space.max_epochs() == TrainConfig().epochs


def test_objective_mode_follows_the_metric(tmp_path):
    base = "trainer: {cpu: true}\nresources: {gpu: 0}\nsearch: {lr_head: {loguniform: [1.0e-4, 1.0e-2]}}\n"
    assert load_text(tmp_path, base + "objective: {metric: val_loss}").mode == "min"
    assert load_text(tmp_path, base + "objective: {metric: val_recall_05}").mode == "max"
    assert load_text(tmp_path, base + "objective: {metric: val_ap}").mode == "max"


def test_objective_names_come_from_the_trainer_metrics():
    assert set(SELECTABLE_METRICS) <= set(reported_metrics())
    assert load_space("demo", sets=["objective.metric=val_weighted_recall"]).mode == "max"
    # reported, but the trainer cannot pick a best epoch by it: the objective would be the
    # value at another metric's best epoch, not this metric's best
    for metric in ("train_loss", "epoch_seconds", "clips_per_s"):
        with pytest.raises(HeaderNetError, match=f"{metric} is reported but cannot pick"):
            load_space("demo", sets=[f"objective.metric={metric}"])



def test_find_space_file(tmp_path, monkeypatch):
    repo_demo = space_mod.REPO_SPACES_DIR / "demo.yaml"
    assert find_space_file("demo").resolve() == repo_demo.resolve()
    assert find_space_file("demo.yaml").resolve() == repo_demo.resolve()
    assert find_space_file(str(repo_demo)) == repo_demo
    own = write(tmp_path, "search: {lr_head: {loguniform: [1.0e-4, 1.0e-2]}}\n", "mine.yml")
    assert find_space_file("mine", spaces_dir=tmp_path) == own
    (tmp_path / "search_spaces").mkdir()
    local = write(tmp_path / "search_spaces", "search: {}\n", "demo.yaml")
    monkeypatch.chdir(tmp_path)
    assert find_space_file("demo").resolve() == local.resolve()   # the cwd's wins
    assert find_space_file("vmae_full").resolve() == (space_mod.REPO_SPACES_DIR / "vmae_full.yaml").resolve()
    with pytest.raises(HeaderNetError, match=r"search space 'nope' not found.*available: csn_full, csn_ig65m, demo"):
        find_space_file("nope")
    with pytest.raises(HeaderNetError, match=r"'sub/x\.yaml' not found"):
        find_space_file("sub/x.yaml")


# --- --set and CLI overrides -----------------------------------------------------------------
def test_set_trainer_and_section_keys():
    space = load_space("demo", sets=["epochs=3", "trainer.batch_size=4", "budget.num_samples=4",
                                     "scheduler.grace_period=2", "resources.cpu=2",
                                     "objective.metric=val_auc", "max_failures=0", "name=demo2"])
    assert space.trainer["epochs"] == 3 and space.trainer["batch_size"] == 4
    assert (space.num_samples, space.scheduler["grace_period"], space.resources["cpu"]) == (4, 2, 2.0)
    assert (space.metric, space.mode, space.max_failures, space.name) == ("val_auc", "max", 0, "demo2")


def test_set_fractional_gpu_and_scheduler_off():
    space = load_space("vmae_full", sets=["resources.gpu=0.5", "scheduler.type=none"])
    assert space.resources["gpu"] == 0.5 and space.scheduler == {"type": "none"}


def test_set_new_metric_takes_its_direction_unless_mode_is_set_too():
    assert load_space("demo", sets=["objective.metric=val_loss"]).mode == "min"
    with pytest.raises(HeaderNetError, match=r"objective\.mode \(from --set\): max would look"):
        load_space("demo", sets=["objective.metric=val_loss", "objective.mode=max"])


def test_set_on_a_searched_key_fixes_it():
    space = load_space("demo", sets=["lr_head=1e-4"])            # YAML text '1e-4' -> float
    assert "lr_head" not in {p.name for p in space.params}
    assert space.trainer["lr_head"] == 1e-4
    assert all("lr_head" not in s for s in sample(space, 3))
    assert space.trial_config({"backbone": "vmae", "lr_backbone": 1e-3}).lr_head == 1e-4


@pytest.mark.parametrize("sets", [["vmae_variant=giant", "batch_size=1"],
                                  ["batch_size=1", "vmae_variant=giant"]])
def test_set_on_a_choice_brings_its_overrides_and_explicit_sets_win(sets):
    space = load_space("vmae_full", sets=sets)
    assert [p.name for p in space.params] == ["lr_backbone", "lr_head", *VMAE_RECIPE]
    assert space.trainer["vmae_variant"] == "giant"
    assert (space.trainer["batch_size"], space.trainer["grad_accum"]) == (1, 8)
    assert space.trainer["gradient_checkpointing"] is True


def test_set_replaces_or_adds_a_searched_key():
    space = load_space("demo", sets=["search.lr_head={uniform: [0.001, 0.002]}",
                                     "search.weight_decay={loguniform: [1e-4, 1e-1]}"])
    by_name = {p.name: p for p in space.params}
    assert (by_name["lr_head"].kind, by_name["lr_head"].low) == ("uniform", 0.001)
    assert list(by_name)[-1] == "weight_decay"


def test_cli_budget_overrides_win_over_file_and_set():
    space = load_space("demo", sets=["budget.num_samples=4"], num_samples=2, max_concurrent=1)
    assert (space.num_samples, space.max_concurrent) == (2, 1)


BAD_SETS = [
    (["epochs"], "--set epochs: expected key=value"),
    (["lr_haed=1"], "--set lr_haed=1: lr_haed is not a trainer key (did you mean lr_head?)"),
    (["bugdet.num_samples=1"], "--set bugdet.num_samples=1: unknown section bugdet (did you mean budget?)"),
    (["budget.num_samples.x=1"], "expected budget.<key>=value with one dot"),
    (["search.lr_head=3"], "--set search.lr_head=3: expected a mapping"),
    (["lr_head=[1"], "--set lr_head=[1: the value is not valid YAML"),
    (["budget.num_samples=0"], "demo.yaml: budget.num_samples (from --set): must be >= 1, got 0"),
    (["epochs=ten"], "demo.yaml: trainer.epochs (from --set): must be an integer, got 'ten'"),
    (["lr_head=-1"], "demo.yaml: trainer.lr_head (from --set): --lr_head must be > 0, got -1.0"),
    (["search.lr_head={loguniform: [0, 1]}"],
     "demo.yaml: search.lr_head (from --set): a log scale needs low > 0"),
    (["resources.gpu=1"], "demo.yaml: resources.gpu (from --set): 1 GPU reserved but trainer cpu is true"),
]


@pytest.mark.parametrize("sets, fragment", BAD_SETS, ids=[s[0] for s, _ in BAD_SETS])
def test_bad_set(sets, fragment):
    with pytest.raises(HeaderNetError) as info:
        load_space("demo", sets=sets)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_cli_budget():
    with pytest.raises(HeaderNetError, match=r"budget\.num_samples \(from --num_samples\): must be >= 1"):
        load_space("demo", num_samples=0)
    with pytest.raises(HeaderNetError, match=r"budget\.max_concurrent \(from --max_concurrent\)"):
        load_space("demo", max_concurrent=0)


# --- bad files -------------------------------------------------------------------------------
OK = "trainer: {epochs: 4, cpu: true}\nresources: {gpu: 0}\n"
LR = "search: {lr_head: {loguniform: [1.0e-4, 1.0e-2]}}\n"
VARIANT = ("search:\n  vmae_variant:\n    choice: [base, giant]\n"
           "    overrides: {giant: %s}\n")

BAD_FILES = [
    # structure
    ("unknown section", OK + LR + "bugdet: {num_samples: 2}", "x.yaml: bugdet: unknown section (did you mean budget?)"),
    ("section not a mapping", OK + LR + "budget: 5", "x.yaml: budget: expected a mapping"),
    ("budget key", OK + LR + "budget: {num_sample: 2}", "x.yaml: budget.num_sample: unknown key (did you mean num_samples?)"),
    ("scheduler key", OK + LR + "scheduler: {type: asha, grace: 1}", "x.yaml: scheduler.grace: unknown key (did you mean grace_period?)"),
    ("resources key", OK + LR + "resources: {gpu: 0, memory: 4}", "x.yaml: resources.memory: unknown key"),
    ("objective key", OK + LR + "objective: {metric: val_f1, direction: max}", "x.yaml: objective.direction: unknown key"),
    ("bad name", OK + LR + "name: a/b", "x.yaml: name: expected a folder name"),
    ("no search", OK, "x.yaml: search: nothing to search"),
    ("spec not a mapping", OK + "search: {lr_head: [1, 2]}", "x.yaml: search.lr_head: expected a mapping such as"),
    # keys the trainer does not know / owns / both places
    ("unknown fixed key", "trainer: {epoch: 3, cpu: true}\nresources: {gpu: 0}\n" + LR,
     "x.yaml: trainer.epoch: not a trainer key (did you mean epochs?)"),
    ("unknown searched key", OK + "search: {lr_haed: {loguniform: [1.0e-4, 1.0e-2]}}",
     "x.yaml: search.lr_haed: not a trainer key (did you mean lr_head?)"),
    ("trial-owned key", "trainer: {run_name: a, cpu: true}\nresources: {gpu: 0}\n" + LR,
     "x.yaml: trainer.run_name: set by each trial"),
    ("fixed and searched", "trainer: {lr_head: 0.001, cpu: true}\nresources: {gpu: 0}\n" + LR,
     "x.yaml: search.lr_head: also fixed in trainer:"),
    # fixed values the trainer cannot accept
    ("fixed type", "trainer: {epochs: ten, cpu: true}\nresources: {gpu: 0}\n" + LR,
     "x.yaml: trainer.epochs: must be an integer, got 'ten'"),
    ("fixed range", "trainer: {epochs: 0, cpu: true}\nresources: {gpu: 0}\n" + LR,
     "x.yaml: trainer.epochs: --epochs must be a positive integer, got 0"),
    # distributions
    ("unknown distribution", OK + "search: {lr_head: {normal: [0, 1]}}",
     "x.yaml: search.lr_head: unknown distribution normal"),
    ("no distribution", OK + "search: {lr_head: {when: {backbone: vmae}}}", "x.yaml: search.lr_head: no distribution"),
    ("two distributions", OK + "search: {lr_head: {uniform: [0.1, 0.2], loguniform: [0.1, 0.2]}}",
     "x.yaml: search.lr_head: more than one distribution (uniform, loguniform)"),
    ("option of another kind", OK + "search: {lr_head: {loguniform: [1.0e-4, 1.0e-2], step: 0.1}}",
     "x.yaml: search.lr_head: step does not go with loguniform"),
    ("unknown option", OK + "search: {lr_head: {loguniform: [1.0e-4, 1.0e-2], lg: true}}",
     "x.yaml: search.lr_head: unknown key lg"),
    ("low > high", OK + "search: {lr_head: {loguniform: [1.0e-2, 1.0e-3]}}",
     "x.yaml: search.lr_head: low 0.01 must be < high 0.001"),
    ("low == high", OK + "search: {focal_alpha: {uniform: [0.5, 0.5]}}",
     "x.yaml: search.focal_alpha: low 0.5 must be < high 0.5"),
    ("bounds not a pair", OK + "search: {lr_head: {loguniform: 0.1}}",
     "x.yaml: search.lr_head: loguniform expects [low, high], got 0.1"),
    ("bound not a number", OK + "search: {lr_head: {loguniform: [small, 0.1]}}",
     "x.yaml: search.lr_head: low: expected a number, got small"),
    ("log with zero", OK + "search: {lr_head: {loguniform: [0, 0.1]}}",
     "x.yaml: search.lr_head: a log scale needs low > 0, got low 0"),
    ("int log with zero", OK + "search: {num_workers: {int: [0, 8], log: true}}",
     "x.yaml: search.num_workers: a log scale needs low > 0"),
    ("int log and step", OK + "search: {batch_size: {int: [1, 9], log: true, step: 2}}",
     "x.yaml: search.batch_size: step and log cannot be combined"),
    ("int not whole", OK + "search: {batch_size: {int: [1.5, 4]}}",
     "x.yaml: search.batch_size: low: expected a whole number, got 1.5"),
    ("step does not divide", OK + "search: {unfreeze_blocks: {int: [2, 11], step: 2}}",
     "x.yaml: search.unfreeze_blocks: high - low (9) must be a multiple of step 2"),
    ("float range on int key", OK + "search: {batch_size: {uniform: [1, 8]}}",
     "x.yaml: search.batch_size: batch_size takes whole numbers; use int"),
    ("range on text key", OK + "search: {backbone: {uniform: [1, 2]}}",
     "x.yaml: search.backbone: backbone is not a number; search it with choice"),
    ("list key", OK + "search: {betas: {choice: [0.9, 0.99]}}",
     "x.yaml: search.betas: betas is a list setting and cannot be searched"),
    ("empty choice", OK + "search: {vmae_variant: {choice: []}}",
     "x.yaml: search.vmae_variant: choice expects a non-empty list"),
    ("choice of lists", OK + "search: {lr_head: {choice: [[0.1]]}}",
     "x.yaml: search.lr_head: choice values must be single values"),
    ("duplicate choice", OK + "search: {neg_pos_ratio: {choice: [3, '3']}}",
     "x.yaml: search.neg_pos_ratio: choice value 3 appears twice"),
    # values TrainConfig cannot accept
    ("bad choice value", OK + "search: {vmae_variant: {choice: [base, huge]}}",
     "x.yaml: search.vmae_variant: --vmae_variant must be one of base, large, giant, tiny, got 'huge'"),
    ("choice type", OK + "search: {num_frames: {choice: [2, many]}}",
     "x.yaml: search.num_frames: must be an integer, got 'many'"),
    ("high out of range", OK + "search: {focal_alpha: {uniform: [0.5, 1.5]}}",
     "x.yaml: search.focal_alpha: --focal_alpha must be between 0 and 1, got 1.5"),
    ("text number out of range", OK + "search: {neg_pos_ratio: {int: [0, 4]}}",
     "x.yaml: search.neg_pos_ratio: --neg_pos_ratio must be 'all' or a positive number, got '0'"),
    ("choice clashes with a fixed key", "trainer: {layer_decay: 0.75, cpu: true}\nresources: {gpu: 0}\n"
     "search: {backbone: {choice: [vmae, csn]}}",
     "x.yaml: search.backbone: --layer_decay applies to --backbone vmae only"),
    ("combination clashes", OK + "search:\n  backbone: {choice: [vmae, csn]}\n"
     "  layer_decay: {uniform: [0.6, 0.9]}\n",
     "x.yaml: search: a trial with backbone=csn layer_decay=0.6: --layer_decay applies to --backbone vmae only"),
    # overrides
    ("override of no choice", OK + (VARIANT % "{batch_size: 2}").replace("giant: {", "huge: {"),
     "x.yaml: search.vmae_variant.overrides.huge: huge is not one of the choices base, giant"),
    ("override unknown key", OK + VARIANT % "{batch: 2}",
     "x.yaml: search.vmae_variant.overrides.giant.batch: not a trainer key (did you mean batch_size?)"),
    ("override of a searched key", OK + VARIANT % "{lr_head: 0.1}" + "  lr_head: {loguniform: [1.0e-4, 1.0e-2]}\n",
     "x.yaml: search.vmae_variant.overrides.giant.lr_head: lr_head is searched"),
    ("override type", OK + VARIANT % "{batch_size: two}",
     "x.yaml: search.vmae_variant.overrides.giant.batch_size: must be an integer, got 'two'"),
    ("override range", OK + VARIANT % "{batch_size: 0}",
     "x.yaml: search.vmae_variant.overrides.giant: --batch_size must be a positive integer, got 0"),
    ("override not a mapping", OK + VARIANT % "2",
     "x.yaml: search.vmae_variant.overrides.giant: expected a mapping of trainer keys"),
    # when
    ("when unknown key", OK + "search: {lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {finetun_mode: full}}}",
     "x.yaml: search.lr_backbone.when.finetun_mode: not a trainer key (did you mean finetune_mode?)"),
    ("when on itself", OK + "search: {backbone: {choice: [vmae], when: {backbone: vmae}}}",
     "x.yaml: search.backbone.when.backbone: a key cannot depend on itself"),
    ("when on a later key", OK + "search:\n  lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {backbone: vmae}}\n"
     "  backbone: {choice: [vmae, csn]}\n",
     "x.yaml: search.lr_backbone.when.backbone: backbone is sampled after lr_backbone; list backbone above"),
    ("when on a range", OK + "search:\n  lr_head: {loguniform: [1.0e-4, 1.0e-2]}\n"
     "  lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {lr_head: 0.001}}\n",
     "x.yaml: search.lr_backbone.when.lr_head: lr_head is a loguniform range"),
    ("when value not a choice", OK + "search:\n  backbone: {choice: [vmae]}\n"
     "  lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {backbone: [csn]}}\n",
     "x.yaml: search.lr_backbone.when.backbone: csn is not one of backbone's choices vmae"),
    ("when value impossible", OK + "search: {lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {finetune_mode: [ful]}}}",
     "x.yaml: search.lr_backbone.when.finetune_mode: ful is not a possible finetune_mode"),
    ("when empty", OK + "search: {lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {finetune_mode: []}}}",
     "x.yaml: search.lr_backbone.when.finetune_mode: expected at least one value"),
    ("nothing ever sampled", "trainer: {finetune_mode: frozen, cpu: true, epochs: 4}\nresources: {gpu: 0}\n"
     "search: {lr_backbone: {loguniform: [1.0e-5, 1.0e-4], when: {finetune_mode: full}}}",
     "x.yaml: search: no key is ever sampled"),
    # objective
    ("unknown metric", OK + LR + "objective: {metric: val_f2}",
     "x.yaml: objective.metric: val_f2 is not a metric the trainer reports (did you mean val_f1?)"),
    ("bookkeeping metric", OK + LR + "objective: {metric: epoch}",
     "x.yaml: objective.metric: epoch is reported but cannot pick a trial's best epoch"),
    ("bad mode", OK + LR + "objective: {metric: val_f1, mode: maximize}",
     "x.yaml: objective.mode: expected max or min, got maximize"),
    ("mode against the metric", OK + LR + "objective: {metric: val_f1, mode: min}",
     "x.yaml: objective.mode: min would look for the worst val_f1 (higher is better); use max"),
    # budget
    ("num_samples 0", OK + LR + "budget: {num_samples: 0}", "x.yaml: budget.num_samples: must be >= 1, got 0"),
    ("num_samples fraction", OK + LR + "budget: {num_samples: 2.5}", "x.yaml: budget.num_samples: expected a whole number, got 2.5"),
    ("max_concurrent 0", OK + LR + "budget: {max_concurrent: 0}", "x.yaml: budget.max_concurrent: must be >= 1, got 0"),
    ("negative seed", OK + LR + "budget: {seed: -1}", "x.yaml: budget.seed: must be in 0..4294967295, got -1"),
    # scheduler
    ("scheduler type", OK + LR + "scheduler: {type: hyperband}", "x.yaml: scheduler.type: expected asha or none, got hyperband"),
    ("grace 0", OK + LR + "scheduler: {type: asha, grace_period: 0}", "x.yaml: scheduler.grace_period: must be >= 1, got 0"),
    ("grace >= epochs", OK + LR + "scheduler: {type: asha, grace_period: 4}",
     "x.yaml: scheduler.grace_period: 4 must be below the trials' epochs (4)"),
    ("reduction 1", OK + LR + "scheduler: {type: asha, reduction_factor: 1}",
     "x.yaml: scheduler.reduction_factor: must be > 1, got 1"),
    # resources
    ("cpu < 1", "trainer: {cpu: true}\n" + LR + "resources: {cpu: 0.5, gpu: 0}",
     "x.yaml: resources.cpu: a trial needs at least 1 CPU, got 0.5"),
    ("negative gpu", "trainer: {cpu: true}\n" + LR + "resources: {gpu: -1}",
     "x.yaml: resources.gpu: expected 0, a fraction in (0, 1) or a whole number of GPUs, got -1"),
    ("gpu 1.5", LR + "resources: {gpu: 1.5}", "x.yaml: resources.gpu: expected 0, a fraction in (0, 1)"),
    ("gpu 0 without trainer cpu", LR + "resources: {gpu: 0}",
     "x.yaml: resources.gpu: 0 GPUs but trainer cpu is false"),
    ("gpu with trainer cpu", "trainer: {cpu: true}\n" + LR + "resources: {gpu: 1}",
     "x.yaml: resources.gpu: 1 GPU reserved but trainer cpu is true"),
    # failures
    ("max_failures -1", OK + LR + "max_failures: -1", "x.yaml: max_failures: must be >= 0, got -1"),
]


@pytest.mark.parametrize("text, fragment", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(HeaderNetError) as info:
        load_space(str(path))
    message = str(info.value)
    assert fragment in message
    assert message.startswith(str(path)) and "\n" not in message


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(HeaderNetError, match=r"x\.yaml: expected a mapping"):
        load_text(tmp_path, "- a\n- b\n")
    with pytest.raises(HeaderNetError, match=r"x\.yaml: not valid YAML"):
        load_text(tmp_path, "search: {a: [}\n")


def test_combinations_follow_when_and_overrides_and_are_capped(tmp_path, monkeypatch):
    space = load_text(tmp_path, "trainer: {cpu: true}\nresources: {gpu: 0}\nsearch:\n"
                      "  backbone: {choice: [vmae, csn], overrides: {csn: {csn_variant: tiny}}}\n"
                      "  vmae_variant: {choice: [tiny, base], when: {backbone: [vmae]}}\n"
                      "  lr_head: {loguniform: [1.0e-4, 1.0e-2]}\n")
    seen = [(sampled, values["csn_variant"]) for sampled, values in space.combinations()]
    assert [s for s, _ in seen] == [
        {"backbone": "vmae", "vmae_variant": "tiny", "lr_head": 1e-4},
        {"backbone": "vmae", "vmae_variant": "base", "lr_head": 1e-4},
        {"backbone": "csn", "lr_head": 1e-4}]
    assert seen[2][1] == "tiny"   # the csn choice brought its override along
    monkeypatch.setattr(space_mod, "MAX_COMBINATIONS", 2)
    assert len(list(space.combinations())) == 2


def test_messages_show_a_space_file_relative_to_the_folder_below_which_it_lies(tmp_path, monkeypatch):
    from tuning.space import _show

    monkeypatch.chdir(tmp_path)
    assert _show(tmp_path / "spaces" / "a.yaml") == str(Path("spaces") / "a.yaml")
    assert _show(tmp_path.parent / "b.yaml") == str(tmp_path.parent / "b.yaml")
    monkeypatch.chdir("/")   # not "tmp/...": from the root the absolute path is the clear one
    assert _show(tmp_path / "a.yaml") == str(tmp_path / "a.yaml")


# --- several objectives and constraints (issue 21) ----------------------------------------------
PARETO = "objective: {metrics: [val_f1, clips_per_s], modes: [max, max]}\n"


def test_several_objectives_and_a_constraint(tmp_path):
    space = load_text(tmp_path, OK + LR + PARETO + "constraints: {peak_mem_gib: {max: 70}, "
                      "clips_per_s: {min: 5}}\n")
    assert space.objective_metrics == ("val_f1", "clips_per_s")
    assert space.objective_modes == ("max", "max") and (space.metric, space.mode) == ("val_f1", "max")
    assert space.constraints == (("peak_mem_gib", "max", 70.0), ("clips_per_s", "min", 5.0))
    single = load_text(tmp_path, OK + LR)
    assert single.objective_metrics == ("val_f1",) and single.objectives == () and not single.constraints


@pytest.mark.parametrize("text, fragment", [
    (PARETO.replace("val_f1, clips_per_s", "clips_per_s, val_f1"),
     "metrics[0]: clips_per_s is reported but cannot pick a trial's best epoch"),
    (PARETO.replace("[max, max]", "[max]"), "modes needs one max or min per metric"),
    (PARETO.replace("[max, max]", "[min, max]"), "metrics[0]: min would look for the worst val_f1"),
    (PARETO.replace("clips_per_s", "val_f1"), "metrics lists a metric twice"),
    (PARETO.replace("clips_per_s", "clips"), "clips is not a metric the trainer reports"),
    ("objective: {metric: val_f1, metrics: [val_f1, clips_per_s], modes: [max, max]}\n", "not both"),
    (PARETO + "scheduler: {type: asha}\n", "a multi-objective search runs without a scheduler"),
    ("constraints: {peak_mem: {max: 3}}\n", "did you mean peak_mem_gib"),
    ("constraints: {peak_mem_gib: {}}\n", "expected max and/or min"),
    ("constraints: {peak_mem_gib: {below: 3}}\n", "unknown key"),
])
def test_bad_objectives_and_constraints(tmp_path, text, fragment):
    path = write(tmp_path, OK + LR + text)
    with pytest.raises(HeaderNetError) as info:
        load_space(str(path))
    assert fragment in str(info.value) and "\n" not in str(info.value)
