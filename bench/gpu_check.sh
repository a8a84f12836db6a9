#!/usr/bin/env bash
# saelab's GPU checks in one go, for the first time a CUDA GPU is at hand (under 10 minutes).
#
#   bench/gpu_check.sh              # on a CUDA machine, from anywhere in the repository
#   bench/gpu_check.sh --cpu-smoke  # tiny shapes on the CPU: checks this script end to end
#
# Prints one table:
#   - `pytest -m gpu` (Triton against eager at training shapes, natively);
#   - bench/kernels.py at the training precisions (fp32, tf32, bf16): the fused encoder's
#     forward ÷ a bare GEMM at the same precision (goal ≤ 1.2) and each precision's training
#     step against the fp32 eager step (goal for bf16 on Triton ≥ 2);
#   - a 200-step TopK training (d_in 2304, d_sae 65536, k 64, bf16) on a synthetic harvest,
#     killed with SIGKILL after step ~100 and resumed, against an uninterrupted run: the
#     final weights must be equal bit for bit;
#   - live training against a bare forward of the embedded model (bench/live.py's last line).
#
# Environment: PYTHON (default python), GPU_CHECK_DIR (logs and scratch; default a new
# /tmp/saelab-gpu-check.*), GPU_CHECK_BATCH (batch of the resume check; default 1024, which
# keeps its harvest at ~1 GB). Exit status 0 when every check passed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The project's venv (make setup) when there is one, else the python on PATH.
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python}; fi
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
DIR=${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/saelab-gpu-check.XXXXXX")}
mkdir -p "$DIR"
ROWS=$DIR/rows.tsv
: >"$ROWS"
FAILED=0
row() { # check, PASS/FAIL/INFO, detail
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$ROWS"
    [ "$2" = FAIL ] && FAILED=1
    return 0
}

if [ $SMOKE = 1 ]; then
    DEV=cpu D_IN=32 D_SAE=256 K=4 BATCH=128 PREC=bf16
    KERNELS=(--device cpu --shapes 32,256,4 --batch 256 --iters 2 --precision fp32,bf16)
    LIVE=(--device cpu --model tiny --hook blocks.1.hook_resid_post --n_tokens 4096 --d_sae 256 --k 4 --batch_size 256)
else
    DEV=cuda D_IN=2304 D_SAE=65536 K=64 BATCH=${GPU_CHECK_BATCH:-1024} PREC=bf16
    KERNELS=(--iters 10)
    LIVE=(--device cuda)
fi
STEPS=200 CKPT=50 KILL_AT=100

# ---- pytest -m gpu -------------------------------------------------------------------------
timeout 150 "$PY" -m pytest -p no:cacheprovider -q -m gpu tests/test_kernels_triton.py \
    >"$DIR/pytest.log" 2>&1
rc=$?
summary=$(tail -n 1 "$DIR/pytest.log")
if [ $rc = 0 ] || { [ $SMOKE = 1 ] && [ $rc = 5 ]; }; then
    row "pytest -m gpu" PASS "$summary"
else
    row "pytest -m gpu" FAIL "rc $rc: $summary"
fi

# ---- bench/kernels.py ----------------------------------------------------------------------
if timeout 200 "$PY" bench/kernels.py "${KERNELS[@]}" >"$DIR/kernels.log" 2>&1; then
    shape=""
    while IFS= read -r line; do
        case $line in
        "d_in "*) shape=$(echo "$line" | cut -d, -f1-3) ;;
        "fused encoder forward"*) row "kernels: ${line%%:*} [$shape]" INFO "${line#*: }" ;;
        "step "*) row "kernels: ${line%%:*} [$shape]" INFO "${line#*: }" ;;
        esac
    done <"$DIR/kernels.log"
else
    row "bench/kernels.py" FAIL "rc $?: $(tail -n 1 "$DIR/kernels.log")"
fi

# ---- kill and resume -----------------------------------------------------------------------
H=$DIR/harvest
N=$((STEPS * BATCH))
if ! timeout 120 "$PY" -c "
from saelab.synthetic import SyntheticData, write_harvest
write_harvest('$H', SyntheticData(d_in=$D_IN, n_features=2 * $D_IN, k_true=16), $N,
              dtype='float16')" >"$DIR/harvest.log" 2>&1; then
    row "kill and resume" FAIL "synthetic harvest not written: $(tail -n 1 "$DIR/harvest.log")"
else
    train=("$PY" -m saelab train --harvest "$H" --sae.arch topk --sae.d_sae $D_SAE --sae.k $K
        --batch_size $BATCH --n_tokens $N --eval_tokens 0 --checkpoint_every $CKPT
        --log_every 10 --precision $PREC --device $DEV -q)
    start=$SECONDS
    timeout 150 "${train[@]}" --out "$DIR/whole" >"$DIR/whole.log" 2>&1
    rc_whole=$?
    secs=$((SECONDS - start))
    "${train[@]}" --out "$DIR/killed" >"$DIR/killed.log" 2>&1 &
    pid=$!
    killed_at=""
    for _ in $(seq 1 1500); do
        last=$(tail -n 1 "$DIR/killed/train_log.jsonl" 2>/dev/null | sed -n 's/.*"step": \([0-9]*\).*/\1/p')
        if [ -n "$last" ] && [ "$last" -ge $KILL_AT ]; then
            kill -9 $pid 2>/dev/null && killed_at=$last
            break
        fi
        kill -0 $pid 2>/dev/null || break
        sleep 0.1
    done
    wait $pid 2>/dev/null
    timeout 150 "${train[@]}" --out "$DIR/killed" >>"$DIR/killed.log" 2>&1
    rc_resumed=$?
    verdict=$(timeout 60 "$PY" -c "
import sys, torch
from safetensors.torch import load_file
a, b = (load_file(f'$DIR/{r}/sae.safetensors') for r in ('whole', 'killed'))
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print('bit for bit equal' if same else 'DIFFERENT: ' + ', '.join(
    k for k in a if not torch.equal(a[k], b.get(k, torch.empty(0)))))
" 2>&1 | tail -n 1)
    detail="$STEPS steps of $BATCH, $PREC, killed after step ${killed_at:-?}: $verdict"
    if [ $rc_whole = 0 ] && [ $rc_resumed = 0 ] && [ -n "$killed_at" ] &&
        [ "$verdict" = "bit for bit equal" ]; then
        row "kill and resume (d_in $D_IN, d_sae $D_SAE, k $K)" PASS "$detail"
    else
        row "kill and resume (d_in $D_IN, d_sae $D_SAE, k $K)" FAIL \
            "$detail (rc $rc_whole / $rc_resumed; logs in $DIR)"
    fi
    rate=$(tail -n 1 "$DIR/whole/train_log.jsonl" 2>/dev/null | sed -n 's/.*"tokens_per_s": \([0-9.]*\).*/\1/p')
    row "training throughput" INFO "${rate%.*} tok/s in the loop; $N tokens in $secs s all in"
fi
rm -rf "$H"

# ---- live training -------------------------------------------------------------------------
if [ -f bench/live.py ]; then
    if timeout 150 "$PY" bench/live.py "${LIVE[@]}" >"$DIR/live.log" 2>&1; then
        row "live training vs bare forward" INFO "$(tail -n 1 "$DIR/live.log")"
    else
        row "live training vs bare forward" FAIL "rc $?: $(tail -n 1 "$DIR/live.log")"
    fi
else
    row "live training vs bare forward" FAIL "bench/live.py is missing"
fi

# ---- the table -----------------------------------------------------------------------------
echo
awk -F'\t' '{ w = length($1) > w ? length($1) : w; r[NR] = $0 }
    END { for (i = 1; i <= NR; i++) { split(r[i], f, "\t")
          printf "%-" w "s  %-4s  %s\n", f[1], f[2], f[3] } }' "$ROWS"
echo "(logs: $DIR)"
exit $FAILED
