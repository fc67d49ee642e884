#!/usr/bin/env bash
# The README as a stranger meets it: a fresh clone of REPO (default: this checkout), the quick
# start timed as two steps (install, demo), then the journey, each command from another folder
# than the repository, timed, with its exit code; the two commands meant to fail print their
# one line. Usage: bash bench/readme_walkthrough.sh [REPO]   (about 8 minutes on 2 cores)
set -u
SRC=$(cd "${1:-$(dirname "$0")/..}" && pwd); W=$(mktemp -d); mkdir -p $W/run1 $W/j; echo "work folder: $W"
git clone -q "$SRC" $W/repo
cd $W/repo
S=$(date +%s.%N); python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" > $W/install.log 2>&1; echo "install rc=$? $(echo "$(date +%s.%N) - $S" | bc) s"
PY=$W/repo/.venv/bin/python
cd $W/run1
S=$(date +%s.%N); $PY -m tuning.search --space demo > demo.log 2>&1; echo "demo rc=$? $(echo "$(date +%s.%N) - $S" | bc) s"
grep -E "best trial|test f1|test:|final" demo.log | head -5
cd $W/j
run() { S=$(date +%s.%N); "$@" > step.log 2>&1; rc=$?; echo "rc=$rc $(printf %.0f $(echo "$(date +%s.%N) - $S" | bc)) s: ${*:2:3}"; [ $rc -ne 0 ] && tail -3 step.log; }
run $PY -m headernet_core.demo_data --out demo_data/raw --matches 10
run $PY -m headernet_core.split_dataset --input_csv demo_data/raw/all_clips.csv --output_dir demo_data/splits --test_split 0.2
run $PY -m headernet_core.train --train_csv demo_data/splits/train.csv --val_csv demo_data/splits/val.csv --backbone vmae --vmae_variant tiny --num_frames 4 --epochs 5 --run_name demo_vmae --lr_backbone 1e-3 --lr_head 1e-3 --head_dropout 0
python3 -c "import json;print('vmae best', json.load(open('report/header_experiments/demo_vmae/best_metrics.json'))['val_auc'])"
run $PY -m headernet_core.train --train_csv demo_data/splits/train.csv --val_csv demo_data/splits/val.csv --backbone csn --csn_variant tiny --num_frames 4 --epochs 5 --run_name demo_csn --lr_backbone 1e-3 --head_dropout 0
python3 -c "import json;print('csn best', json.load(open('report/header_experiments/demo_csn/best_metrics.json'))['val_auc'])"
run $PY -m tuning.search --space demo --name my_search --retrain_best 0
grep "best trial" step.log
run $PY -m tuning.retrain report/header_experiments/my_search --epochs 3 --test_csv demo_data/splits/test.csv
tail -4 step.log
$W/repo/.venv/bin/optuna-dashboard report/header_experiments/my_search/optuna_study.log --host 127.0.0.1 --port 8080 > dash.log 2>&1 &
D=$!
$W/repo/.venv/bin/tensorboard --logdir report/header_experiments/my_search --host 127.0.0.1 --port 6006 > tb.log 2>&1 &
T=$!
sleep 12
echo "dashboard $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/)  tensorboard $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:6006/)"
kill $D $T 2>/dev/null
printf 'name: bad\ntrainer: {epochs: -1}\nsearch: {lr_head: {loguniform: [1, 0.1]}}\n' > bad.yaml
$PY -m tuning.search --space bad.yaml > bad.log 2>&1; echo "bad space rc=$? lines=$(wc -l < bad.log): $(head -1 bad.log)"
$PY -m tuning.search --space vmae_full --train_csv demo_data/splits/train.csv --val_csv demo_data/splits/val.csv > vf.log 2>&1; echo "vmae_full without weights rc=$? lines=$(wc -l < vf.log): $(head -1 vf.log)"
sed -n '/^```python$/,/^```$/p' $W/repo/README.md | sed '1d;$d' > api.py
$PY api.py > api.log 2>&1; echo "api rc=$?"; tail -3 api.log
echo "help: $( { time $PY -m headernet_core.evaluate --help > /dev/null; } 2>&1 | grep real)"
echo "done: delete $W (its venv holds several GB)"
