#!/bin/bash
# The GPU sweep behind MobiFace 1.2.0's model card: six training configurations side by side on
# one GPU (7.2-minute wall-clock budgets each), their best checkpoints and logs to $OUT.
#   PACK=lfw-train.npz OUT=dir bash models/gpu_sweep.sh     (PACK from models/pack.py)
# 1.2.0 itself is configuration C alone on the GPU: train.py --pack $PACK --budget-minutes 4.
set -u
PACK=$(realpath "${PACK:-$(dirname "$0")/cache/gpu/lfw-train.npz}")
cd "$(dirname "$0")"   # models/
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.used --format=csv
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"
B=${BUDGET:-7.2}
run() { name=$1; shift; $PY train.py --pack $PACK --budget-minutes $B --val-every-min 0.4 --out /tmp/ck/$name "$@" > /tmp/log_$name.txt 2>&1; echo "$name rc=$?"; }
mkdir -p /tmp/ck
run A --batch 256 --lr 5e-3 --mix-ratio 1 &
run B --batch 256 --lr 5e-3 --mix-ratio 3 &
run C --batch 256 --lr 5e-3 --mix-ratio 0 &
run E --batch 256 --lr 5e-3 --mix-ratio 1 --wd 0.05 &
run D --batch 256 --lr 5e-3 --mix-ratio 1 --id-fraction 0.5 &
run F --batch 256 --lr 5e-3 --mix-ratio 1 --id-fraction 0.25 &
sleep ${PEEK:-150}; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; tail -q -n 1 /tmp/log_*.txt
wait
for n in A B C E D F; do echo "== $n"; grep -E "VAL|TRAIN-DONE|Error|error" /tmp/log_$n.txt | tail -3; done
for n in A B C E; do [ -f /tmp/ck/$n/best.pt ] && cp /tmp/ck/$n/best.pt $OUT/best_$n.pt; done
# the data-size points only need evaluating: half precision halves what comes back
$PY -c "
import torch, sys
for n in 'DF':
    try:
        st = torch.load(f'/tmp/ck/{n}/best.pt', map_location='cpu', weights_only=False)
    except FileNotFoundError:
        continue
    st['model'] = {k: (v.half() if v.is_floating_point() else v) for k, v in st['model'].items()}
    torch.save(st, sys.argv[1] + f'/best_{n}.pt')
" $OUT
tar czf $OUT/logs.tgz -C /tmp log_A.txt log_B.txt log_C.txt log_E.txt log_D.txt log_F.txt
ls -la $OUT
