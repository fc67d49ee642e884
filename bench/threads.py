"""The CPU thread policy against fixed thread counts, on the README's demo data.

    python bench/threads.py --rounds 3 --json

Per round and workload (a frozen tiny-VideoMAE epoch with the backbone run every step, and a
fully fine-tuned one; every positive + as many negatives), one `python -m headernet_core.train`
process per policy, interleaved: `omp1` (OMP_NUM_THREADS=1), `auto` (no OMP_NUM_THREADS, no
--threads: headernet_core.threads picks from the idle cores) and `all` (--threads = every core,
the old default with 0 loader workers). Reports the median epoch seconds per policy and their
ratio to `omp1`. On a shared machine the result depends on what else runs: that is the point.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from common import demo_split

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = {"frozen": ["--finetune_mode", "frozen", "--no-feature_cache"],
             "full": ["--finetune_mode", "full", "--lr_backbone", "1e-3"]}


def epoch_seconds(policy: str, workload: str, train_csv: Path, val_csv: Path, out: Path, run: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    extra = []
    if policy == "omp1":
        env["OMP_NUM_THREADS"] = "1"
    elif policy == "all":
        extra = ["--threads", str(len(os.sched_getaffinity(0)))]
    cmd = [sys.executable, "-m", "headernet_core.train", "--train_csv", str(train_csv), "--val_csv",
           str(val_csv), "--backbone", "vmae", "--vmae_variant", "tiny", "--num_frames", "8",
           "--epochs", "1", "--neg_pos_ratio", "1", "--num_workers", "0", "--cpu", "--no-progress",
           "--no-plots", "--no-tensorboard", "--lr_head", "1e-3", "--output_root", str(out),
           "--run_name", run, *WORKLOADS[workload], *extra]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return float(pd.read_csv(out / run / "metrics_epoch.csv")["epoch_seconds"].iloc[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", help="folder for the demo dataset (default: a temp folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    policies = ["omp1", "auto", "all"]
    seconds: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="threads_bench_") as tmp:
        train_csv, val_csv = demo_split(Path(args.data or tmp) / "demo")
        for round_ in range(args.rounds):
            order = policies[round_ % 3:] + policies[:round_ % 3]  # rotate who goes first
            for workload in WORKLOADS:
                for policy in order:
                    run = f"{workload}_{policy}_{round_}"
                    seconds.setdefault((workload, policy), []).append(
                        epoch_seconds(policy, workload, train_csv, val_csv, Path(tmp) / "runs", run))
    result = {"rounds": args.rounds, "cores": len(os.sched_getaffinity(0))}
    for workload in WORKLOADS:
        base = statistics.median(seconds[(workload, "omp1")])
        for policy in policies:
            median = statistics.median(seconds[(workload, policy)])
            result[f"{workload}_{policy}_epoch_s"] = round(median, 2)
            if policy != "omp1":
                result[f"{workload}_{policy}_over_omp1"] = round(median / base, 2)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>26}  {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
