"""How close a search's wall time gets to its ideal: the command's wall seconds against
(sum of every trial's epoch seconds) / max_concurrent. What is left is start-up, per-trial
overhead (actors, imports, data checks, model build, run-folder writes) and the summary.

    python bench/search_wall.py --space demo --json
    python bench/search_wall.py --space demo --repo /tmp/other_checkout --json   # another version

Runs `python -m tuning.search --space SPACE` once in a temp folder (the demo data generated
beforehand, outside the timing) with `--repo` on PYTHONPATH. Record results in
docs/performance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from common import demo_split

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="demo")
    parser.add_argument("--repo", default=str(REPO), help="checkout whose code runs the search")
    parser.add_argument("--workdir", help="run here and keep the search folder (default: a temp folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    space_file = repo / "search_spaces" / f"{args.space}.yaml"
    space = yaml.safe_load(space_file.read_text())
    with tempfile.TemporaryDirectory(prefix="search_wall_") as tmp:
        tmp = Path(args.workdir or tmp)
        if space.get("demo_data"):
            demo_split(tmp / space["demo_data"])
        env = {**os.environ, "PYTHONPATH": str(repo)}
        env.pop("OMP_NUM_THREADS", None)
        start = time.perf_counter()
        out = tmp / "out"
        if (out / "wall").exists():
            sys.exit(f"{out / 'wall'} exists: use another --workdir")
        done = subprocess.run([sys.executable, "-m", "tuning.search", "--space", str(space_file),
                               "--storage_path", str(out), "--name", "wall",
                               "--retrain_best", "0"],   # the search alone, not the retrain after it
                              cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"search failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        trials = [p for p in (tmp / "out" / "wall").iterdir() if (p / "metrics_epoch.csv").is_file()]
        epochs = pd.concat([pd.read_csv(p / "metrics_epoch.csv") for p in trials])
    concurrent = space["budget"]["max_concurrent"]
    ideal = epochs["epoch_seconds"].sum() / concurrent
    result = {"space": args.space, "repo": str(repo), "trials": len(trials), "epochs": len(epochs),
              "max_concurrent": concurrent, "wall_s": round(wall, 1),
              "sum_epoch_s": round(float(epochs["epoch_seconds"].sum()), 1),
              "ideal_s": round(ideal, 1), "wall_over_ideal": round(wall / ideal, 2)}
    print(json.dumps(result) if args.json else "\n".join(f"{k:>16}  {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
