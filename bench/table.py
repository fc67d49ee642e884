"""The table of bench/gpu_check.sh: JSON lines of bench/throughput.py -> one markdown table.

    python bench/table.py gpu_check.jsonl

Rows in the order measured; a measurement that failed, timed out or was skipped is a row
saying so. Under the table: the trainer's clips/s against the bare step at the same batch,
and bf16 against fp32 for the same model and batch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("mode", "model", "batch", "amp", "compile", "clips/s", "peak GiB", "GFLOP/clip", "MFU", "note")


def cells(row: dict) -> list[str]:
    if "failed" in row or "skipped" in row:
        return ["-", row.get("failed") or row.get("skipped"), "", "", "", "", "", "", "", row["why"]]
    note = ""
    if "largest_fit" in row:
        note = (f"largest batch that fits (OOM at {row['oom_at']})" if row["largest_fit"]
                else f"nothing fits (OOM at {row['oom_at']})")
    if row.get("mode") == "trainer":
        note = f"real trainer, {row['workers']} loader threads, {row['source_size']}px clips"
        if row.get("processes", 1) > 1:
            note += f", DDP x{row['processes']} (global batch)"
    mfu = row.get("mfu")
    return [row.get("mode", ""), row.get("backbone", ""), str(row.get("batch", "")), row.get("amp", ""),
            "yes" if row.get("compile") else "no", str(row.get("clips_per_s", "")),
            "" if row.get("peak_gib") is None else str(row["peak_gib"]),
            str(row.get("gflop_per_clip", "")), "" if mfu is None else f"{100 * mfu:.1f}%", note]


def comparisons(rows: list[dict]) -> list[str]:
    bare = {(r["backbone"], r["batch"], r["amp"], r.get("compile")): r["clips_per_s"]
            for r in rows if r.get("mode") == "bare" and "batch" in r}
    lines = []
    for r in rows:
        key = (r.get("backbone"), r.get("batch"), r.get("amp"), r.get("compile"))
        if r.get("mode") == "trainer" and key in bare:
            lines.append(f"trainer / bare step, {key[0]} batch {key[1]} {key[2]}: "
                         f"{r['clips_per_s'] / bare[key]:.2f}")
        if r.get("mode") == "bare" and r.get("amp") == "bf16" and (key[0], key[1], "off", key[3]) in bare:
            lines.append(f"bf16 / fp32, {key[0]} batch {key[1]}: "
                         f"{r['clips_per_s'] / bare[(key[0], key[1], 'off', key[3])]:.2f}")
    return lines


def main() -> None:
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.startswith("{")]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(cells(row)) + " |")
    for line in comparisons(rows):
        print(line)


if __name__ == "__main__":
    main()
