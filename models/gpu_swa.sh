#!/bin/bash
# The GPU sweeps tried after MobiFace 1.3.0 (none shipped; models/MODEL_CARD.md): four SWA
# fine-tunes side by side on one GPU, from 1.2.0 and from 1.3.0, with and without CosFace.
# Their SWA averages and logs go to $OUT. Prepared here (the GPU machine has no ../shared):
#   .venv-train/bin/python models/pack.py --no-mix --out .cache/gpu-carry/lfw-train.npz
#   .venv-train/bin/python -c "import torch; [torch.save({'model': {k: v.half() if v.is_floating_point() else v
#       for k, v in torch.load(a, 'cpu', weights_only=False)['model'].items()}}, b) for a, b in
#       [('models/checkpoints/best.pt', '.cache/gpu-carry/init-1.2.0.pt'),
#        ('models/checkpoints/ft/swa.pt', '.cache/gpu-carry/init-1.3.0.pt')]]"
# There:
#   CARRY=.cache/gpu-carry OUT=dir bash models/gpu_swa.sh                 # 7 minutes, ~90 passes
#   CARRY=.cache/gpu-carry OUT=dir SWEEP=short bash models/gpu_swa.sh     # 2.5 minutes, ~18 passes
# The short sweep averages only the passes after compiling (the first ~40% of its budget), as
# far as the long sweep's snapshots peaked on validation; it swaps GC for GA with seed 1.
set -u
CARRY=$(realpath "${CARRY:-.cache/gpu-carry}")
cd "$(dirname "$0")"   # models/
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.used --format=csv
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"
SWEEP=${SWEEP:-long}
if [ "$SWEEP" = short ]; then B=2.4 SWA_START=0.42 SWA_EVERY=10; else B=7.0 SWA_START=0.15 SWA_EVERY=20; fi
# a run that hangs must not take the others' results with it
run() {
    name=$1; init=$2; shift 2
    timeout $(( ${B%.*} * 60 + 130 )) $PY train.py --pack "$CARRY/lfw-train.npz" --init "$CARRY/$init" \
        --budget-minutes "$B" --val-every-min 0.5 --batch 128 --lr 1e-3 --swa-start $SWA_START --swa-every $SWA_EVERY \
        --out /tmp/ck/$name "$@" > /tmp/log_$name.txt 2>&1
    echo "$name rc=$?"
}
mkdir -p /tmp/ck
run GA init-1.2.0.pt &
run GB init-1.2.0.pt --w-ce 0 --id-pairs --pos-weight 40 &
if [ "$SWEEP" = short ]; then
    run GE init-1.2.0.pt --seed 1 &
else
    run GC init-1.3.0.pt --w-ce 0 --id-pairs --pos-weight 40 &
fi
run GD init-1.3.0.pt &
sleep ${PEEK:-150}; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; tail -q -n 1 /tmp/log_*.txt
wait
cd /tmp
for log in log_G*.txt; do   # the runs this sweep started
    n=${log#log_}; n=${n%.txt}
    echo "== $n"; grep -E "VAL|TRAIN-DONE|SWA:|Error|error" $log | tail -4
    [ -f /tmp/ck/$n/swa.pt ] && cp /tmp/ck/$n/swa.pt "$OUT/swa_$n.pt"
done
tar czf "$OUT/logs.tgz" log_G*.txt
ls -la "$OUT"
