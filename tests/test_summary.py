"""Search summary: the files, the best trial for max and min, importances (and when they are
skipped), plots, atomic idempotent rewrites, and an empty search."""
from __future__ import annotations

import csv
import importlib
import json
import math
import warnings
from pathlib import Path

import optuna
import pytest

import tuning.summary as summary_mod
from tuning.space import Param
from tuning.summary import TrialRecord, best_record, format_bytes, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")

PARAMS = (
    Param(name="backbone", kind="choice", values=("vmae", "csn")),
    Param(name="lr_backbone", kind="loguniform", low=1e-5, high=1e-3,
          when={"backbone": ("vmae",)}),
    Param(name="lr_head", kind="loguniform", low=1e-4, high=1e-2),
    Param(name="focal_alpha", kind="uniform", low=0.5, high=0.9),
    Param(name="unfreeze_blocks", kind="int", low=2, high=12, step=2),
)
OOM = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def rec(i: int, status: str, objective, *, backbone: str = "vmae", epochs: int = 4,
        **extra) -> TrialRecord:
    params = {"backbone": backbone, "lr_head": 10 ** (-4 + i * 0.25), "focal_alpha": 0.5 + i * 0.05,
              "unfreeze_blocks": 2 + 2 * (i % 5)}
    if backbone == "vmae":
        params["lr_backbone"] = 10 ** (-5 + i * 0.2)
    scored = objective is not None and not math.isnan(objective)
    values = dict(name=f"t{i:03d}_backbone={backbone}", status=status, params=params,
                  objective=objective, best_epoch=epochs if scored else None, epochs_run=epochs,
                  best_metrics={"val_f1": objective, "val_auc": 0.9, "val_loss": 0.4,
                                "lr_head": 2e-5} if scored
                  else {},
                  checkpoint=f"t{i:03d}/checkpoints/best_epoch_{epochs}.pt" if scored else None,
                  error=None, node="node-a" if i % 2 else "node-b", order=i)
    values.update(extra)
    return TrialRecord(**values)


def records() -> list[TrialRecord]:
    """8 trials: csn ones lack the conditional lr_backbone; one failed, one NaN, one running."""
    return [
        rec(1, "finished", 0.70),
        rec(2, "finished", 0.82, backbone="csn"),
        rec(3, "stopped_early", 0.55, epochs=1),
        rec(4, "failed", None, epochs=0, error=OOM),
        rec(5, "finished", 0.82, epochs=3),          # ties t002 with fewer epochs
        rec(6, "stopped_early", NAN, backbone="csn", epochs=1),
        rec(7, "finished", 0.60, backbone="csn"),
        rec(8, "running", 0.65, epochs=2),
    ]


def run(tmp_path: Path, recs=None, **kwargs) -> dict:
    values = dict(name="demo", metric="val_f1", mode="max", space_params=PARAMS,
                  records=records() if recs is None else recs, state="finished",
                  disk_bytes=3 * 1024 ** 3 // 2, notes=("resumed once",))
    values.update(kwargs)
    return write_summary(tmp_path, **values)


def strict_json(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def no_plots(monkeypatch):
    """For tests about numbers and text: drawing PNGs is most of a summary's second."""
    import tuning.summary_plots

    monkeypatch.setattr(tuning.summary_plots, "write_plots", lambda *args, **kwargs: [])


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("search")
    return folder, run(folder, val_csv="data/splits/val.csv")


# --- the files ------------------------------------------------------------------------------
def test_every_file_is_written_and_nothing_else(done):
    folder, _ = done
    expected = ["plots", "search_summary.json", "summary.md", "trials.csv",
                "plots/objective_per_trial.png"] + [f"plots/param_{p.name}.png" for p in PARAMS]
    assert files(folder) == sorted(expected)        # no temp files left beside them
    for png in (folder / "plots").iterdir():
        assert png.read_bytes()[:8] == PNG_MAGIC, png


def test_json_is_strict_and_equals_the_return_value(done):
    folder, summary = done
    data = strict_json(folder / "search_summary.json")
    assert data == summary
    assert data["name"] == "demo" and data["state"] == "finished"
    assert (data["metric"], data["mode"]) == ("val_f1", "max")
    assert data["num_trials"] == 8
    assert data["counts"] == {"finished": 4, "stopped_early": 2, "failed": 1, "running": 1,
                              "pending": 0, "interrupted": 0, "out_of_memory": 0}
    assert data["disk_bytes"] == 3 * 1024 ** 3 // 2 and data["disk"] == "1.5 GiB"
    assert data["notes"] == ["resumed once"]
    trials = {t["name"]: t for t in data["trials"]}
    assert [t["order"] for t in data["trials"]] == list(range(1, 9))
    assert trials["t006_backbone=csn"]["objective"] is None                 # NaN -> null
    assert trials["t004_backbone=vmae"]["error"] == OOM
    assert "lr_backbone" not in trials["t002_backbone=csn"]["params"]
    assert set(trials["t001_backbone=vmae"]) == {"order", "name", "status", "params", "objective",
                                                 "best_epoch", "epochs_run", "checkpoint",
                                                 "error", "node"}


def test_best_trial_block(done):
    folder, summary = done
    best = summary["best_trial"]
    assert best["name"] == "t002_backbone=csn"      # 0.82 tie with t005: more epochs wins
    assert best["objective"] == 0.82 and best["best_epoch"] == 4
    assert best["params"]["backbone"] == "csn"
    assert best["best_metrics"]["val_auc"] == 0.9
    assert best["checkpoint"] == "t002/checkpoints/best_epoch_4.pt"
    assert Path(best["checkpoint_abs"]).is_absolute()
    assert Path(best["checkpoint_abs"]) == folder.absolute() / best["checkpoint"]
    assert best["evaluate_command"] == (
        f"python -m headernet_core.evaluate --checkpoint {best['checkpoint_abs']} "
        f"--val_csv data/splits/val.csv")


def test_min_mode_picks_the_lowest(tmp_path, no_plots):
    summary = run(tmp_path, metric="val_loss", mode="min")
    assert summary["best_trial"]["name"] == "t003_backbone=vmae"
    assert summary["best_trial"]["evaluate_command"] is None      # no val_csv given
    text = (tmp_path / "summary.md").read_text()
    assert "minimize `val_loss`" in text and "Evaluate it" not in text
    table = text[text.index("## Trials"):]
    assert table.index("t003_") < table.index("t007_") < table.index("t008_")


def test_trials_csv(done):
    folder, _ = done
    with open(folder / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == (["order", "name", "status", "objective", "best_epoch", "epochs_run"]
                             + [f"param_{p.name}" for p in PARAMS]
                             + ["val_f1", "val_auc", "val_loss", "checkpoint", "error", "node"])
    assert [r["order"] for r in rows] == [str(i) for i in range(1, 9)]
    by_name = {r["name"]: r for r in rows}
    assert by_name["t002_backbone=csn"]["param_lr_backbone"] == ""          # conditional, absent
    assert float(by_name["t001_backbone=vmae"]["param_lr_backbone"]) == pytest.approx(10 ** -4.8)
    assert by_name["t006_backbone=csn"]["objective"] == ""                  # NaN
    assert by_name["t004_backbone=vmae"]["error"] == OOM
    assert by_name["t002_backbone=csn"]["checkpoint"] == "t002/checkpoints/best_epoch_4.pt"


def test_markdown_report(done):
    folder, _ = done
    text = (folder / "summary.md").read_text()
    assert text.startswith("# Search summary: demo")
    assert "**t002_backbone=csn**" in text
    assert "python -m headernet_core.evaluate --checkpoint" in text
    assert OOM in text and "1.5 GiB" in text and "resumed once" in text
    table = text[text.index("## Trials"):text.index("## Parameter importances")]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "t0" in line]
    assert len(rows) == 8
    assert "t002_" in rows[0] and "t005_" in rows[1]           # best first, tie broken
    assert "t004_" in rows[-1] and OOM in rows[-1]             # failed last, with its error
    assert "![objective_per_trial](plots/objective_per_trial.png)" in text
    # the epoch's scheduled LR is not mistaken for the sampled one
    assert "scheduled lr_head 2e-05" in text or "scheduled lr_head 2.0e-05" in text, text


# --- importances ----------------------------------------------------------------------------
def test_importances_with_enough_trials(done):
    _, summary = done
    importances = summary["importances"]
    assert importances is not None
    assert set(importances) <= {p.name for p in PARAMS} and "lr_backbone" in importances
    assert sum(importances.values()) == pytest.approx(1.0)
    assert list(importances.values()) == sorted(importances.values(), reverse=True)
    assert summary["importances_note"].startswith("PED-ANOVA")


def test_importances_skipped_with_too_few_trials(tmp_path, no_plots):
    summary = run(tmp_path, records()[:4])       # 3 finite objectives
    assert summary["importances"] is None
    assert summary["importances_note"].startswith("not computed: 3 trial(s)")
    assert "Not computed: 3 trial(s)" in (tmp_path / "summary.md").read_text()


def test_importances_skipped_when_one_param_varies(tmp_path, no_plots):
    same = [rec(1, "finished", 0.1 * i, order=i) for i in range(1, 6)]
    for i, r in enumerate(same):
        r.params["lr_head"] = 1e-3 * (i + 1)
    summary = run(tmp_path, same)
    assert summary["importances"] is None
    assert "1 searched param(s)" in summary["importances_note"]
    assert "(lr_head)" in summary["importances_note"]


def test_values_outside_the_space_are_left_out(tmp_path):
    recs = records()
    recs[0].params["lr_head"] = 5.0                   # above the space's bound
    recs[1].params["backbone"] = "x3d"                # not a choice
    recs[2].params["unfreeze_blocks"] = 6.0           # an int that came back as a float: fine
    summary = run(tmp_path, recs)
    assert summary["importances"] is not None
    assert "2 trial(s) with a value outside the space left out" in summary["importances_note"]
    assert (tmp_path / "plots" / "param_backbone.png").read_bytes()[:8] == PNG_MAGIC


def test_distributions_match_what_the_space_samples(tmp_path, no_plots):
    """Values sampled through Param.suggest (as OptunaSearch does) all fit the summary's study."""
    params = PARAMS + (Param(name="batch_size", kind="int", low=2, high=32, log=True),
                       Param(name="head_dropout", kind="uniform", low=0.0, high=0.5, step=0.1))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    recs = []
    for i in range(1, 7):
        trial = study.ask()
        for p in params:
            if p.active(trial.params):
                p.suggest(trial)
        for p in params:
            if p.name in trial.distributions:
                assert trial.distributions[p.name] == summary_mod.optuna_distribution(p), p.name
        recs.append(TrialRecord(name=f"t{i}", status="finished", params=dict(trial.params),
                                objective=0.1 * i, best_epoch=1, epochs_run=1, best_metrics={},
                                checkpoint=None, error=None, order=i))
    summary = run(tmp_path, recs, space_params=params)
    assert summary["importances"] is not None
    assert "outside" not in summary["importances_note"]
    assert summary["best_trial"]["checkpoint_abs"] is None


def test_evaluator_error_is_a_note(tmp_path, no_plots, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no regimes")
    # The module itself: `optuna.importance` starts as a lazy proxy that the first attribute
    # lookup replaces, so patching the proxy missed when no earlier test had loaded it.
    monkeypatch.setattr(importlib.import_module("optuna.importance"), "get_param_importances", broken)
    summary = run(tmp_path)
    assert summary["importances"] is None
    assert "RuntimeError: no regimes" in summary["importances_note"]
    assert (tmp_path / "search_summary.json").exists()


def test_quiet_and_leaves_optuna_logging_alone(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(tmp_path)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- rewrites and degenerate searches -------------------------------------------------------
def test_rewrite_is_idempotent_and_atomic(tmp_path):
    first = run(tmp_path, state="running")
    listing = files(tmp_path)
    second = run(tmp_path, state="running")
    assert second == first and files(tmp_path) == listing
    assert not [name for name in listing if name.endswith(".tmp")]
    assert strict_json(tmp_path / "search_summary.json") == second


def test_stale_plot_removed_when_nothing_left_to_draw(tmp_path):
    run(tmp_path)
    assert (tmp_path / "plots" / "param_lr_backbone.png").exists()
    csn_only = [r for r in records() if r.params["backbone"] == "csn"]
    summary = run(tmp_path, csn_only)
    assert not (tmp_path / "plots" / "param_lr_backbone.png").exists()
    assert "plots/param_lr_backbone.png" not in summary["plots"]


def test_no_records_at_all(tmp_path):
    summary = run(tmp_path, [], state="interrupted", disk_bytes=0, notes=())
    assert summary["best_trial"] is None and summary["num_trials"] == 0
    assert summary["trials"] == [] and summary["importances"] is None
    assert set(summary["counts"].values()) == {0}
    assert strict_json(tmp_path / "search_summary.json") == summary
    assert files(tmp_path) == ["plots", "search_summary.json", "summary.md", "trials.csv"] \
        or files(tmp_path) == ["search_summary.json", "summary.md", "trials.csv"]
    header = (tmp_path / "trials.csv").read_text().splitlines()
    assert len(header) == 1 and header[0].startswith("order,name,status,objective")
    text = (tmp_path / "summary.md").read_text()
    assert "interrupted" in text and "No trial" in text and "0 B" in text


def test_only_failures_and_nan(tmp_path):
    recs = [rec(1, "failed", None, epochs=0, error="boom"), rec(2, "stopped_early", NAN)]
    summary = run(tmp_path, recs)
    assert summary["best_trial"] is None and summary["plots"] == []
    assert "boom" in (tmp_path / "summary.md").read_text()


def test_records_without_order_take_their_position(tmp_path, no_plots):
    recs = [rec(i, "finished", 0.1 * i, order=0) for i in (3, 1, 2)]
    summary = run(tmp_path, recs)
    assert [(t["order"], t["name"][:4]) for t in summary["trials"]] == \
        [(1, "t003"), (2, "t001"), (3, "t002")]


# --- helpers and bad input ------------------------------------------------------------------
def test_best_record_rules():
    a = rec(1, "finished", 0.8, epochs=3)
    b = rec(2, "finished", 0.8, epochs=5)
    c = rec(3, "finished", 0.8, epochs=5)
    assert best_record([a, b, c], "max") is b             # more epochs, then the smaller name
    assert best_record([c, b, a], "max") is b
    assert best_record([a, rec(4, "finished", 0.2)], "min").name.startswith("t004")
    assert best_record([rec(5, "failed", None), rec(6, "finished", NAN)], "max") is None
    assert best_record([], "min") is None
    assert best_record([rec(7, "finished", math.inf), a], "max") is a
    # a failed trial's numbers come from a run that broke: never the best, even when higher
    assert best_record([rec(8, "failed", 0.99, error="OOM"), a], "max") is a
    assert best_record([rec(8, "failed", 0.99, error="OOM"), rec(9, "failed", 0.5)], "max") is None


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"),
                                     (1536, "1.5 KiB"), (5 * 1024 ** 2, "5.0 MiB"),
                                     (int(2.25 * 1024 ** 4), "2.2 TiB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "maximize"}, "mode: expected one of max, min"),
    ({"state": "done"}, "state: expected one of finished, interrupted, running"),
    ({"records": [rec(1, "errored", 0.5)]}, "status of trial t001_backbone=vmae"),
])
def test_bad_input(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, **kwargs)
    assert not (tmp_path / summary_mod.SUMMARY_JSON).exists()


def test_best_record_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        best_record([], "maximize")
    with pytest.raises(ValueError, match="size"):
        format_bytes(-1)


def test_a_final_model_survives_a_rewrite_and_is_replaced_by_the_next(tmp_path, no_plots):
    """tuning.retrain adds `final`; a later rewrite of the summary (a resumed search) keeps it,
    a later retrain replaces it, and a record tuning.retrain did not write is dropped."""
    from tuning.summary import FINAL_HEADING, add_final_model

    def final(name: str) -> dict:
        return {"run_dir": str(tmp_path / name), "trial": "t002_backbone=csn", "epochs": 2,
                "train_on_val": False, "test_csv": None}

    run(tmp_path, state="interrupted")
    add_final_model(tmp_path, final("final"))
    run(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert strict_json(tmp_path / "search_summary.json")["final"] == final("final")
    assert md.count(FINAL_HEADING) == 1 and md.index(FINAL_HEADING) < md.index("## Trials")
    add_final_model(tmp_path, final("final_2"))
    md = (tmp_path / "summary.md").read_text()
    assert md.count(FINAL_HEADING) == 1 and "final_2" in md
    assert strict_json(tmp_path / "search_summary.json")["final"] == final("final_2")
    summary = strict_json(tmp_path / "search_summary.json")
    (tmp_path / "search_summary.json").write_text(json.dumps({**summary, "final": {"run_dir": "x"}}))
    assert "final" not in run(tmp_path)
    assert FINAL_HEADING not in (tmp_path / "summary.md").read_text()


# --- golden summary.md ----------------------------------------------------------------------
GOLDEN_MD = Path(__file__).parent / "data" / "golden" / "summary.md"
LONG_ERROR = "ValueError: a | in the message, " + "and a long traceback line " * 10


def golden_summary(folder: Path) -> str:
    """A search of every kind of trial (finished, stopped early, failed with a short and a cut
    error, NaN, running, a --set leftover param), importances, notes, plots and a scored final
    model, as summary.md shows it; the folder and Optuna's version normalised."""
    from tuning.summary import add_final_model

    recs = records() + [rec(9, "failed", None, backbone="csn", epochs=0, error=LONG_ERROR)]
    recs[0].params["threads"] = 2
    recs[1].params["focal_alpha"] = 0.89      # the best trial at the edge of its range
    run(folder, recs, val_csv="data/splits/val.csv", warm_start={"from": "/runs/yesterday", "trials": 6},
        notes=("interrupted: continue with python -m tuning.search --resume",
               "feature cache: the backbone ran on 10 clips instead of 40 (4.0x fewer)"))
    add_final_model(folder, {
        "run_dir": "final", "trial": "t002_backbone=csn", "epochs": 3, "train_on_val": False,
        "test_csv": "/data/splits/test.csv", "test_clips": 40, "test_positives": 12,
        "checkpoint": "final/checkpoints/best_epoch_3.pt", "threshold": 0.41234,
        "threshold_source": "validation, epoch 3", "views": 1, "test_f1": 0.8, "test_precision": 0.75,
        "test_recall": 0.857142, "test_accuracy": 0.9, "test_auc": 0.93, "test_ap": 0.88,
        "per_video": "final/test_per_video.csv"})
    text = (folder / "summary.md").read_text().replace(str(folder.absolute()), "<search_dir>")
    return text.replace(f"Optuna {optuna.__version__}", "Optuna <version>")


def test_summary_md_matches_the_golden_file(tmp_path):
    """What a user reads in summary.md is pinned: a change to it must update the golden file
    (tests/data/golden/summary.md) on purpose."""
    assert golden_summary(tmp_path) == GOLDEN_MD.read_text()


def test_summary_md_is_rendered_from_the_json_alone(tmp_path):
    """summary.md holds nothing search_summary.json does not: rendering the JSON as read back
    from disk (final model included) gives the file byte for byte."""
    golden_summary(tmp_path)
    summary = strict_json(tmp_path / "search_summary.json")
    assert "final" in summary and summary["param_names"][-1] == "threads"
    assert summary_mod.render_markdown(summary) == (tmp_path / "summary.md").read_text()


# --- cost, out-of-memory ends and the Pareto front (issue 21) -----------------------------------
def test_cost_out_of_memory_and_pareto_front(tmp_path):
    speeds = {1: (0.70, 30.0), 2: (0.80, 10.0), 3: (0.60, 20.0), 4: (0.80, 5.0), 5: (0.90, 40.0)}
    recs = [rec(i, "finished", f1, device_hours=0.5) for i, (f1, _) in speeds.items()]
    for r, (_, speed) in zip(recs, speeds.values()):
        r.best_metrics["clips_per_s"] = speed
    recs[4].feasible = False                                # t005 dominates all but is infeasible
    recs.append(rec(6, "out_of_memory", None, variant="vmae-giant", device_hours=0.25))
    summary = run(tmp_path, recs, objectives=(("val_f1", "max"), ("clips_per_s", "max")))
    assert summary["pareto_front"] == [recs[1].name, recs[0].name]     # t002 (f1), t001 (speed)
    assert summary["cost"]["total"] == pytest.approx(2.75) and summary["cost"]["unit"] == "GPU-hours"
    assert summary["out_of_memory"] == {"vmae-giant": [recs[5].name]}
    markdown = (tmp_path / "summary.md").read_text()
    assert "## Pareto front" in markdown and "## Out of memory at micro-batch 1" in markdown
    assert "- Cost: 2.75 GPU-hours in all" in markdown and "| GPU-hours |" in markdown
    assert (tmp_path / "plots" / "pareto.png").is_file()
    header = (tmp_path / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"val_f1", "clips_per_s", "device_hours"} <= set(header)


# --- the edge warning -----------------------------------------------------------------------
@pytest.mark.parametrize(("param", "value", "side"), [
    (PARAMS[2], 1e-2, "upper"), (PARAMS[2], 1.2e-4, "lower"),     # log scale: 1.2e-4 is near 1e-4
    (PARAMS[3], 0.5, "lower"), (PARAMS[4], 12, "upper"), (PARAMS[2], 1e-3, None),
    (PARAMS[3], 0.7, None), (PARAMS[2], 1.5e-4, None)])           # 1.5e-4: 9% of the log range
def test_the_edge_warning_fires_at_a_bound_and_stays_silent_inside(param, value, side):
    from tuning.summary import edge_warnings

    best = rec(1, "finished", 0.7)
    best.params[param.name] = value
    lines = edge_warnings(best, [param])
    if side is None:
        assert lines == []
    else:
        assert len(lines) == 1 and f"{param.name} " in lines[0] and f"{side} edge" in lines[0]
        assert "widening" in lines[0]
    assert edge_warnings(None, [param]) == []


def test_the_edge_warning_ends_the_console_and_is_in_the_summary(tmp_path, no_plots, capsys):
    from types import SimpleNamespace

    from tuning.search import print_result

    recs = records()
    recs[1].params["lr_head"] = 1e-2          # t002, the best: at lr_head's upper bound
    summary = run(tmp_path, recs)
    assert len(summary["edge_warnings"]) == 1 and "lr_head" in summary["edge_warnings"][0]
    assert "**Warning**: the best trial's lr_head" in (tmp_path / "summary.md").read_text()
    space = SimpleNamespace(num_samples=8, metric="val_f1", params=PARAMS)
    print_result(tmp_path, space, recs, recs[1], 0, [])
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "lr_head 0.01 is at the upper edge" in warned[0], warned
