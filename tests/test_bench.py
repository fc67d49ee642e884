"""The benchmark scripts keep running against the current library (numbers are not checked:
timings belong in docs/performance.md, not in assertions)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> list[dict]:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("backbone", ["vmae", "csn"])
def test_throughput_bench_reports_each_mode(backbone):
    rows = run_bench("bench/throughput.py", "--backbone", backbone, "--variant", "tiny", "--cpu",
                     "--num_frames", "4", "--size", "32", "--batch_size", "2", "--steps", "1",
                     "--warmup", "0", "--threads", "1", "--checkpointing", "both")
    assert [r["gradient_checkpointing"] for r in rows] == [False, True]
    assert all(r["backbone"] == f"{backbone}-tiny" and r["clips_per_s"] > 0 for r in rows)


def test_loader_bench_reads_a_split(tiny_data):
    rows = run_bench("bench/loader.py", "--csv", str(tiny_data["train_csv"]), "--num_frames", "4",
                     "--size", "32", "--workers", "0")
    assert rows == [{**rows[0], "clips": 18, "workers": 0}] and rows[0]["clips_per_s"] > 0
