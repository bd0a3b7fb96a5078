#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md ("On a GPU"), as one command for a lent GPU machine, whose time is
# short: the overhead table in bf16-mixed, the fused-AMP, torch.compile and FSDP checks, the overhead table in
# 16-mixed, and a profile of the preset's steps, in that order (what matters most first), each part under its own
# time limit. Every result lands in $OUT: suite.log (all output), env.txt, and results.tgz (tables, JSON verdicts,
# profile tables) and traces.tgz (the profiler's traces), the archive remade after each part so that a run stopped at its limit still returns what it finished.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_suite.sh             # on a GPU machine, from the repository root
#   SMOKE=1 OUT=/tmp/gpu bash benchmarks/gpu_suite.sh     # the same steps on a CPU, tiny sizes (a few minutes)
#
# ZClip's callback is compared where the zclip package is importable: on a machine with no registry, carry its
# wheel in .whl/ (it is installed from there into /tmp/site).
set -u
OUT=${OUT:-/tmp/gradwatch_gpu}
WORK=/tmp/gradwatch_gpu_work
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
ZCLIP=$($PY -c "import zclip" 2>/dev/null && echo ,zclip)

if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu GPT="--gpt-dims 1,32,4,200,16 --batch-size 4" SMALL="--dims 1,32,4,200,16 --batch-size 4" BIG="$SMALL"
    ROUNDS=1 STEPS=20 WARMUP=4 LOG_EVERY=10 BACKEND=aot_eager FP16="--precision 32-true" T=1
else
    DEVICE=cuda GPT="--batch-size 8" SMALL="--dims 2,256,4,8000,128 --batch-size 8" BIG="--dims 12,768,12,32000,512 --batch-size 8"
    ROUNDS=3 STEPS=50 WARMUP=10 LOG_EVERY=50 BACKEND=inductor FP16="--precision 16-mixed" T=1
fi

part() {  # part NAME SECONDS COMMAND...: run one part under its limit, its output into $WORK/NAME.txt and the log
    local name=$1 limit=$(( $2 * T )); shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$OUT/suite.log"
    local started=$SECONDS
    timeout "$limit" "$@" > "$WORK/$name.txt" 2> "$WORK/$name.err"
    local rc=$?
    cat "$WORK/$name.txt" >> "$OUT/suite.log"
    grep -v -i "warn\|tip:\|litlogger\|available:" "$WORK/$name.err" | tail -n 40 >> "$OUT/suite.log"
    echo "=== $name rc=$rc in $(( SECONDS - started ))s" | tee -a "$OUT/suite.log"
    tar czf "$OUT/results.tgz" --exclude='trace_*' -C "$WORK" .
    if ls "$WORK"/trace_* >/dev/null 2>&1; then tar czf "$OUT/traces.tgz" -C "$WORK" $(cd "$WORK" && ls trace_*); fi
}

{
    date; uname -a; nvidia-smi 2>&1 | head -n 15
    $PY -c "import torch, lightning, sys; print(sys.version); print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
    $PY -c "import zclip; print('zclip', zclip.__file__)" 2>&1
} > "$OUT/env.txt" 2>&1

BENCH="$PY benchmarks/overhead.py --device $DEVICE --model gpt $GPT --steps $STEPS --warmup $WARMUP --rounds $ROUNDS --log-every-n-steps $LOG_EVERY"
CHECK="$PY benchmarks/gpu_checks.py --device $DEVICE --out $WORK"

part overhead_bf16 210 $BENCH --precision bf16-mixed --configs none,grad_watch_preset,clip_1.0,lightning_grad_norm_recipe,nan_guard,adaptive_clipping$ZCLIP
part fused_amp 60 $CHECK fused-amp $SMALL --steps 40
part compile 150 $CHECK compile $SMALL --steps 55 --backend $BACKEND
part fsdp 90 $CHECK fsdp $SMALL --steps 30
part overhead_fp16 150 $BENCH $FP16 --configs none,grad_watch_preset,clip_1.0,lightning_grad_norm_recipe$ZCLIP
part profile 60 $CHECK profile $BIG --steps 16
echo "=== done $(date +%T)" | tee -a "$OUT/suite.log"
