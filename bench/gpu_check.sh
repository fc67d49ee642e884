#!/usr/bin/env bash
# The GPU check behind docs/performance.md: one GPU, about 6-8 minutes, nothing downloaded
# (random weights at the real shapes). Prints one table:
#   - VideoMAE v2 Base, batch 8/16/32, bf16, without and with torch.compile, + fp32 at batch 8
#   - VideoMAE v2 Large and Giant at the largest batch that fits
#   - ir-CSN-50 and ir-CSN-152
#   - one short run of the real trainer (loader threads + device-side augmentation) on synthetic
#     16 x 256^2 clips, against the bare model step at the same batch
#   - with >= 2 GPUs, the same trainer run under torchrun (DDP) with 1 and 2 processes
#
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --dry           # the same steps on the CPU with tiny models (a test;
#                                           # fp32, giant and ir-CSN-152 would repeat rows: left out)
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh   # an interpreter with the project installed
#
# Raw JSON lines and stderr go to $OUT (or a temp folder): gpu_check.jsonl, gpu_check.log.
# Each measurement is its own process with a timeout; BUDGET_S (450) stops starting new ones.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
OUT_DIR=${OUT:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_check.jsonl"
LOG="$OUT_DIR/gpu_check.log"
: > "$RESULTS"
: > "$LOG"
START=$SECONDS
BUDGET_S=${BUDGET_S:-450}   # stop starting new measurements after this (the table still prints)

if (( DRY )); then
    COMMON=(--cpu --amp off --num_frames 4 --size 32 --steps 1 --warmup 1 --threads 1 --compile_backend eager)
    BASE=tiny; LARGE=tiny; CSN_A=tiny; LIMIT=120
    BATCHES=(2 4); LARGEST=(4 2); TRAINER=(--batch_size 2 --workers 1 --trainer_clips 8 --source_size 40)
else
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "error: no CUDA GPU visible; use --dry for a CPU smoke run" >&2
        exit 2
    fi
    COMMON=(--amp bf16 --num_frames 16)
    BASE=base; LARGE=large; GIANT=giant; CSN_A=50; CSN_B=152; LIMIT=180
    BATCHES=(8 16 32); LARGEST=(128 96 64 48 32 24 16 8 4 2)
    TRAINER=(--batch_size 16 --workers 8 --trainer_clips 384 --source_size 256 --source_frames 16)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
fi

measure() {  # one bench/throughput.py process; a crash or timeout becomes a row saying so
    if (( SECONDS - START > BUDGET_S )); then
        echo "{\"skipped\": \"$*\", \"why\": \"past ${BUDGET_S}s\"}" >> "$RESULTS"
        return
    fi
    echo "+ bench/throughput.py $*" >> "$LOG"
    timeout "$LIMIT" env PYTHONPATH="$PWD" "$PY" bench/throughput.py "$@" >> "$RESULTS" 2>> "$LOG"
    local status=$?
    if (( status != 0 )); then
        echo "{\"failed\": \"$*\", \"why\": \"exit $status (124: past ${LIMIT}s; see gpu_check.log)\"}" >> "$RESULTS"
    fi
}

measure --backbone vmae --variant "$BASE" --batch_size "${BATCHES[@]}" "${COMMON[@]}"
measure --backbone vmae --variant "$BASE" --batch_size "${BATCHES[@]}" --compile on "${COMMON[@]}"
# --dry: COMMON is fp32 already, so the fp32 line would repeat the first row
(( DRY )) || measure --backbone vmae --variant "$BASE" --batch_size "${BATCHES[0]}" "${COMMON[@]}" --amp off
measure --backbone vmae --variant "$BASE" --mode both "${TRAINER[@]}" "${COMMON[@]}"
measure --backbone vmae --variant "$LARGE" --largest --batch_size "${LARGEST[@]}" "${COMMON[@]}"
# --dry: giant and ir-CSN-152 are the tiny models of the lines above, not run twice
(( DRY )) || measure --backbone vmae --variant "$GIANT" --largest --batch_size "${LARGEST[@]}" "${COMMON[@]}"
measure --backbone csn --variant "$CSN_A" --batch_size "${BATCHES[@]:0:2}" "${COMMON[@]}"
(( DRY )) || measure --backbone csn --variant "$CSN_B" --batch_size "${BATCHES[0]}" "${COMMON[@]}"

measure_ddp() {  # the real trainer under torchrun with $1 processes (DDP), same global batch
    if (( SECONDS - START > BUDGET_S )); then
        echo "{\"skipped\": \"DDP trainer x$1\", \"why\": \"past ${BUDGET_S}s\"}" >> "$RESULTS"
        return
    fi
    echo "+ torchrun --nproc_per_node $1 bench/throughput.py $*" >> "$LOG"
    timeout "$LIMIT" env PYTHONPATH="$PWD" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$1" \
        bench/throughput.py --mode trainer "${@:2}" >> "$RESULTS" 2>> "$LOG"
    local status=$?
    if (( status != 0 )); then
        echo "{\"failed\": \"DDP trainer x$1\", \"why\": \"exit $status (see gpu_check.log)\"}" >> "$RESULTS"
    fi
}

# DDP: clips/s of 1 and 2 processes (one GPU each) at the same global batch; --dry: 2 on the CPU.
GPUS=0
(( DRY )) || GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if (( DRY )); then
    measure_ddp 2 --backbone vmae --variant "$BASE" "${TRAINER[@]}" "${COMMON[@]}"
elif (( GPUS >= 2 )); then
    for n in 1 2; do measure_ddp "$n" --backbone vmae --variant "$BASE" "${TRAINER[@]}" "${COMMON[@]}"; done
else
    echo "DDP rows skipped: they need 2 GPUs, this machine has $GPUS"
fi

PYTHONPATH="$PWD" "$PY" bench/table.py "$RESULTS"
echo "($((SECONDS - START)) s; raw results: $RESULTS)"
