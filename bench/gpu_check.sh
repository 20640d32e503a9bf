#!/usr/bin/env bash
# One-call GPU verification for a CUDA machine without network. From the repository root:
#
#     bash bench/gpu_check.sh OUTDIR
#
# Steps, each under `timeout`, each logged to OUTDIR/logs/NAME.log; a failure is recorded and the script goes on:
#   env        nvidia-smi, python / torch / triton versions, git commit
#   install    pip install --no-deps --no-build-isolation -e .  (fallback: a copy of the package on PYTHONPATH)
#   import     flamingo_fast and flamingo_fast.kernels import
#   tests      pytest -m cuda tests                                  (junit XML in OUTDIR/cuda_tests.xml)
#   kernels    python bench/gpu_kernels.py --out OUTDIR/kernels     (when the file exists; --dry-run on the CPU)
#   bandwidth  device-to-device copy bandwidth (bench/bandwidth.py measure)
#   decode_paths  decode ms/token before and after each of issue 12's changes, one process, one model
#              (bench/decode_paths.py: before, +fused_projections, +rotary_kv_write, +decode_attention, then each
#              "all but X"; 32 shots, batches 1 and 8; same-ids and logits diff against "before")
#   numerics   bf16 fast vs bf16 reference, both against a float32 reference (bench/numerics.py; CUDA only)
#   breakdown  device time per kernel over eager decode steps (bench/decode_breakdown.py; CUDA only), after the
#              changes; breakdown_before: the same with every old decode path (FLAMINGO_FAST_OLD_DECODE)
#   profile_bN flamingo-fast profile at OpenFlamingo-9B shape, random bf16 weights, shots 0,4,8,16,32,
#              reference vs fast, batch N (1 and 8); JSON rewritten after every row, so a timeout keeps rows
#   profile_idefics  the IDEFICS-9B shape at batch 1, 0 and the largest shot count: reference vs fast, and
#              transformers' own IDEFICS generate first when transformers is importable
#   openflamingo  OpenFlamingo's own generate vs fast at the preset's shape, batch 1, when bench/gpu_wheels.sh's
#              wheels were carried (.whl/)
#   floor      decode ms per token vs the memory-bandwidth floor (bench/bandwidth.py floor)
# then OUTDIR/summary.md, whose short form (steps + floor table) is printed last.
#
# The whole run stays under GPU_CHECK_BUDGET_S (default 450 s): each step's timeout is its own cap or what is left
# of the budget (minus a reserve for floor + summary), whichever is smaller; a step with no time left is skipped.
#
# Environment knobs: PYTHON (default python3); GPU_CHECK_CPU=1 is a dry run on the CPU (tiny preset, float32,
# shots 0,2, batches 1 and 2, CUDA hidden); GPU_CHECK_PRESET, GPU_CHECK_SHOTS, GPU_CHECK_BATCHES ("1 8"),
# GPU_CHECK_IMPL, GPU_CHECK_NEW_TOKENS, GPU_CHECK_REPEATS, GPU_CHECK_WARMUP, GPU_CHECK_SKIP_INSTALL=1,
# GPU_CHECK_INSTALL=copy (skip pip: the package copied under OUTDIR/pylib, on PYTHONPATH),
# GPU_CHECK_TRACE=1 (chrome traces of the batch-1 profile under OUTDIR/traces),
# GPU_CHECK_DECODE_PATHS_ARGS (extra arguments of bench/decode_paths.py, e.g. "--new-tokens 8"),
# GPU_CHECK_STEPS (a comma-separated subset of the steps to run, e.g. "tests,decode_paths,profile_b1"; env,
# install and import always run, floor when the bandwidth and the profiles were measured): the steps' caps add up
# to more than one 600 s device call, so a session splits the check into two calls.
# FLAMINGO_FAST_OLD_DECODE=name,... (runtime.py) puts named decode paths back on the old code in every step that
# does not set it itself: e.g. the whole run "before" with fused_projections,rotary_kv_write,decode_attention.
set -u

if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$1/logs" || exit 2
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
export PY
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
RESERVE=30

if [ "${GPU_CHECK_CPU:-0}" = "1" ]; then
    export CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu; DTYPE=float32
    PRESET=${GPU_CHECK_PRESET:-tiny}; SHOTS=${GPU_CHECK_SHOTS:-0,2}; BATCHES=${GPU_CHECK_BATCHES:-1 2}
    BW_GIB=0.25
else
    DEVICE=cuda; DTYPE=bfloat16
    PRESET=${GPU_CHECK_PRESET:-openflamingo-9b-v1}; SHOTS=${GPU_CHECK_SHOTS:-0,4,8,16,32}
    BATCHES=${GPU_CHECK_BATCHES:-1 8}; BW_GIB=4
fi
IMPL=${GPU_CHECK_IMPL:-reference,fast}
NEW_TOKENS=${GPU_CHECK_NEW_TOKENS:-8}
REPEATS=${GPU_CHECK_REPEATS:-2}
WARMUP=${GPU_CHECK_WARMUP:-1}

printf 'step\tstatus\tseconds\tlimit_s\n' >"$OUT/steps.tsv"

# run_step NAME CAP_SECONDS CMD...: runs CMD under timeout, logs to OUT/logs/NAME.log, records the status.
run_step() {
    local name=$1 cap=$2 left limit t0 rc status
    shift 2
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ ",$GPU_CHECK_STEPS,env,import,install," != *",$name,"* ]]; then
        printf '%s\tskipped (not in GPU_CHECK_STEPS)\t0\t0\n' "$name" >>"$OUT/steps.tsv"
        return 1
    fi
    left=$((START + BUDGET - RESERVE - $(date +%s)))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 5 ]; then
        printf '%s\tskipped (time budget)\t0\t0\n' "$name" >>"$OUT/steps.tsv"
        echo "[gpu_check] $name: skipped, the time budget is spent" >&2
        return 1
    fi
    echo "[gpu_check] $name (up to ${limit}s): $*" >&2
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then  # a shell function: `timeout` needs a process, so a child bash runs it
        timeout -k 10 "$limit" bash -c "$(declare -f "$1"); $*" >"$OUT/logs/$name.log" 2>&1
    else
        timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    fi
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="TIMEOUT after ${limit}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$limit" >>"$OUT/steps.tsv"
    echo "[gpu_check] $name: $status ($(($(date +%s) - t0))s); log: $OUT/logs/$name.log" >&2
    [ $rc -eq 0 ]
}

env_report() {
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
    echo "git $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)"
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
}

# A package tree without pip: flamingo_fast/ with kernels/ as its `kernels` subpackage (what setup.py maps).
copy_install() {
    rm -rf "$OUT/pylib" && mkdir -p "$OUT/pylib" &&
        cp -r flamingo_fast "$OUT/pylib/flamingo_fast" && rm -rf "$OUT/pylib/flamingo_fast/kernels" &&
        cp -r kernels "$OUT/pylib/flamingo_fast/kernels" &&
        cp bench/common.py "$OUT/pylib/common.py"  # PYTHONSAFEPATH drops bench/ from a script's sys.path
}

run_step env 20 env_report

if [ "${GPU_CHECK_INSTALL:-pip}" = "copy" ]; then
    copy_install
    export PYTHONPATH="$OUT/pylib${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    printf 'install\tcopy on PYTHONPATH (GPU_CHECK_INSTALL=copy)\t0\t0\n' >>"$OUT/steps.tsv"
elif [ "${GPU_CHECK_SKIP_INSTALL:-0}" != "1" ]; then
    if ! run_step install 90 "$PY" -m pip install --no-deps --no-build-isolation -e . -q; then
        echo "[gpu_check] editable install failed: using a copy of the package on PYTHONPATH" >&2
        copy_install
        export PYTHONPATH="$OUT/pylib${PYTHONPATH:+:$PYTHONPATH}"
        export PYTHONSAFEPATH=1  # the repo's own flamingo_fast/ (no kernels/ inside) must not shadow the copy
    fi
fi
run_step import 30 "$PY" -c 'import flamingo_fast, flamingo_fast.kernels, flamingo_fast.profiler; print(flamingo_fast.__file__)'

run_step tests 120 "$PY" -m pytest -q -m cuda tests -p no:cacheprovider --junitxml "$OUT/cuda_tests.xml"

if [ -f bench/gpu_kernels.py ]; then
    # its own budget stops starting new cases after 60 s; the cap leaves room for the case in flight
    KERNEL_ARGS=(--budget-s 60)
    if [ "$DEVICE" = cpu ]; then KERNEL_ARGS+=(--dry-run); fi
    run_step kernels 90 "$PY" bench/gpu_kernels.py --out "$OUT/kernels" "${KERNEL_ARGS[@]}"
else
    printf 'kernels\tskipped (bench/gpu_kernels.py not present)\t0\t0\n' >>"$OUT/steps.tsv"
fi

run_step bandwidth 30 "$PY" bench/bandwidth.py measure --out "$OUT/bandwidth.json" --gib "$BW_GIB"

# Issue 12: decode before and after each change, in one process (the model is built once).
ALL_OLD=fused_projections,rotary_kv_write,decode_attention
if [ "$DEVICE" = cuda ]; then
    DP_ARGS=(--preset "$PRESET" --shots "${SHOTS##*,}" --batches "${BATCHES// /,}" --new-tokens 16 --repeats 3
             --device cuda --dtype bfloat16 --leave-one-out)
else  # the dry run: the same script on the tiny preset (the torch backend's twins; only that it runs)
    DP_ARGS=(--preset "$PRESET" --shots 2 --batches "${BATCHES// /,}" --new-tokens 4 --repeats 1 --device cpu)
fi
# shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
DP_ARGS+=(${GPU_CHECK_DECODE_PATHS_ARGS:-})
run_step decode_paths 120 "$PY" bench/decode_paths.py "${DP_ARGS[@]}" --json "$OUT/decode_paths.json" \
    --md "$OUT/decode_paths.md"

# bf16 error of the fast path against a float32 reference, next to plain torch's bf16 error (DESIGN.md's rule),
# and the device-time breakdown of eager decode steps.
if [ "$DEVICE" = cuda ]; then
    run_step numerics 90 "$PY" bench/numerics.py --preset "$PRESET" --shots 4 --batch 2 --json "$OUT/numerics.json"
    run_step breakdown 60 "$PY" bench/decode_breakdown.py --preset "$PRESET" --shots 8 --md "$OUT/decode_breakdown.md"
    run_step breakdown_before 60 env FLAMINGO_FAST_OLD_DECODE="$ALL_OLD" "$PY" bench/decode_breakdown.py \
        --preset "$PRESET" --shots 8 --md "$OUT/decode_breakdown_before.md"
fi

PROFILES=()
for B in $BATCHES; do
    TRACE=()
    if [ "${GPU_CHECK_TRACE:-0}" = "1" ] && [ "$B" = "1" ]; then TRACE=(--trace "$OUT/traces"); fi
    run_step "profile_b$B" 110 "$PY" -m flamingo_fast profile --preset "$PRESET" --shots "$SHOTS" --batch "$B" \
        --impl "$IMPL" --device "$DEVICE" --dtype "$DTYPE" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" \
        --warmup "$WARMUP" --json "$OUT/profile_b$B.json" --csv "$OUT/profile_b$B.csv" \
        --plot "$OUT/profile_b$B.png" "${TRACE[@]}"
    PROFILES+=("$OUT/profile_b$B.json")
done
# The context cache: warm TTFT of 4 queries on a cached context at the largest shot count (32 on the GPU) against
# the same queries alone (issue 10).
run_step context_cache 60 "$PY" bench/context_cache_ttft.py --preset "$PRESET" --shots "${SHOTS##*,}" --batch 4 \
    --device "$DEVICE"
# OpenFlamingo's evaluation call: beam 3, short answers, batch 8, at the largest shot count (issue 9).
run_step profile_beam3 90 "$PY" -m flamingo_fast profile --preset "$PRESET" --shots "${SHOTS##*,}" --batch 8 \
    --num-beams 3 --impl "$IMPL" --device "$DEVICE" --dtype "$DTYPE" --new-tokens 10 --repeats "$REPEATS" \
    --warmup "$WARMUP" --json "$OUT/profile_beam3.json" --csv "$OUT/profile_beam3.csv"
# The IDEFICS-9B shape (issue 13): fast vs the reference, and transformers' own generate when it is installed.
if [ "$DEVICE" = cpu ]; then IDEFICS_PRESET=idefics-tiny; else IDEFICS_PRESET=${GPU_CHECK_IDEFICS_PRESET:-idefics-9b}; fi
IDEFICS_IMPL=reference,fast
if "$PY" -c 'import transformers' >/dev/null 2>&1; then IDEFICS_IMPL=idefics,reference,fast; fi
run_step profile_idefics 90 "$PY" -m flamingo_fast profile --preset "$IDEFICS_PRESET" --shots "0,${SHOTS##*,}" \
    --batch 1 --impl "$IDEFICS_IMPL" --device "$DEVICE" --dtype "$DTYPE" --new-tokens "$NEW_TOKENS" \
    --repeats "$REPEATS" --warmup "$WARMUP" --json "$OUT/profile_idefics.json" --csv "$OUT/profile_idefics.csv"

# OpenFlamingo's own generate at the 9B shape (issue 12), the baseline users have: only when the wheels from
# bench/gpu_wheels.sh were carried (.whl/), installed into a folder that only this step puts on PYTHONPATH.
if ls .whl/open_flamingo-*.whl >/dev/null 2>&1; then
    OF_SITE=$(mktemp -d)
    of_profile() {
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$OF_SITE" .whl/*.whl &&
            PYTHONPATH="$OF_SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m flamingo_fast profile --preset "$PRESET" \
                --shots "0,${SHOTS##*,}" --batch 1 --impl openflamingo,fast --device "$DEVICE" --dtype "$DTYPE" \
                --new-tokens "$NEW_TOKENS" --repeats 1 --warmup 1 --json "$OUT/profile_openflamingo.json" \
                --csv "$OUT/profile_openflamingo.csv"
    }
    export OF_SITE OUT PRESET SHOTS DEVICE DTYPE NEW_TOKENS
    run_step openflamingo 120 of_profile
else
    printf 'openflamingo\tskipped (no .whl/open_flamingo-*.whl: bash bench/gpu_wheels.sh, carry .whl)\t0\t0\n' \
        >>"$OUT/steps.tsv"
fi

# From here on the reserve is used: the budget check is lifted for the last two steps.
RESERVE=-30
if [ -f "$OUT/bandwidth.json" ] && ls "${PROFILES[@]}" >/dev/null 2>&1; then
    GPU_CHECK_STEPS= run_step floor 20 "$PY" bench/bandwidth.py floor --bandwidth "$OUT/bandwidth.json" --profile "${PROFILES[@]}" \
        --json "$OUT/floor.json" --md "$OUT/floor.md"
else
    printf 'floor\tskipped (needs the bandwidth and profile_bN steps)\t0\t0\n' >>"$OUT/steps.tsv"
fi

write_summary() {
    {
        echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo
        grep -E '^(git|device|torch|triton|python) ' "$OUT/logs/env.log" 2>/dev/null | sed 's/^/    /'
        echo
        echo "preset $PRESET, $DTYPE on $DEVICE, shots $SHOTS, batches $BATCHES, impl $IMPL, $NEW_TOKENS new tokens,"
        echo "$REPEATS repeats after $WARMUP warm-up; total $(($(date +%s) - START)) s"
        echo
        echo "## Steps"
        echo
        echo "| step | status | s | limit s |"
        echo "| --- | --- | ---: | ---: |"
        tail -n +2 "$OUT/steps.tsv" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
        for P in "${PROFILES[@]}" "$OUT/profile_idefics.json" "$OUT/profile_openflamingo.json"; do
            [ -f "$P" ] || continue
            echo
            echo "## Profile $(basename "$P")"
            echo
            "$PY" -c 'import json, sys
from flamingo_fast.report import format_table, load_json
print(format_table(load_json(sys.argv[1])))
if not json.load(open(sys.argv[1]))["complete"]:
    print("\n(partial: the step stopped before every row was measured)")' "$P" 2>&1
        done
        if [ -f "$OUT/floor.md" ]; then
            echo
            echo "## Decode vs the memory-bandwidth floor"
            echo
            cat "$OUT/floor.md"
        fi
        if [ -f "$OUT/logs/numerics.log" ]; then
            echo
            echo "## Numerics (bf16 vs a float32 reference)"
            echo
            cat "$OUT/logs/numerics.log"
        fi
        if [ -f "$OUT/decode_paths.md" ]; then
            echo
            echo "## Decode before and after each change (bench/decode_paths.py)"
            echo
            cat "$OUT/decode_paths.md"
        fi
        if [ -f "$OUT/decode_breakdown.md" ]; then
            echo
            echo "## Decode device-time breakdown (after)"
            echo
            cat "$OUT/decode_breakdown.md"
        fi
        if [ -f "$OUT/decode_breakdown_before.md" ]; then
            echo
            echo "## Decode device-time breakdown (before: FLAMINGO_FAST_OLD_DECODE=$ALL_OLD)"
            echo
            cat "$OUT/decode_breakdown_before.md"
        fi
        if [ -f "$OUT/kernels/kernels_gpu.md" ]; then
            echo
            sed 's/^# /## /' "$OUT/kernels/kernels_gpu.md"
        fi
    } >"$OUT/summary.md"
}
write_summary

echo
echo "== gpu_check summary ($OUT/summary.md; logs in $OUT/logs) =="
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
echo
if [ -f "$OUT/floor.md" ]; then cat "$OUT/floor.md"; else echo "no floor table (see logs/floor.log)"; fi
if [ -f "$OUT/decode_paths.md" ]; then echo; cat "$OUT/decode_paths.md"; fi
echo "total $(($(date +%s) - START)) s"
