"""The benchmark scripts keep running against the current library (numbers are not checked:
timings belong in docs/performance.md, not in assertions). Everything bench/gpu_check.sh does
on a GPU runs here on the CPU with tiny models, so the first GPU session does not find it broken."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run_bench(*args: str) -> list[dict]:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


TINY = ("--variant", "tiny", "--cpu", "--num_frames", "4", "--size", "32", "--steps", "1",
        "--warmup", "0", "--threads", "1")


@pytest.mark.parametrize("backbone", ["vmae", "csn"])
def test_throughput_bench_reports_each_mode(backbone):
    rows = run_bench("bench/throughput.py", "--backbone", backbone, *TINY, "--batch_size", "2",
                     "--checkpointing", "both", "--peak_tflops", "1")
    assert [r["gradient_checkpointing"] for r in rows] == [False, True]
    assert all(r["backbone"] == f"{backbone}-tiny" and r["clips_per_s"] > 0 for r in rows)
    for r in rows:  # FLOPs counted by FlopCounterMode; MFU against the given peak
        assert r["gflop_per_clip"] > 0
        assert r["mfu"] == pytest.approx(r["gflop_per_clip"] * r["clips_per_s"] / 1000, rel=0.01)


def test_throughput_bench_compiled_largest_and_through_the_trainer():
    rows = run_bench("bench/throughput.py", "--backbone", "vmae", *TINY, "--batch_size", "2", "4",
                     "--largest", "--compile", "both", "--compile_backend", "eager", "--mode", "both",
                     "--workers", "1", "--trainer_clips", "6", "--source_size", "40")
    bare = [r for r in rows if r["mode"] == "bare"]
    trainer = [r for r in rows if r["mode"] == "trainer"]
    assert [(r["compile"], r["batch"], r["largest_fit"]) for r in bare] == [(False, 4, True), (True, 4, True)]
    assert [(r["compile"], r["batch"], r["train_clips"]) for r in trainer] == \
        [(False, 2, 6), (False, 4, 6), (True, 2, 6), (True, 4, 6)]
    assert all(r["clips_per_s"] > 0 and r["source_size"] == 40 for r in trainer)


@pytest.mark.parametrize("variant", ["base", "large", "giant"])
def test_published_variants_build_with_random_weights(variant):
    """Without any checkpoint folder (the table of architectures is enough)."""
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    try:
        from throughput import add_mfu, peak_tflops, random_backbone
    finally:
        sys.path.remove(str(REPO / "bench"))

    with torch.device("meta"):  # the real shapes, no memory
        model, native, *_ = random_backbone("vmae", variant)
    assert native == 224 and model.num_features in (768, 1024, 1408)
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, None) is None and "mfu" not in add_mfu({"gflop_per_clip": 1, "clips_per_s": 1}, cpu, None)


def test_loader_bench_prints_one_json_line():
    rows = run_bench("bench/loader.py", "--clips", "6", "--frames", "4", "--size", "16",
                     "--source_size", "20", "--rounds", "3", "--json", "--legacy")
    assert len(rows) == 1
    row = rows[0]
    assert row["np_load_clips_per_s"] > 0 and row["loader_clips_per_s"] > 0
    assert row["ratio_to_np_load"] > 0 and row["legacy_transform_clips_per_s"] > 0


@pytest.mark.slow(seconds=65)
def test_gpu_check_dry_run_prints_the_whole_table(tmp_path):
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--dry"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**ENV, "OUT": str(tmp_path), "PYTHON": sys.executable,
                               "TMPDIR": str(tmp_path)})   # torchrun leaves torchelastic_* there
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "failed" in r or "skipped" in r], rows
    assert len(table) == 1 + len(rows) and len(rows) >= 10
    assert {r["mode"] for r in rows} == {"bare", "trainer"}
    assert sum(1 for r in rows if r.get("largest_fit")) == 1   # giant's line is the GPU's only
    assert any(r.get("compile") for r in rows) and any(r["backbone"] == "csn-tiny" for r in rows)
    assert "trainer / bare step" in done.stdout


def test_search_quality_records_a_space_and_replays_every_arm(tiny_data, tmp_path):
    """The recorder trains each grid config per seed (here 2 configs x 2 seeds x 2 epochs of
    a tiny space); the replay drives every arm's real searcher and scheduler over a table and
    prints the one JSON line."""
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({
        "name": "tiny", "trainer": {"train_csv": str(tiny_data["train_csv"]),
                                    "val_csv": str(tiny_data["val_csv"]), "backbone": "csn",
                                    "csn_variant": "tiny", "num_frames": 4, "input_size": 32,
                                    "epochs": 2, "cpu": True},
        "search": {"lr_head": {"loguniform": [1e-3, 1e-2]}},
        "budget": {"num_samples": 4, "startup_trials": 2},
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0}}))
    table = tmp_path / "curves.csv.gz"
    done = subprocess.run([sys.executable, "bench/search_quality.py", "record", "--space", str(space),
                           "--values", "2", "--epochs", "2", "--out", str(table)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    frame = pd.read_csv(table)
    assert len(frame) == 2 * 2 * 2 and set(frame["p:lr_head"]) == {0.001, 0.01}
    assert frame["value"].between(0, 1).all()
    assert not list(tmp_path.glob("*.partial*"))
    # the replay: a bigger table of made-up curves over the same space, 2 seeds per arm
    rows = [{"config": c, "seed": s, "p:lr_head": lr, "epoch": e,
             "value": round(0.5 + 0.1 * c + 0.05 * e * (-1) ** c + 0.01 * s, 3)}
            for c, lr in enumerate((1e-3, 2e-3, 5e-3, 1e-2)) for s in (0, 1) for e in (1, 2, 3, 4)]
    pd.DataFrame(rows).to_csv(table, index=False)
    info = json.loads(Path(f"{table}.json").read_text())
    Path(f"{table}.json").write_text(json.dumps({**info, "epochs": 4}))
    [line] = run_bench("bench/search_quality.py", "--table", str(table), "--seeds", "2",
                       "--budgets", "2,4", "--processes", "1", "--json")
    assert line["seeds"] == 2 and line["budgets"] == [8, 16] and len(line["diff_se"]) == 2
    assert set(line["regret"]) == {"random_asha", "random_fifo", "ray_default", "tpe_fifo", "headernet"}
    assert all(len(r) == 2 and min(r) >= 0 for r in line["regret"].values())


def test_search_quality_replays_an_interrupted_search(monkeypatch):
    """--resume_after: the resumed search's restored ASHA refills its rungs from the trials'
    result logs, so the replay goes exactly as without the interruption; with --no_refill
    (empty rungs, Ray's own behaviour) it goes otherwise (docs/performance.md has the regret)."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import search_quality as quality

    table = quality.load_table(quality.TABLE)
    space = quality.replay_space(table)
    uninterrupted = quality.replay_one("headernet", table, space, 10, 96)
    assert quality.replay_one("headernet", table, space, 10, 96, resume_after=4) == uninterrupted
    assert quality.replay_one("headernet", table, space, 10, 96, resume_after=4, refill=False) != uninterrupted


def test_test_timeline_records_each_test_and_sums_them_per_file(tmp_path):
    """bench/pytest_timeline.py as docs/performance.md runs it: the plugin in a pytest run
    (here without workers), then the summary of its records."""
    tests = tmp_path / "test_two.py"
    tests.write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_slower():\n    time.sleep(1.2)\n")
    records = tmp_path / "timeline"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_timeline", "-p", "no:cacheprovider",
                          str(tests)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**ENV, "PYTHONPATH": str(REPO / "bench"), "TIMELINE_DIR": str(records)})
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    done = subprocess.run([sys.executable, "bench/pytest_timeline.py", str(records)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith(", 2 tests") and lines[1].startswith("  main: 2 tests, busy ")
    slowest = lines[lines.index("slowest tests:") + 1]
    assert slowest.endswith("test_two.py::test_slower") and float(slowest.split()[0]) >= 1
    missing = subprocess.run([sys.executable, "bench/pytest_timeline.py", str(tmp_path / "nowhere")], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nowhere: no such folder" in missing.stderr.splitlines()[-1]


def test_the_suite_hands_xdist_the_end_to_end_tests_first_and_one_at_a_time():
    """tests/conftest.py's hooks behind the README's `-n auto`: at least 3 workers, tests
    handed out one at a time unless --maxschedchunk says otherwise, `slow` tests first, the
    longest first, then in file order (xdist's default put every end-to-end test on one worker)."""
    from types import SimpleNamespace

    import conftest

    assert conftest.pytest_xdist_auto_num_workers(None) >= conftest.XDIST_MIN_WORKERS == 3
    for given, expected in ((None, 1), (5, 5)):
        config = SimpleNamespace(option=SimpleNamespace(maxschedchunk=given))
        conftest.pytest_configure(config)
        assert config.option.maxschedchunk == expected
    conftest.pytest_configure(SimpleNamespace(option=SimpleNamespace()))   # without xdist: nothing to set

    def item(name: str, slow: dict | None):
        marker = None if slow is None else SimpleNamespace(kwargs=slow)
        return SimpleNamespace(name=name, get_closest_marker=lambda m: marker if m == "slow" else None)

    items = [item("a", None), item("b", {}), item("c", None), item("d", {}), item("e", {"seconds": 90}),
             item("f", {"seconds": 120})]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["f", "e", "b", "d", "a", "c"]


def test_code_lines_count_code_without_docstrings_comments_or_blanks(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        '"""Module doc,\nover two lines."""\nimport os  # a comment\n\n# a comment line\n'
        'def f(x):\n    """Doc."""\n    return (x +\n            1)\n')
    done = subprocess.run([sys.executable, str(REPO / "bench" / "code_lines.py"), "pkg"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["pkg: 4", "total: 4"], done.stderr  # import, def, the return's 2 lines
