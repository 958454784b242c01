#!/bin/bash
# The GPU sweep behind MobiFace 1.4.0's candidates: four SWA fine-tunes side by side on one GPU
# (wall-clock budgets of $BUDGET minutes each), from 1.2.0 and from 1.3.0, with and without CosFace.
# Their SWA averages and logs go to $OUT. Prepared here (no ../shared there):
#   .venv-train/bin/python models/pack.py --no-mix --out .cache/gpu-carry/lfw-train.npz
#   init-1.2.0.pt / init-1.3.0.pt: models/checkpoints/best.pt and ft/swa.pt as fp16 weights
#   CARRY=.cache/gpu-carry OUT=dir bash models/gpu_swa.sh                    # the 7-minute sweep
#   CARRY=.cache/gpu-carry OUT=dir BUDGET=2.4 SWA_START=0.42 bash models/gpu_swa.sh   # the short one
# The short sweep averages only the first ~20 passes (compiling takes the first ~40% of its
# budget), where the long sweep's snapshots peaked on validation; it swaps GC for GA with seed 1.
set -u
CARRY=$(realpath "${CARRY:-.cache/gpu-carry}")
cd "$(dirname "$0")"   # models/
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.used --format=csv
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"
B=${BUDGET:-7.0}
# a run that hangs must not take the others' results with it
run() {
    name=$1; init=$2; shift 2
    timeout $(( ${B%.*} * 60 + 130 )) $PY train.py --pack "$CARRY/lfw-train.npz" --init "$CARRY/$init" \
        --budget-minutes "$B" --val-every-min 0.5 --batch 128 --lr 1e-3 --swa-start "${SWA_START:-0.15}" --swa-every "${SWA_EVERY:-20}" \
        --out /tmp/ck/$name "$@" > /tmp/log_$name.txt 2>&1
    echo "$name rc=$?"
}
mkdir -p /tmp/ck
run GA init-1.2.0.pt &
run GB init-1.2.0.pt --w-ce 0 --id-pairs --pos-weight 40 &
if [ "$B" = 7.0 ]; then
    run GC init-1.3.0.pt --w-ce 0 --id-pairs --pos-weight 40 &
else
    run GE init-1.2.0.pt --seed 1 &
fi
run GD init-1.3.0.pt &
sleep ${PEEK:-150}; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; tail -q -n 1 /tmp/log_*.txt
wait
for n in GA GB GC GD GE; do
    [ -f /tmp/log_$n.txt ] || continue
    echo "== $n"; grep -E "VAL|TRAIN-DONE|SWA:|Error|error" /tmp/log_$n.txt | tail -4
    [ -f /tmp/ck/$n/swa.pt ] && cp /tmp/ck/$n/swa.pt "$OUT/swa_$n.pt"
done
tar czf "$OUT/logs.tgz" -C /tmp $(cd /tmp && ls log_G*.txt)
ls -la "$OUT"
