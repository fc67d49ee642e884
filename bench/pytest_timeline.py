"""Where the test suite's time goes: a pytest plugin that records when each test starts and
ends on each pytest-xdist worker, and a summary of those records.

    TIMELINE_DIR=/tmp/tl PYTHONPATH=bench python -m pytest -q -n auto -p pytest_timeline
    python bench/pytest_timeline.py /tmp/tl            # the summary

The summary: the run's span, each worker's busy seconds and test count, the seconds per test
file and the slowest tests (set-up and tear-down included). On a machine whose cores are all
busy every test takes longer than alone, so compare files and tests within one run. Record
results in docs/performance.md.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

_records = None


def pytest_configure(config):
    """One file per process: `gw0.tsv`... for xdist's workers, `main.tsv` for the controller
    or a run without workers (a pytest run inside a test is `main` too)."""
    global _records
    folder = os.environ.get("TIMELINE_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        worker = getattr(config, "workerinput", {}).get("workerid", "main")
        _records = open(Path(folder) / f"{worker}.tsv", "a", buffering=1)


def pytest_runtest_logstart(nodeid, location):
    if _records is not None:
        _records.write(f"start\t{time.time():.2f}\t{nodeid}\n")


def pytest_runtest_logfinish(nodeid, location):
    if _records is not None:
        _records.write(f"end\t{time.time():.2f}\t{nodeid}\n")


def read(folder: Path) -> list[tuple[str, float, float, str]]:
    """(worker, start, end, test id) of every finished test; the controller's own file is
    skipped when workers wrote theirs (it echoes their tests)."""
    files = sorted(folder.glob("*.tsv"))
    if any(f.stem != "main" for f in files):
        files = [f for f in files if f.stem != "main"]
    rows = []
    for path in files:
        started: dict[str, float] = {}
        for line in path.read_text().splitlines():
            kind, stamp, nodeid = line.split("\t", 2)
            if kind == "start":
                started[nodeid] = float(stamp)
            elif nodeid in started:
                rows.append((path.stem, started.pop(nodeid), float(stamp), nodeid))
    return rows


def summary(rows: list[tuple[str, float, float, str]], top: int = 15) -> str:
    if not rows:
        return "no tests recorded"
    begin, end = min(r[1] for r in rows), max(r[2] for r in rows)
    lines = [f"span {end - begin:.0f} s, {len(rows)} tests"]
    for worker in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == worker]
        lines.append(f"  {worker}: {len(mine)} tests, busy {sum(r[2] - r[1] for r in mine):.0f} s")
    per_file: dict[str, float] = defaultdict(float)
    for _, start, stop, nodeid in rows:
        per_file[nodeid.split("::")[0]] += stop - start
    lines.append("seconds per file:")
    lines += [f"  {s:7.0f}  {name}" for name, s in sorted(per_file.items(), key=lambda kv: -kv[1])[:top]]
    lines.append("slowest tests:")
    lines += [f"  {stop - start:7.0f}  {nodeid}" for _, start, stop, nodeid in
              sorted(rows, key=lambda r: r[1] - r[2])[:top]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the TIMELINE_DIR of a test run")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if not args.folder.is_dir():
        parser.error(f"{args.folder}: no such folder (the TIMELINE_DIR a test run wrote)")
    print(summary(read(args.folder), args.top))


if __name__ == "__main__":
    main()
