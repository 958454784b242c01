#!/bin/bash
# Function matching on a GPU (Beyer et al., 2022: the teacher scores the very view the student
# sees, with fresh blends of two crops, for as many passes as the budget allows), after the CPU
# runs FM and FMX (models/MODEL_CARD.md). Three runs side by side:
#   FS   from scratch (no --init; the stage-1 batch and schedule), blends on half of each batch
#   FT   SWA fine-tune of 1.3.0, blends on half of each batch
#   FT0  SWA fine-tune of 1.3.0, online targets without blends
# Prepared here (the GPU machine has no ../shared and no dlib), in .cache/gpu-carry: the pack
# (gpu_swa.sh's header), 1.3.0 rebuilt from the ONNX file and the converted teacher, both fp16:
#   git show 5f66f4f:models/mobiface.onnx > /tmp/mobiface-1.3.0.onnx
#   .venv-train/bin/python models/from_onnx.py --model /tmp/mobiface-1.3.0.onnx --out models/cache/init-1.3.0.pt
#   .venv-train/bin/python -c "import torch; h = lambda st: {**st, 'model': {k: v.half() if v.is_floating_point()
#       else v for k, v in st['model'].items()}}; [torch.save(h(torch.load(a, weights_only=False)), '.cache/gpu-carry/' + b)
#       for a, b in [('models/cache/teacher_torch.pt', 'teacher_torch.pt'), ('models/cache/init-1.3.0.pt', 'init-1.3.0.pt')]]"
# There: CARRY=.cache/gpu-carry OUT=dir bash models/gpu_fm.sh     (BUDGET=minutes, default 6.5)
set -u
CARRY=$(realpath "${CARRY:-.cache/gpu-carry}")
cd "$(dirname "$0")"   # models/
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
PY=${PY:-python3}
mkdir -p cache /tmp/ck
[ -f cache/teacher_torch.pt ] || cp "$CARRY/teacher_torch.pt" cache/teacher_torch.pt
nvidia-smi --query-gpu=name,memory.used --format=csv
B=${BUDGET:-6.5}
# a run that hangs must not take the others' results with it
run() {
    name=$1; shift
    timeout $(( ${B%.*} * 60 + 150 )) $PY train.py --pack "$CARRY/lfw-train.npz" --budget-minutes "$B" \
        --val-every-min 0.5 --w-ce 0 --online-teacher --out /tmp/ck/$name "$@" > /tmp/log_$name.txt 2>&1
    echo "$name rc=$?"
}
FINE="--init $CARRY/init-1.3.0.pt --batch 128 --lr 1e-3 --swa-start 0.15 --swa-every 20"
run FS --batch 256 --lr 5e-3 --fm-mix 0.5 &
run FT $FINE --fm-mix 0.5 &
run FT0 $FINE &
sleep ${PEEK:-150}; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; tail -q -n 1 /tmp/log_FS.txt /tmp/log_FT.txt /tmp/log_FT0.txt
wait
for n in FS FT FT0; do
    echo "== $n"; grep -E "VAL|TRAIN-DONE|SWA:|Error|error" /tmp/log_$n.txt | tail -4
    f=swa; [ $n = FS ] && f=best   # the product of each run: FS has no weight averaging
    [ -f /tmp/ck/$n/$f.pt ] && cp /tmp/ck/$n/$f.pt "$OUT/${f}_$n.pt"
done
tar czf "$OUT/logs.tgz" -C /tmp log_FS.txt log_FT.txt log_FT0.txt
ls -la "$OUT"
